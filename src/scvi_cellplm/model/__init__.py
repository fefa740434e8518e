"""scvi-tools model classes."""

from ._annotator import CellPLMAnnotator
from ._cellplm import CellPLM
from ._perturbation import CellPLMPerturbation

__all__ = ["CellPLM", "CellPLMAnnotator", "CellPLMPerturbation"]
