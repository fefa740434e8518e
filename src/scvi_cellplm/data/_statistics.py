"""Per-gene statistics of registered data that a model is built from (panels, input centre)."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .._constants import REGISTRY_KEYS
from . import _windows


def measured_genes(adata_manager) -> np.ndarray:
    """``(n_dataset, n_vars)``: genes non-zero in at least one cell of each dataset."""
    x = sparse.csr_matrix(adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY))
    codes = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.DATASET_KEY)).ravel()
    n_dataset = adata_manager.summary_stats.get(f"n_{REGISTRY_KEYS.DATASET_KEY}", int(codes.max()) + 1)
    mask = np.zeros((n_dataset, x.shape[1]), dtype=bool)
    for d in range(n_dataset):
        block = x[codes == d]  # a copy: stored zeros are not measurements
        block.eliminate_zeros()
        mask[d] = block.getnnz(axis=0) > 0
    return mask


def log1p_means(adata_manager, dataset_gene_mask: np.ndarray | None) -> np.ndarray:
    """Mean ``log1p`` value of each registered gene over the cells whose dataset measured it.

    All cells count without datasets; rows are read ``READ_CHUNK_CELLS`` at a time.
    """
    x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    n_obs, n_vars = x.shape
    codes = None
    if dataset_gene_mask is not None:
        codes = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.DATASET_KEY)).ravel()
        mask = np.asarray(dataset_gene_mask, dtype=bool)
    total = np.zeros(n_vars)
    count = np.zeros(n_vars)
    chunk = _windows.READ_CHUNK_CELLS
    for start in range(0, n_obs, chunk):
        rows = np.arange(start, min(start + chunk, n_obs))
        block = _windows.read_log1p(x, rows)
        if codes is None:
            total += np.asarray(block.sum(0), dtype=np.float64).ravel()
            count += len(rows)
            continue
        measured = mask[codes[rows]]  # (rows, genes): only measured entries count
        total += np.asarray(block.multiply(measured).sum(0), dtype=np.float64).ravel()
        count += measured.sum(0)
    return (total / np.maximum(count, 1)).astype(np.float32)


def to_vocabulary(values: np.ndarray, index: np.ndarray | None, n_genes: int, fill=0) -> np.ndarray:
    """Place per-column ``values`` (last axis: input columns) on their vocabulary rows.

    ``index`` is each column's vocabulary row (-1: none; ``None``: the identity); vocabulary genes
    without a column get ``fill``.
    """
    values = np.asarray(values)
    if index is None:
        return values
    index = np.asarray(index)
    out = np.full((*values.shape[:-1], n_genes), fill, dtype=values.dtype)
    out[..., index[index >= 0]] = values[..., index >= 0]
    return out
