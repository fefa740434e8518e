"""Official checkpoint translation, offline gene-identifier tables, downloads and known models."""

from ._download import cache_folder
from ._genes import GeneAlignment, align_genes, gene_table, symbols_to_ensembl
from ._registry import PRETRAINED

__all__ = ["PRETRAINED", "GeneAlignment", "align_genes", "cache_folder", "gene_table", "symbols_to_ensembl"]
