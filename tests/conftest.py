"""Shared fixtures: the bundled pancreas data, the shared datasets, small trained models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scvi

import scvi_cellplm

SHARED_DATA = Path(os.environ.get("CELLPLM_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a file in ``../shared/data``; skips the test when the folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{name} (the developers' shared data folder), absent here")
    return path


@pytest.fixture(autouse=True)
def _seed():
    scvi.settings.seed = 0


@pytest.fixture(scope="session")
def pancreas_session():
    return scvi_cellplm.datasets.pancreas_demo()


@pytest.fixture
def pancreas(pancreas_session):
    """A fresh copy of the bundled pancreas demo (1,937 cells x 2,000 genes, 3 batches)."""
    return pancreas_session.copy()


@pytest.fixture
def small_pancreas(pancreas_session):
    """600 cells (200 per batch) x 300 genes: fast enough for many tests."""
    rng = np.random.default_rng(0)
    cells = np.concatenate([
        rng.choice(np.flatnonzero(pancreas_session.obs["batch"] == b), 200, replace=False)
        for b in pancreas_session.obs["batch"].cat.categories
    ])
    genes = np.argsort(-np.asarray(pancreas_session.X.sum(0)).ravel())[:300]
    return pancreas_session[np.sort(cells)][:, np.sort(genes)].copy()


@pytest.fixture(scope="session")
def vocabulary():
    """The 19,374 Ensembl ids of the official CellPLM checkpoint (``../shared/data/official``)."""
    import json

    return json.loads(shared_file("official/cellplm_20230926_85M.config.json").read_text())["gene_list"]


@pytest.fixture
def ensembl_pancreas(pancreas, vocabulary):
    """The bundled pancreas with Ensembl ids as var_names, restricted to the vocabulary."""
    keep = pancreas.var["gene_ids"].isin(vocabulary).to_numpy()
    adata = pancreas[:, keep].copy()
    adata.var_names = adata.var["gene_ids"].astype(str).to_numpy()
    return adata


TINY = {"n_hidden": 32, "n_layers": 1, "n_heads": 2, "n_latent": 8, "n_clusters": 4}
"""A tiny architecture for fast tests."""


@pytest.fixture
def trained_small(small_pancreas):
    """A tiny GMVAE CellPLM trained two epochs on ``small_pancreas`` (batch = sample)."""
    scvi_cellplm.CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = scvi_cellplm.CellPLM(small_pancreas, latent_distribution="gmvae", **TINY)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model
