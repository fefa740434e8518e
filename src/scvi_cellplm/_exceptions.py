"""Exceptions raised by scvi-cellplm (all subclasses of :class:`ValueError`)."""

from __future__ import annotations


class CellPLMError(ValueError):
    """Base class of the errors scvi-cellplm raises on bad input."""


class GeneAlignmentError(CellPLMError):
    """The AnnData's genes cannot be aligned to the model's gene vocabulary."""


class CheckpointError(CellPLMError):
    """A checkpoint or saved model is unreadable, unsafe, or does not fit the model."""


class InputDataError(CellPLMError):
    """The AnnData does not hold what the model needs (counts, keys, coordinates)."""
