"""Training plans."""

from ._adversary import BatchAdversary
from ._budget import get_max_steps_heuristic
from ._plan import CellPLMTrainingPlan

__all__ = ["BatchAdversary", "CellPLMTrainingPlan", "get_max_steps_heuristic"]
