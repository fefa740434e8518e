"""Evaluation helpers for the downstream tasks (denoising by masked counts, clustering scores)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from anndata import AnnData
from scipy import sparse

from ._exceptions import InputDataError

__all__ = ["HeldOutCounts", "cluster_scores", "denoising_errors", "hold_out_counts"]


@dataclass(frozen=True)
class HeldOutCounts:
    """Entries removed from a count matrix: ``rows``, ``cols`` and their original ``values``."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


def hold_out_counts(
    adata: AnnData, layer: str | None = None, fraction: float = 0.1, seed: int = 0
) -> tuple[AnnData, HeldOutCounts]:
    """Copy ``adata`` with a random ``fraction`` of its non-zero counts set to zero.

    The paper's denoising evaluation: the model sees the corrupted counts and is scored on the
    held-out entries. The input AnnData is not modified.

    Returns
    -------
    The corrupted copy (counts in the same ``layer``) and the held-out entries.
    """
    if not 0 < fraction < 1:
        raise InputDataError(f"`fraction` must be in (0, 1), got {fraction}.")
    x = sparse.csr_matrix(adata.X if layer is None else adata.layers[layer], dtype=np.float32)
    coo = x.tocoo()
    rng = np.random.default_rng(seed)
    pick = rng.random(coo.nnz) < fraction
    held = HeldOutCounts(coo.row[pick], coo.col[pick], coo.data[pick].copy())
    data = coo.data.copy()
    data[pick] = 0
    corrupted = sparse.csr_matrix((data, (coo.row, coo.col)), shape=x.shape)
    corrupted.eliminate_zeros()
    out = adata.copy()
    if layer is None:
        out.X = corrupted
    else:
        out.layers[layer] = corrupted
    return out, held


def denoising_errors(prediction: np.ndarray, held_out: HeldOutCounts) -> dict[str, float]:
    """RMSE and MAE on the log1p scale between predicted and held-out counts."""
    pred = np.asarray(prediction)[held_out.rows, held_out.cols]
    diff = np.log1p(np.clip(pred, 0, None)) - np.log1p(held_out.values)
    return {"rmse": float(np.sqrt(np.mean(diff**2))), "mae": float(np.mean(np.abs(diff)))}


def cluster_scores(adata, use_rep: str, labels_key: str, resolution: float = 1.0, seed: int = 0):
    """Leiden clusters on a kNN graph of ``use_rep`` at a fixed resolution; ARI and NMI vs labels.

    One resolution for every method (no sweep picking the best score).
    """
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    key, graph = f"leiden_{use_rep}", f"neighbors_{use_rep}"
    sc.pp.neighbors(adata, use_rep=use_rep, key_added=graph, random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, neighbors_key=graph, key_added=key,
                 random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    labels = adata.obs[labels_key].to_numpy()
    clusters = adata.obs[key].to_numpy()
    return adjusted_rand_score(labels, clusters), normalized_mutual_info_score(labels, clusters), key
