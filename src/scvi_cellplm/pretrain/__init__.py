"""Pretraining at scale: a corpus (.h5ad, zarr, TileDB-SOMA) streamed from disk, DDP, checkpoints, resume."""

from .._constants import DATA_KEYS
from ._corpus import Corpus
from ._loader import CorpusDataLoader, CorpusDataModule, CorpusDataset, CorpusSampler
from ._pretrain import PretrainingPlan, build_model, load_pretrained, pretrain, vocabulary_template
from ._readers import AnnDataSource
from ._soma import SomaSource

PADDING_KEY = DATA_KEYS.PADDING_KEY
PLATFORM_KEY = DATA_KEYS.PLATFORM_KEY

__all__ = [
    "PADDING_KEY",
    "PLATFORM_KEY",
    "AnnDataSource",
    "Corpus",
    "CorpusDataLoader",
    "CorpusDataModule",
    "CorpusDataset",
    "CorpusSampler",
    "PretrainingPlan",
    "SomaSource",
    "build_model",
    "load_pretrained",
    "pretrain",
    "vocabulary_template",
]
