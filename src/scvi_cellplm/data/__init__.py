"""Data code: the gene-vocabulary contract, sentences, windows, sentence-wise loading."""

from .._constants import DATA_KEYS
from ._genes import align_to_vocabulary, registered_gene_ids, registered_var
from ._graph import graph_windows, spatial_graph
from ._loader import (
    SentenceDataset,
    SentenceDataSplitter,
    SentenceSampler,
    sentence_dataloader,
)
from ._selection import highly_variable_genes
from ._sentences import bisect_windows, make_sentences, pack_sentences, random_sentences
from ._windows import expression_features, make_windower

INDICES_KEY = DATA_KEYS.INDICES_KEY
"""Key of the obs indices of a mini-batch's cells (re-exported from ``DATA_KEYS``)."""

__all__ = [
    "INDICES_KEY",
    "SentenceDataSplitter",
    "SentenceDataset",
    "SentenceSampler",
    "align_to_vocabulary",
    "bisect_windows",
    "expression_features",
    "graph_windows",
    "highly_variable_genes",
    "make_sentences",
    "make_windower",
    "pack_sentences",
    "random_sentences",
    "registered_gene_ids",
    "registered_var",
    "sentence_dataloader",
    "spatial_graph",
]
