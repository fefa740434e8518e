"""The command line and the README's Python example run as documented."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np

from scvi_cellplm.cli import main

README = Path(__file__).parents[1] / "README.md"


def test_demo_writes_h5ad_with_embedding_and_umap_png(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--max-epochs", "2", "--no-progress"]) == 0
    adata = ad.read_h5ad(tmp_path / "pancreas_cellplm.h5ad")
    assert adata.obsm["X_cellplm"].shape[0] == adata.n_obs == 1937
    assert "cellplm_leiden" in adata.obs and "X_umap_cellplm" in adata.obsm
    png = (tmp_path / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_embed_command(tmp_path, trained_small, small_pancreas):
    trained_small.save(tmp_path / "model")
    small_pancreas.write_h5ad(tmp_path / "in.h5ad")
    assert main(["embed", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "out.h5ad")]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_allclose(out.obsm["X_cellplm"], trained_small.get_latent_representation(),
                               atol=1e-5)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## In Python\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    adata = namespace["adata"]
    assert adata.obsm["X_cellplm"].shape == (adata.n_obs, 32)
    assert adata.layers["cellplm_denoised"].shape == adata.shape
    assert (tmp_path / "cellplm_model" / "model.pt").exists()
