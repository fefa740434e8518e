"""Small real datasets bundled with the package."""

from ._bundled import pancreas_demo

__all__ = ["pancreas_demo"]
