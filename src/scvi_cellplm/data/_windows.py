"""How samples above the sentence budget are cut into windows, and the features they are cut in.

Samples with coordinates are cut along squidpy's spatial graph (:func:`~.graph_windows`); the
others by median bisection of an expression PCA (a truncated SVD of ``log1p`` counts, fitted on a
seeded subsample and projected chunk by chunk, so memory is bounded for any sample size and for
backed data).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import sparse

from .._constants import REGISTRY_KEYS
from ._graph import graph_windows, spatial_graph, usable_coordinates
from ._sentences import bisect_windows

WINDOW_PCA_CELLS = 20_000
"""Cells (a random subsample of a large sample) the windowing PCA is fitted on."""
READ_CHUNK_CELLS = 10_000
"""Rows read from the count matrix at a time while windowing and computing statistics."""

Windower = Callable[[np.ndarray], list[np.ndarray]]


def make_windower(adata_manager, max_cells: int) -> Windower:
    """Return the windower of :func:`~.make_sentences` for the data registered in ``adata_manager``.

    Samples whose cells all have usable coordinates (finite, at most ``MAX_COORDINATE``) are cut
    by spectral bisection of the spatial graph (``obsp['spatial_connectivities']`` when squidpy
    built it, else a kNN graph, computed once); the others by bisection of their expression PCA.
    """
    setup = adata_manager.registry["setup_args"]
    coords = usable = None
    if REGISTRY_KEYS.SPATIAL_KEY in adata_manager.data_registry:
        coords = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.SPATIAL_KEY), dtype=float)
        usable = usable_coordinates(coords)
    cache: dict = {}

    def graph():
        if "graph" not in cache:
            cache["graph"] = spatial_graph(
                adata_manager.adata, setup["spatial_key"],
                library_key=setup.get("sample_key") or setup.get("batch_key"),
            )
        return cache["graph"]

    def windower(members: np.ndarray) -> list[np.ndarray]:
        if coords is not None and usable[members].all():
            sub = graph()[members][:, members]
            return graph_windows(sub, max_cells, coords[members])
        x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        order = np.argsort(np.argsort(members))
        return bisect_windows(expression_features(x, np.sort(members))[order], max_cells)

    return windower


def read_log1p(x, rows: np.ndarray) -> sparse.csr_matrix:
    """``log1p`` of the sorted ``rows`` of ``x`` (in memory or backed) as float32 CSR."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # contiguous: a slice reads fastest
        block = x[int(rows[0]) : int(rows[-1]) + 1]
    else:
        block = x[rows]
    return sparse.csr_matrix(block, dtype=np.float32).log1p()


def expression_features(
    x, rows: np.ndarray, n_components: int = 10, n_fit: int | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """Compute a truncated SVD of log1p counts of the sorted ``rows`` of ``x``.

    Fitted on at most ``n_fit`` rows (a seeded random subsample) and projected ``chunk`` rows at
    a time, so memory is bounded for any number of cells and for backed data; the result is the
    same whether ``x`` is in memory or on disk.
    """
    from sklearn.decomposition import TruncatedSVD

    n_fit = WINDOW_PCA_CELLS if n_fit is None else n_fit
    chunk = READ_CHUNK_CELLS if chunk is None else chunk
    rows = np.asarray(rows)
    fit_rows = rows
    if len(rows) > n_fit:
        fit_rows = np.sort(np.random.default_rng(0).choice(rows, n_fit, replace=False))
    sample = sparse.vstack([read_log1p(x, fit_rows[i : i + chunk])
                            for i in range(0, len(fit_rows), chunk)], format="csr")
    n_comp = min(n_components, x.shape[1] - 1, len(fit_rows) - 1)
    if n_comp < 1:
        return np.vstack([read_log1p(x, rows[i : i + chunk]).toarray()
                          for i in range(0, len(rows), chunk)])
    svd = TruncatedSVD(n_components=n_comp, random_state=0).fit(sample)
    del sample
    features = np.empty((len(rows), n_comp), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        features[start : start + chunk] = svd.transform(read_log1p(x, rows[start : start + chunk]))
    return features
