"""The neighbourhood layer (``n_spatial_neighbors``): spatial kNN within sentences, convex mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY
from sklearn.neighbors import NearestNeighbors
from test_spatial import _grid

from scvi_cellplm import CellPLM
from scvi_cellplm._exceptions import InputDataError
from scvi_cellplm.module.neighbourhood import KNN_CHUNK, NeighbourhoodAttention, sentence_knn


def _points(n=300, seed=0):
    rng = np.random.default_rng(seed)
    coords = torch.as_tensor(rng.random((n, 2)) * 100)
    sentence = torch.as_tensor(rng.integers(0, 3, n))
    return coords, sentence


def test_neighbours_are_the_nearest_cells_of_the_same_sentence():
    coords, sentence = _points()
    index, valid = sentence_knn(coords, sentence, 5)
    assert valid.all()
    for s in range(3):
        rows = np.flatnonzero(sentence.numpy() == s)
        _, expected = NearestNeighbors(n_neighbors=6).fit(coords[rows]).kneighbors(coords[rows])
        np.testing.assert_array_equal(index[rows].numpy(), rows[expected[:, 1:]])  # self excluded


def test_cells_without_coordinates_have_no_neighbours_and_small_sentences_are_padded():
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [float("nan"), 0.0], [5.0, 5.0], [0.0, 2.0]])
    sentence = torch.tensor([0, 0, 0, 1, 0])
    index, valid = sentence_knn(coords, sentence, 3)
    assert not valid[2].any()  # no position
    assert not valid[3].any()  # alone in its sentence
    assert valid[0].tolist() == [True, True, False]  # two other positioned cells
    assert index[0, :2].tolist() == [1, 4]  # nearest first, the NaN cell is nobody's neighbour


def test_neighbourhood_mixing_is_convex_and_leaves_unpositioned_cells_unchanged():
    torch.manual_seed(0)
    layer = NeighbourhoodAttention(16, n_neighbors=4)
    coords, sentence = _points(50)
    coords[:10] = float("nan")
    h = torch.randn(50, 16)
    index, weights = layer.weights(h, coords, sentence)
    torch.testing.assert_close(weights.sum(1), torch.ones(50, dtype=weights.dtype))
    out = layer(h, coords, sentence)
    torch.testing.assert_close(out[:10], h[:10])  # only themselves
    gathered = h[index]
    assert (out >= gathered.min(1).values - 1e-6).all() and (out <= gathered.max(1).values + 1e-6).all()
    assert not torch.allclose(out[10:], h[10:])


def test_chunked_inference_equals_the_autograd_path():
    torch.manual_seed(0)
    layer = NeighbourhoodAttention(8, n_neighbors=3)
    coords, sentence = _points(KNN_CHUNK + 300)
    h = torch.randn(len(coords), 8)
    with torch.no_grad():
        chunked = layer(h, coords, sentence)
    torch.testing.assert_close(layer(h, coords, sentence).detach(), chunked)


def test_model_needs_coordinates_for_neighbours():
    adata = _grid(10)
    CellPLM.setup_anndata(adata, sample_key="fov")
    with pytest.raises(InputDataError, match="n_spatial_neighbors"):
        CellPLM(adata, n_spatial_neighbors=4, **TINY)


def test_neighbourhood_model_sees_who_is_next_to_whom_not_units(tmp_path):
    adata = _grid(12)
    # jittered: on an exact grid, equidistant neighbours would be ranked by float rounding
    adata.obsm["spatial"] += np.random.default_rng(0).random(adata.obsm["spatial"].shape) * 3
    CellPLM.setup_anndata(adata, sample_key="fov", spatial_key="spatial")
    model = CellPLM(adata, n_spatial_neighbors=4, **TINY)
    model.train(max_epochs=2, enable_progress_bar=False)
    z = model.get_latent_representation()
    moved = adata.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] * 3.0 - 40.0
    np.testing.assert_allclose(model.get_latent_representation(moved), z, atol=1e-5)
    shuffled = adata.copy()
    shuffled.obsm["spatial"] = adata.obsm["spatial"][np.random.default_rng(1).permutation(adata.n_obs)]
    assert not np.allclose(model.get_latent_representation(shuffled), z, atol=1e-3)
    model.save(tmp_path / "m")
    loaded = CellPLM.load(tmp_path / "m", adata=adata)
    assert loaded.module.neighbourhood is not None
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)
