"""scvi-cellplm: CellPLM (cells as tokens) as a first-class scvi-tools model."""

from __future__ import annotations

import logging

from . import data, datasets, evaluation, io, module, pretrain, spatial, train
from ._constants import SLOTS
from ._exceptions import CellPLMError, CheckpointError, GeneAlignmentError, InputDataError
from ._presets import PAPER, PRESETS, SMALL_CPU
from .model import CellPLM, CellPLMAnnotator, CellPLMPerturbation

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "PAPER",
    "PRESETS",
    "SLOTS",
    "SMALL_CPU",
    "CellPLM",
    "CellPLMAnnotator",
    "CellPLMPerturbation",
    "CellPLMError",
    "CheckpointError",
    "GeneAlignmentError",
    "InputDataError",
    "data",
    "evaluation",
    "spatial",
    "datasets",
    "io",
    "module",
    "pretrain",
    "train",
]
