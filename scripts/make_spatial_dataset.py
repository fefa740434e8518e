"""Build the bundled spatial dataset from ../shared/data (developers only; needs the shared folder).

MERFISH of U-2 OS cells, Xia et al. 2019 (PNAS), as shipped by novosparc 0.4.4 (BSD-3-Clause):
all 1,368 cells of the three batches with their micron coordinates, the 1,000 most variable
real genes (seurat_v3 on raw counts, by batch; blank control barcodes dropped), raw counts.
"""

from pathlib import Path

import numpy as np
import scanpy as sc

SRC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "merfish_u2os_spatial.h5ad"
OUT = Path(__file__).resolve().parents[1] / "src" / "scvi_cellplm" / "datasets" / "data"

adata = sc.read_h5ad(SRC)
adata = adata[:, ~adata.var["is_blank"].to_numpy()].copy()
sc.pp.highly_variable_genes(adata, n_top_genes=1000, flavor="seurat_v3", batch_key="batch")
small = adata[:, adata.var["highly_variable"].to_numpy()].copy()
small.var = small.var[["gene_ids"]].copy()
small.obs = small.obs[["batch"]].copy()
small.obsm = {"spatial": np.asarray(small.obsm["spatial"], dtype=np.float32)}
small.X = small.X.astype(np.float32)
small.uns = {
    "provenance": "Xia et al. 2019 PNAS MERFISH of U-2 OS cells via novosparc 0.4.4 (BSD-3-Clause); "
    "1,000 most variable non-blank genes (seurat_v3, batch_key='batch'); raw counts; "
    "obsm['spatial'] = cell centroids in microns (one frame per batch).",
}
small.write_h5ad(OUT / "merfish_u2os_demo.h5ad", compression="gzip")
print(small, (OUT / "merfish_u2os_demo.h5ad").stat().st_size / 1e6, "MB")
