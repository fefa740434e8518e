"""scvi-tools model classes."""

from ._annotator import CellPLMAnnotator
from ._cellplm import CellPLM

__all__ = ["CellPLM", "CellPLMAnnotator"]
