"""Spatial sentences: windows of a tissue section cut along squidpy's neighbourhood graph."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._constants import COLUMNS, MAX_COORDINATE
from ._sentences import bisect_windows

logger = logging.getLogger(__name__)


def usable_coordinates(coords: np.ndarray) -> np.ndarray:
    """Return whether each cell (row) has a usable position.

    A row is usable when all its coordinates are finite and at most ``MAX_COORDINATE`` (1e30) in
    absolute value; other rows (NaN, ±inf, overflowing values) are "missing position", as the module
    reads them (:func:`~scvi_cellplm.module.positional.unusable_positions`).
    """
    coords = np.asarray(coords, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (np.isfinite(coords) & (np.abs(coords) <= MAX_COORDINATE)).all(axis=1)


def spatial_graph(
    adata: AnnData,
    spatial_key: str = "spatial",
    library_key: str | None = None,
    n_neighs: int = 6,
) -> sparse.csr_matrix:
    """Return the spatial neighbourhood graph of ``adata``.

    That is ``obsp['spatial_connectivities']`` when squidpy already built it, else a kNN graph from
    :func:`squidpy.gr.spatial_neighbors_knn` (one graph per ``library_key`` sample), computed
    without modifying ``adata``.
    """
    if COLUMNS.CONNECTIVITIES in adata.obsp:
        logger.info("Reusing adata.obsp[%r] for spatial windows.", COLUMNS.CONNECTIVITIES)
        return sparse.csr_matrix(adata.obsp[COLUMNS.CONNECTIVITIES])
    import squidpy as sq

    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    usable = usable_coordinates(coords)  # cells without a usable position sit at the median
    fill = np.median(coords[usable], axis=0) if usable.any() else np.zeros(coords.shape[1])
    coords = np.where(usable[:, None], coords, fill)
    obs = pd.DataFrame(index=adata.obs_names.copy())
    if library_key is not None:
        obs[library_key] = pd.Categorical(adata.obs[library_key].astype(str))
    light = AnnData(obs=obs, obsm={"spatial": coords})
    n_neighs = max(1, min(n_neighs, adata.n_obs - 1))
    result = sq.gr.spatial_neighbors_knn(light, spatial_key="spatial", library_key=library_key,
                                         n_neighs=n_neighs, copy=True)
    return sparse.csr_matrix(result.connectivities)


def _fiedler_order(graph: sparse.csr_matrix, fallback: np.ndarray) -> np.ndarray:
    """Cells ordered along the graph's Fiedler vector (spectral bisection)."""
    from scipy.sparse.csgraph import laplacian
    from scipy.sparse.linalg import ArpackError, eigsh

    n = graph.shape[0]
    sym = ((graph + graph.T) > 0).astype(np.float64)
    lap = laplacian(sym, normed=True)
    shifted = 2.0 * sparse.identity(n) - lap  # largest eigenvectors of 2I - L = smallest of L
    try:
        _, vecs = eigsh(shifted, k=2, which="LA", v0=np.ones(n), maxiter=5000, tol=1e-6)
        key = vecs[:, 0]
    except (ArpackError, ValueError):
        key = fallback
    return np.lexsort((fallback, key))


def graph_windows(
    graph: sparse.spmatrix, max_cells: int, coords: np.ndarray | None = None
) -> list[np.ndarray]:
    """Cut a graph's nodes into windows of at most ``max_cells`` connected, compact cells.

    Recursive spectral bisection: each oversized part is ordered along the Fiedler vector of
    its own subgraph and cut into two balanced halves. Every node lands in exactly one window.
    """
    graph = sparse.csr_matrix(graph)
    n = graph.shape[0]
    if coords is None:
        coords = np.zeros((n, 1))
    fallback_axis = np.asarray(coords, dtype=np.float64)
    out: list[np.ndarray] = []
    stack = [np.arange(n)]
    while stack:
        idx = stack.pop()
        if len(idx) <= max_cells:
            out.append(np.sort(idx))
            continue
        if len(idx) < 8:
            out.extend(bisect_windows(fallback_axis[idx], max_cells))
            continue
        sub = graph[idx][:, idx]
        spread = fallback_axis[idx]
        axis = int(np.argmax(np.ptp(spread, axis=0))) if spread.shape[1] else 0
        order = _fiedler_order(sub, spread[:, axis])
        n_parts = int(np.ceil(len(idx) / max_cells))
        cut = int(round(len(idx) * (n_parts // 2) / n_parts))
        stack.extend([idx[order[cut:]], idx[order[:cut]]])
    return out
