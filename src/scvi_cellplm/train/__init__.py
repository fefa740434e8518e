"""Training plans."""

from ._plan import CellPLMTrainingPlan

__all__ = ["CellPLMTrainingPlan"]
