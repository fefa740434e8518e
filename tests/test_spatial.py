"""Spatial sentences and positional encoding on real spatial data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import TINY, shared_file
from scipy import sparse

from scvi_cellplm import CellPLM
from scvi_cellplm.spatial import graph_windows, spatial_graph


@pytest.fixture
def merfish():
    adata = ad.read_h5ad(shared_file("merfish_u2os_spatial.h5ad"))
    adata = adata[:, ~adata.var["is_blank"].to_numpy()]
    genes = np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:200]
    return adata[:, np.sort(genes)].copy()


def _grid(n_side=30, seed=0):
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2).astype(float)
    coords = coords[rng.permutation(len(coords))]
    x = sparse.csr_matrix(rng.poisson(1.0, (len(coords), 20)).astype(np.float32))
    adata = ad.AnnData(x)
    adata.obsm["spatial"] = coords * 13.7 + 500  # microns, arbitrary origin
    adata.obs["fov"] = "section"
    return adata


def test_graph_windows_cover_every_cell_once_and_respect_budget():
    adata = _grid()
    graph = spatial_graph(adata)
    windows = graph_windows(graph, 100, adata.obsm["spatial"])
    flat = np.concatenate(windows)
    assert sorted(flat.tolist()) == list(range(adata.n_obs))
    assert max(len(w) for w in windows) <= 100
    # contiguous: each window's cells have most of their graph neighbours inside the window
    inside = []
    for w in windows:
        sub = graph[w]
        inside.append(sub[:, w].sum() / sub.sum())
    assert np.mean(inside) > 0.7


def test_existing_spatial_connectivities_are_reused(monkeypatch):
    adata = _grid()
    graph = sparse.identity(adata.n_obs, format="csr")
    adata.obsp["spatial_connectivities"] = graph
    import squidpy as sq

    monkeypatch.setattr(sq.gr, "spatial_neighbors_knn", lambda *a, **k: pytest.fail("rebuilt"))
    assert (spatial_graph(adata) != graph).nnz == 0


def test_building_the_graph_does_not_modify_adata():
    adata = _grid()
    before = set(adata.obsp.keys()), set(adata.uns.keys())
    spatial_graph(adata)
    assert (set(adata.obsp.keys()), set(adata.uns.keys())) == before


def test_large_sections_become_spatial_windows_with_one_embedding_per_cell():
    adata = _grid()
    CellPLM.setup_anndata(adata, sample_key="fov", spatial_key="spatial")
    model = CellPLM(adata, positional_encoding="sinusoidal", max_cells_per_batch=128, **TINY)
    sentences = model.sentences()
    assert max(len(s) for s in sentences) <= 128
    assert sorted(np.concatenate(sentences).tolist()) == list(range(adata.n_obs))
    spread = np.mean([adata.obsm["spatial"][s].std(0).sum() for s in sentences])
    assert spread < 0.6 * adata.obsm["spatial"].std(0).sum()
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, TINY["n_latent"]) and np.isfinite(z).all()


def test_positional_encoding_translation_scale_invariance_on_merfish(merfish):
    CellPLM.setup_anndata(merfish, batch_key="batch", spatial_key="spatial")
    model = CellPLM(merfish, positional_encoding="sinusoidal", **TINY)
    model.train(max_epochs=1, enable_progress_bar=False)
    z = model.get_latent_representation()
    moved = merfish.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] * 0.25 + 1000.0
    np.testing.assert_allclose(model.get_latent_representation(moved), z, atol=1e-4)
    shuffled = merfish.copy()
    shuffled.obsm["spatial"] = shuffled.obsm["spatial"][np.random.default_rng(0).permutation(merfish.n_obs)]
    assert not np.allclose(model.get_latent_representation(shuffled), z, atol=1e-3)


def test_3d_coordinates_are_accepted():
    adata = _grid()
    adata.obsm["spatial"] = np.c_[adata.obsm["spatial"], np.random.default_rng(0).random(adata.n_obs)]
    CellPLM.setup_anndata(adata, sample_key="fov", spatial_key="spatial")
    model = CellPLM(adata, positional_encoding="learned", **TINY)
    assert model.module.pos_encoder.n_dims == 3
    assert np.isfinite(model.get_latent_representation()).all()


def test_bundled_merfish_squidpy_workflow():
    """The issue's user story on the bundled MERFISH: windows, embeddings, squidpy analyses."""
    import scanpy as sc
    import squidpy as sq

    import scvi_cellplm

    adata = scvi_cellplm.datasets.merfish_u2os_demo()
    assert adata.obsm["spatial"].shape == (1368, 2) and set(adata.obs["batch"]) == {"B1", "B2", "B3"}
    sq.gr.spatial_neighbors_knn(adata, n_neighs=6, library_key="batch")
    CellPLM.setup_anndata(adata, layer="counts", sample_key="batch", spatial_key="spatial")
    model = CellPLM(adata, positional_encoding="sinusoidal", max_cells_per_batch=250, **TINY)
    sentences = model.sentences()
    assert max(map(len, sentences)) <= 250
    assert sorted(np.concatenate(sentences).tolist()) == list(range(adata.n_obs))
    batches = adata.obs["batch"].to_numpy()
    assert all(len(set(batches[s])) == 1 for s in sentences)  # windows never mix samples
    model.train(max_epochs=1, enable_progress_bar=False)
    model.embed(adata)
    sc.pp.neighbors(adata, use_rep="X_cellplm")
    sc.tl.leiden(adata, key_added="cellplm_leiden", flavor="igraph", n_iterations=2, directed=False)
    sq.gr.nhood_enrichment(adata, cluster_key="cellplm_leiden", n_perms=20, seed=0, show_progress_bar=False)
    n_clusters = adata.obs["cellplm_leiden"].nunique()
    assert adata.uns["cellplm_leiden_nhood_enrichment"]["zscore"].shape == (n_clusters, n_clusters)
