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

from scvi_cellplm import CellPLM, CellPLMError, InputDataError

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


# ------------------------------------------------------------------ coordinates
COORDINATE_VALUES = [np.nan, np.inf, -np.inf, 1e308, -1e308, 1e200, 1e31, -1e40, 1e29, 0.0, -5.0]


def _coordinate_case(seed: int):
    rng = np.random.default_rng(1000 + seed)
    n_obs = int(rng.integers(2, 60))
    x = rng.poisson(2.0, size=(n_obs, 12)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.var_names = [f"g{i}" for i in range(12)]
    adata.obs_names = [f"c{i}" for i in range(n_obs)]
    adata.obs["sample"] = pd.Categorical(rng.choice(["s1", "s2"], n_obs))
    coords = rng.normal(size=(n_obs, int(rng.choice([2, 3])))) * 10 ** rng.uniform(-3, 6)
    n_bad = int(rng.integers(0, n_obs + 1))
    rows = rng.choice(n_obs, n_bad, replace=False)
    cols = rng.integers(0, coords.shape[1], n_bad)
    coords[rows, cols] = rng.choice(COORDINATE_VALUES, n_bad)
    adata.obsm["spatial"] = coords
    return adata, rng


@pytest.mark.parametrize("seed", range(16))
def test_coordinates_fuzz_gives_finite_embeddings_or_one_line_error(seed):
    """Random mixes of NaN, ±inf, overflowing and ordinary coordinates: every cell gets a finite
    embedding (cells without a usable position get the 'missing position' encoding), or setup
    refuses with one line (no usable coordinate at all)."""
    adata, rng = _coordinate_case(seed)
    kwargs = {"positional_encoding": str(rng.choice(["sinusoidal", "learned"])),
              "n_spatial_neighbors": int(rng.integers(0, 4)),
              "max_cells_per_batch": int(rng.choice([8, 64]))}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CellPLM.setup_anndata(adata, sample_key="sample", spatial_key="spatial")
    except InputDataError as err:
        assert "\n" not in str(err) and "no usable coordinates" in str(err)  # noqa: PT017
        return
    model = CellPLM(adata, **TINY, **kwargs)
    if seed % 4 == 0:  # training sees the same coordinates
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(max_epochs=1, enable_progress_bar=False, validation_size=0.0)
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, TINY["n_latent"]) and np.isfinite(z).all()


# ------------------------------------------------------------------ arguments
@pytest.fixture(scope="module")
def argument_model():
    rng = np.random.default_rng(7)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, size=(30, 10)).astype(np.float32)))
    adata.var_names = [f"g{i}" for i in range(10)]
    adata.obs_names = [f"c{i}" for i in range(30)]
    adata.obs["batch"] = pd.Categorical(rng.choice(["a", "b"], 30))
    CellPLM.setup_anndata(adata, batch_key="batch")
    model = CellPLM(adata, **TINY)
    return model, model.get_latent_representation()


def _random_indices(rng, n: int):
    kind = rng.choice(["positions", "negative", "mask", "short_mask", "duplicates", "out_of_range",
                       "floats", "empty", "two_d", "names", "scalar", "tuple", "series_mask"])
    pick = rng.choice(n, int(rng.integers(1, n)), replace=False)
    if kind == "positions":
        return pick, pick
    if kind == "negative":
        return pick - n, pick
    if kind == "mask":
        mask = np.zeros(n, dtype=bool)
        mask[pick] = True
        return mask, np.flatnonzero(mask)
    if kind == "series_mask":
        mask = np.zeros(n, dtype=bool)
        mask[pick] = True
        return pd.Series(mask), np.flatnonzero(mask)
    if kind == "tuple":
        return tuple(int(i) for i in pick), pick
    if kind == "empty":
        return [], np.array([], dtype=int)
    return {
        "short_mask": np.ones(n - 1, dtype=bool), "duplicates": np.concatenate([pick, pick[:1]]),
        "out_of_range": np.append(pick, n), "floats": pick.astype(float) + 0.5,
        "two_d": pick.reshape(1, -1), "names": [f"c{i}" for i in pick], "scalar": 3,
    }[kind], None


@pytest.mark.parametrize("seed", range(30))
def test_argument_fuzz_gives_the_right_rows_or_one_line_error(argument_model, seed):
    """Random ``indices`` (positions, negatives, masks, duplicates, out of range, floats, names, ...)
    and ``out`` arrays (dtypes, shapes): the rows of the requested cells, or an InputDataError."""
    model, reference = argument_model
    rng = np.random.default_rng(seed)
    indices, expected = _random_indices(rng, 30)
    n_rows = len(expected) if expected is not None else 30
    out = None
    if rng.random() < 0.5:
        dtype = rng.choice([np.float32, np.float64, np.int64, np.int32, np.bool_, np.float16])
        shape = (n_rows + int(rng.choice([0, 0, 1])), TINY["n_latent"] - int(rng.choice([0, 0, 1])))
        out = np.zeros(shape, dtype=dtype)
    try:
        z = model.get_latent_representation(indices=indices, out=out)
    except InputDataError as err:
        assert "\n" not in str(err)  # noqa: PT017
        return
    assert expected is not None, (indices, "accepted")
    np.testing.assert_allclose(np.asarray(z, dtype=np.float64), reference[expected],
                               atol=1e-2 if z.dtype == np.float16 else 1e-6)
