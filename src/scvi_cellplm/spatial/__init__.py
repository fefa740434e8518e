"""Spatial CellPLM: sentences from squidpy neighbourhood graphs, gene imputation."""

from ._impute import impute_genes, joint_anndata
from ._windows import CONNECTIVITIES_KEY, graph_windows, spatial_graph

__all__ = ["CONNECTIVITIES_KEY", "graph_windows", "impute_genes", "joint_anndata", "spatial_graph"]
