"""Streaming inference on backed AnnData: same embeddings as in memory, bounded memory."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pytest
from conftest import TINY
from scipy import sparse

import scvi_cellplm.data._windows as windows_mod
from scvi_cellplm import CellPLM

N_CELLS, MAX_CELLS = 12_000, 256


@pytest.fixture(scope="module")
def backed_path(tmp_path_factory, pancreas_session):
    """12,000 resampled pancreas cells x 2,000 genes in 2 samples (both above the window size)."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.integers(0, pancreas_session.n_obs, N_CELLS))
    adata = ad.AnnData(sparse.csr_matrix(pancreas_session.layers["counts"][rows], dtype=np.float32))
    adata.var_names = pancreas_session.var_names
    adata.obs_names = [f"c{i}" for i in range(N_CELLS)]
    adata.obs["sample"] = np.where(np.arange(N_CELLS) < 7_000, "s0", "s1")
    path = tmp_path_factory.mktemp("backed") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def _model(adata):
    CellPLM.setup_anndata(adata, sample_key="sample")
    return CellPLM(adata, max_cells_per_batch=MAX_CELLS, **TINY)


def test_backed_embeddings_equal_in_memory(backed_path, tmp_path):
    memory = ad.read_h5ad(backed_path)
    model = _model(memory)
    expected = model.get_latent_representation()
    backed = ad.read_h5ad(backed_path, backed="r")
    assert model.sentences(backed)[0].tolist() == model.sentences(memory)[0].tolist()
    np.testing.assert_allclose(model.get_latent_representation(backed), expected, atol=1e-6)
    # into an on-disk array, and into the backed file's own obsm (read back by anndata)
    import h5py

    with h5py.File(tmp_path / "z.h5", "w") as f:
        out = f.create_dataset("z", expected.shape, dtype=np.float32)
        assert model.get_latent_representation(backed, out=out) is out
        np.testing.assert_allclose(out[:], expected, atol=1e-6)
    backed.file.close()
    writable = ad.read_h5ad(backed_path, backed="r+")
    model.embed(writable, key_added="X_stream")
    writable.file.close()
    np.testing.assert_allclose(ad.read_h5ad(backed_path).obsm["X_stream"], expected, atol=1e-6)


def test_embedding_a_read_only_backed_file_says_how(backed_path):
    backed = ad.read_h5ad(backed_path, backed="r")
    model = _model(backed)
    with pytest.raises(Exception, match="backed='r\\+'"):
        model.embed(backed)
    backed.file.close()


def test_streaming_memory_is_bounded_by_the_window(backed_path, tmp_path, monkeypatch):
    """Python-side allocations (count reads, windowing) stay far below the count matrix itself:
    rows are read a chunk / a mini-batch at a time, never the whole matrix."""
    import h5py

    monkeypatch.setattr(windows_mod, "READ_CHUNK_CELLS", 500)
    monkeypatch.setattr(windows_mod, "WINDOW_PCA_CELLS", 1_000)
    backed = ad.read_h5ad(backed_path, backed="r")
    model = _model(backed)
    with h5py.File(backed_path, "r") as f:
        x_bytes = sum(f["X"][k].nbytes for k in ("data", "indices", "indptr"))
    with h5py.File(tmp_path / "z.h5", "w") as f:
        out = f.create_dataset("z", (N_CELLS, TINY["n_latent"]), dtype=np.float32)
        tracemalloc.start()
        model.get_latent_representation(backed, out=out)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # budget: the PCA fit's rows (x4 for log1p/float64 copies) plus 128 bytes per cell of index
    # arrays and windowing features; reading the whole matrix would need x_bytes
    budget = 4 * 1_000 * x_bytes / N_CELLS + 128 * N_CELLS
    assert peak < budget < x_bytes / 2, (peak, budget, x_bytes)
    backed.file.close()
