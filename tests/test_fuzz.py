"""Fuzz: the public API on many randomly malformed small AnnData objects (seeded).

Each case either works (finite embeddings) or raises one of our documented exceptions
(:class:`~scvi_cellplm.CellPLMError` subclasses), and never leaves a partial file behind.
"""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_cellplm import CellPLM, CellPLMError

TINY = {"n_hidden": 8, "n_layers": 1, "n_heads": 2, "n_latent": 4, "n_clusters": 2}
DEFECTS = ["nan", "negative", "float", "zero_cells", "zero_genes", "dup_genes", "one_cell",
           "one_gene", "nan_batch", "bad_spatial_shape", "nan_spatial", "string_spatial", "int_counts",
           "huge_values", "csc", "no_batch_column"]


def _case(seed: int):
    rng = np.random.default_rng(seed)
    n_obs, n_vars = int(rng.integers(1, 40)), int(rng.integers(1, 25))
    x = rng.poisson(rng.random() * 3, size=(n_obs, n_vars)).astype(np.float32)
    defects = set(rng.choice(DEFECTS, size=int(rng.integers(1, 4)), replace=False))
    if "nan" in defects:
        x[rng.integers(n_obs), rng.integers(n_vars)] = np.nan
    if "negative" in defects:
        x[rng.integers(n_obs), rng.integers(n_vars)] = -2
    if "float" in defects:
        x = x + 0.37
    if "zero_cells" in defects:
        x[: max(1, n_obs // 3)] = 0
    if "zero_genes" in defects:
        x[:, : max(1, n_vars // 3)] = 0
    if "huge_values" in defects:
        x[0, 0] = 1e9
    if "one_cell" in defects:
        x = x[:1]
    if "one_gene" in defects:
        x = x[:, :1]
    n_obs, n_vars = x.shape
    mat = sp.csc_matrix(x) if "csc" in defects else sp.csr_matrix(x)
    if "int_counts" in defects:
        mat = mat.astype(np.int64) if np.isfinite(x).all() else mat
    adata = ad.AnnData(mat)
    names = [f"g{i}" for i in range(n_vars)]
    if "dup_genes" in defects and n_vars > 1:
        names[1] = names[0]
    adata.var_names = names
    adata.obs_names = [f"c{i}" for i in range(n_obs)]
    batch = rng.choice(["a", "b"], n_obs).astype(object)
    if "nan_batch" in defects:
        batch[0] = np.nan
    if "no_batch_column" not in defects:
        adata.obs["batch"] = pd.Categorical(batch)
    coords = rng.random((n_obs, 2)) * 100
    if "bad_spatial_shape" in defects:
        coords = rng.random((n_obs, 5))
    if "nan_spatial" in defects:
        coords[0] = np.nan
    adata.obsm["spatial"] = coords.astype(str) if "string_spatial" in defects else coords
    spatial = bool(rng.random() < 0.5)
    return adata, spatial, defects


@pytest.mark.parametrize("seed", range(40))
def test_public_api_on_malformed_input(seed, tmp_path):
    adata, spatial, defects = _case(seed)
    x_before = adata.X.copy()
    out = tmp_path / "model"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CellPLM.setup_anndata(adata, batch_key="batch", spatial_key="spatial" if spatial else None)
            model = CellPLM(adata, positional_encoding="sinusoidal" if spatial else "none", **TINY)
            model.train(max_epochs=1, enable_progress_bar=False, validation_size=0.0)
            z = model.get_latent_representation()
            assert z.shape == (adata.n_obs, TINY["n_latent"])
            assert np.isfinite(z).all(), defects
            model.save(out)
            CellPLM.load(out, adata=adata)
    except CellPLMError:
        pass
    except FloatingPointError as err:  # documented: non-finite training loss stops training
        assert "loss" in str(err)  # noqa: PT017
    finally:
        leftovers = [f for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp-")]
        assert not leftovers
    np.testing.assert_array_equal(sp.csr_matrix(adata.X).toarray(), sp.csr_matrix(x_before).toarray())
