"""scvi-cellplm: CellPLM (cells as tokens) as a first-class scvi-tools model.

Submodules and the model classes are imported on first use (PEP 562), so ``cellplm --help`` and
``import scvi_cellplm`` do not pay for torch, Lightning and scvi-tools until they are needed.
"""

from __future__ import annotations

import importlib
import logging

from ._constants import SLOTS
from ._exceptions import CellPLMError, CheckpointError, GeneAlignmentError, InputDataError
from ._presets import PAPER, PRESETS, SMALL_CPU

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_SUBMODULES = {"data", "datasets", "evaluation", "io", "module", "pretrain", "spatial", "train"}
_MODEL_CLASSES = {"CellPLM", "CellPLMAnnotator", "CellPLMPerturbation"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _MODEL_CLASSES:
        value = getattr(importlib.import_module(".model", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | _MODEL_CLASSES)


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
