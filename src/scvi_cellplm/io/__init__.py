"""Official checkpoint translation and offline gene-identifier tables."""

from ._genes import GeneAlignment, align_genes, gene_table, symbols_to_ensembl

__all__ = ["GeneAlignment", "align_genes", "gene_table", "symbols_to_ensembl"]
