"""Sentence construction and sentence-wise data loading."""

from ._loader import (
    INDICES_KEY,
    SentenceDataset,
    SentenceDataSplitter,
    SentenceSampler,
    sentence_dataloader,
)
from ._sentences import bisect_windows, make_sentences, pack_sentences

__all__ = [
    "INDICES_KEY",
    "SentenceDataSplitter",
    "SentenceDataset",
    "SentenceSampler",
    "bisect_windows",
    "make_sentences",
    "pack_sentences",
    "sentence_dataloader",
]
