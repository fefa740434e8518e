"""Spatial sentences from squidpy neighbourhood graphs."""

from ._windows import CONNECTIVITIES_KEY, graph_windows, spatial_graph

__all__ = ["CONNECTIVITIES_KEY", "graph_windows", "spatial_graph"]
