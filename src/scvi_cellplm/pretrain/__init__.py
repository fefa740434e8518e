"""Pretraining at scale: a corpus of AnnData files streamed from disk, DDP, checkpoints, resume."""

from ._corpus import Corpus
from ._loader import PADDING_KEY, PLATFORM_KEY, CorpusDataLoader, CorpusDataModule, CorpusDataset, CorpusSampler
from ._pretrain import PretrainingPlan, build_model, load_pretrained, pretrain, vocabulary_template

__all__ = [
    "PADDING_KEY",
    "PLATFORM_KEY",
    "Corpus",
    "CorpusDataLoader",
    "CorpusDataModule",
    "CorpusDataset",
    "CorpusSampler",
    "PretrainingPlan",
    "build_model",
    "load_pretrained",
    "pretrain",
    "vocabulary_template",
]
