"""Gene selection for a model trained from scratch on many genes: its vocabulary."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

from .._constants import REGISTRY_KEYS

logger = logging.getLogger(__name__)


def highly_variable_genes(adata_manager, n_top_genes: int, counts: bool = True) -> np.ndarray:
    """Return a boolean mask of the ``n_top_genes`` most variable registered genes.

    scanpy's ``highly_variable_genes`` on the registered values, per registered batch when there
    are several: ``flavor="seurat_v3"`` on raw counts (as scvi-tools' tutorials select genes for
    scVI), ``flavor="seurat"`` on ``log1p`` of non-count values. Where ``seurat_v3`` cannot fit
    its per-batch trend (batches of a few cells), genes are selected over all cells instead.

    Parameters
    ----------
    adata_manager
        The model's :class:`~scvi.data.AnnDataManager`.
    n_top_genes
        Genes to keep.
    counts
        Whether the registered values are raw counts.

    Returns
    -------
    Mask over the registered columns, ``n_top_genes`` of them ``True``.
    """
    import scanpy as sc
    from anndata import AnnData
    from scipy import sparse

    x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    if hasattr(x, "to_memory"):  # backed sparse matrix
        x = x.to_memory()
    elif not (sparse.issparse(x) or isinstance(x, np.ndarray)):  # backed dense (h5py)
        x = np.asarray(x[()])
    x = sparse.csr_matrix(x, dtype=np.float32)
    data = AnnData(X=x)
    data.var_names = [str(i) for i in range(x.shape[1])]
    batch_key = None
    if REGISTRY_KEYS.BATCH_KEY in adata_manager.data_registry:
        batch = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).reshape(-1)
        if len(np.unique(batch)) > 1:
            data.obs["batch"] = pd.Categorical(batch.astype(str))
            batch_key = "batch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not counts:
            data.X = data.X.log1p() if data.X.min() >= 0 else data.X
            sc.pp.highly_variable_genes(data, n_top_genes=n_top_genes, flavor="seurat", batch_key=batch_key)
            return data.var["highly_variable"].to_numpy(bool)
        try:
            sc.pp.highly_variable_genes(data, n_top_genes=n_top_genes, flavor="seurat_v3",
                                        batch_key=batch_key)
        except ValueError:  # loess fails on tiny batches; rank over all cells
            sc.pp.highly_variable_genes(data, n_top_genes=n_top_genes, flavor="seurat_v3")
    return data.var["highly_variable"].to_numpy(bool)
