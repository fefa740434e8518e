"""Spatial workflows (gene imputation from a reference) and the spatial graph helpers."""

from ..data import graph_windows, spatial_graph
from ._impute import impute_genes, joint_anndata

__all__ = ["graph_windows", "impute_genes", "joint_anndata", "spatial_graph"]
