"""Training plans."""

from ._budget import get_max_steps_heuristic
from ._plan import CellPLMTrainingPlan

__all__ = ["CellPLMTrainingPlan", "get_max_steps_heuristic"]
