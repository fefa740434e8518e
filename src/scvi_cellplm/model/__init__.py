"""scvi-tools model classes."""

from ._cellplm import CellPLM

__all__ = ["CellPLM"]
