"""Small real datasets bundled with the package."""

from ._bundled import merfish_u2os_demo, pancreas_demo

__all__ = ["merfish_u2os_demo", "pancreas_demo"]
