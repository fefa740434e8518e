"""CellPLM as an scvi-tools model: setup, training, outputs, invariances, save/load."""

from __future__ import annotations

import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY

from scvi_cellplm import CellPLM, InputDataError
from scvi_cellplm._constants import REGISTRY_KEYS
from scvi_cellplm.data import INDICES_KEY


def test_setup_anndata_registers_fields(small_pancreas):
    small_pancreas.obsm["spatial"] = np.random.default_rng(0).random((small_pancreas.n_obs, 2))
    small_pancreas.var["ids"] = "id_" + small_pancreas.var_names
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch",
                          labels_key="cell_type", spatial_key="spatial", gene_id_key="ids")
    model = CellPLM(small_pancreas, **TINY)
    registry = model.adata_manager.data_registry
    for key in (REGISTRY_KEYS.X_KEY, REGISTRY_KEYS.BATCH_KEY, REGISTRY_KEYS.SAMPLE_KEY,
                REGISTRY_KEYS.LABELS_KEY, REGISTRY_KEYS.SPATIAL_KEY):
        assert key in registry
    assert model.summary_stats.n_batch == 3
    assert model.summary_stats.n_labels == small_pancreas.obs["cell_type"].nunique()
    assert model.adata_manager.registry["setup_args"]["gene_id_key"] == "ids"
    assert model.gene_vocabulary == list(small_pancreas.var["ids"])
    model.view_anndata_setup()


def test_sample_key_defaults_to_batch_then_whole_anndata(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    assert len(CellPLM(small_pancreas, **TINY).sentences()) == 3
    CellPLM.setup_anndata(small_pancreas, layer="counts")
    assert len(CellPLM(small_pancreas, **TINY).sentences()) == 1


def test_missing_keys_are_named(small_pancreas):
    with pytest.raises(InputDataError, match="nope"):
        CellPLM.setup_anndata(small_pancreas, batch_key="nope")
    with pytest.raises(InputDataError, match="gene_id_key"):
        CellPLM.setup_anndata(small_pancreas, gene_id_key="nope")
    with pytest.raises(InputDataError, match="spatial"):
        CellPLM.setup_anndata(small_pancreas, spatial_key="spatial")


def test_outputs_shapes_dtypes_and_slots(trained_small, small_pancreas):
    z = trained_small.get_latent_representation()
    assert z.shape == (small_pancreas.n_obs, TINY["n_latent"]) and z.dtype == np.float32
    probs = trained_small.get_latent_representation(return_cluster_probs=True)
    assert probs.shape == (small_pancreas.n_obs, TINY["n_clusters"])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    expr = trained_small.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame) and expr.shape == small_pancreas.shape
    assert list(expr.index) == list(small_pancreas.obs_names)
    np.testing.assert_allclose(expr.to_numpy().sum(1), 1, rtol=1e-4)
    sub = trained_small.get_normalized_expression(indices=[5, 1], gene_list=list(small_pancreas.var_names[:3]),
                                                  library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(sub, expr.to_numpy()[[5, 1], :3] * 1e4, rtol=1e-4)
    trained_small.embed()
    trained_small.denoise()
    assert small_pancreas.obsm["X_cellplm"].shape == z.shape
    layer = small_pancreas.layers["cellplm_denoised"]
    lib = np.asarray(small_pancreas.layers["counts"].sum(1)).ravel()
    np.testing.assert_allclose(layer.sum(1), lib, rtol=1e-3)


def test_transform_batch_changes_decoding(trained_small):
    a = trained_small.get_normalized_expression(transform_batch=["human1_lib1"], return_numpy=True)
    b = trained_small.get_normalized_expression(transform_batch=["human1_lib2"], return_numpy=True)
    assert not np.allclose(a, b)


def test_eval_embeddings_are_deterministic(trained_small):
    z1 = trained_small.get_latent_representation()
    z2 = trained_small.get_latent_representation()
    np.testing.assert_array_equal(z1, z2)
    z_sample = trained_small.get_latent_representation(give_mean=False)
    assert not np.allclose(z1, z_sample)


def test_embedding_independent_of_batch_size(trained_small):
    z = trained_small.get_latent_representation()
    z_small = trained_small.get_latent_representation(batch_size=150)
    np.testing.assert_allclose(z, z_small, atol=1e-5)


def test_embedding_independent_of_cell_order_and_other_samples(trained_small, small_pancreas, tmp_path):
    z = trained_small.get_latent_representation()
    trained_small.save(tmp_path / "m")
    perm = np.random.default_rng(1).permutation(small_pancreas.n_obs)
    shuffled = small_pancreas[perm].copy()
    z_perm = CellPLM.load(tmp_path / "m", adata=shuffled).get_latent_representation()
    np.testing.assert_allclose(z_perm, z[perm], atol=1e-5)
    one = (small_pancreas.obs["batch"] == "human1_lib2").to_numpy()
    alone = small_pancreas[one].copy()
    z_alone = CellPLM.load(tmp_path / "m", adata=alone).get_latent_representation()
    np.testing.assert_allclose(z_alone, z[one], atol=1e-5)
    z_idx = trained_small.get_latent_representation(indices=np.flatnonzero(one)[::-1])
    np.testing.assert_allclose(z_idx, z[one][::-1], atol=1e-5)


def test_inference_batches_are_whole_samples(trained_small, small_pancreas):
    batches = list(trained_small._inference_batches(small_pancreas, None, 250))
    codes = small_pancreas.obs["batch"].to_numpy()
    for obs, tensors in batches:
        sentence = tensors["sentence"].numpy()
        for s in np.unique(sentence):
            assert len(np.unique(codes[obs[sentence == s]])) == 1
        assert len(obs) == len(tensors[INDICES_KEY])
    assert sorted(np.concatenate([o for o, _ in batches]).tolist()) == list(range(small_pancreas.n_obs))


def test_large_samples_are_windowed_not_chunked(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts")
    model = CellPLM(small_pancreas, max_cells_per_batch=128, **TINY)
    sentences = model.sentences()
    assert max(len(s) for s in sentences) <= 128
    assert sorted(np.concatenate(sentences).tolist()) == list(range(small_pancreas.n_obs))
    consecutive = [np.arange(i, min(i + 128, small_pancreas.n_obs)) for i in range(0, small_pancreas.n_obs, 128)]
    assert {tuple(s) for s in sentences} != {tuple(c) for c in consecutive}
    assert model.get_latent_representation().shape[0] == small_pancreas.n_obs


def test_sample_token_norm_model_saves_reads_genes_by_identity_and_maps_queries(small_pancreas, tmp_path):
    """A model whose tokens are normalised over their sample loads as it was saved, embeds a copy
    of its data with the genes in another order exactly as its own, and keeps its population
    statistics while a query (a new batch) is mapped onto it."""
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, token_norm="sample", **TINY)
    model.train(max_steps=20, max_cells_per_batch=64, enable_progress_bar=False)
    z = model.get_latent_representation()
    model.save(tmp_path / "model")
    loaded = CellPLM.load(tmp_path / "model", adata=small_pancreas.copy())
    assert loaded.module.sample_norm is not None
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    shuffled = small_pancreas[:, np.random.default_rng(0).permutation(small_pancreas.n_vars)].copy()
    np.testing.assert_allclose(model.get_latent_representation(shuffled), z, atol=1e-5)
    query = small_pancreas[small_pancreas.obs["batch"] == small_pancreas.obs["batch"].iloc[0]].copy()
    query.obs["batch"] = "new_lib"
    mapped = CellPLM.load_query_data(query, model)
    mapped.train(max_steps=5, enable_progress_bar=False)
    torch.testing.assert_close(mapped.module.sample_norm.running_mean, model.module.sample_norm.running_mean,
                               rtol=0, atol=0)
    np.testing.assert_allclose(mapped.get_latent_representation(small_pancreas.copy()), z, atol=1e-6)


def test_save_load_round_trip_gives_identical_embeddings(trained_small, small_pancreas, tmp_path):
    z = trained_small.get_latent_representation()
    trained_small.save(tmp_path / "model")
    loaded = CellPLM.load(tmp_path / "model", adata=small_pancreas.copy())
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    assert loaded.module.latent.embedding == "mean"  # the GMVAE's embedding rule is saved too
    assert loaded.module.input_target_sum == trained_small.module.input_target_sum == 1e4
    assert loaded.is_trained
    with pytest.raises(ValueError, match="exists"):
        trained_small.save(tmp_path / "model")
    trained_small.save(tmp_path / "model", overwrite=True, save_anndata=True)
    assert CellPLM.load(tmp_path / "model").adata.n_obs == small_pancreas.n_obs


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_training_reduces_masked_reconstruction_on_real_data(pancreas, latent):
    CellPLM.setup_anndata(pancreas, layer="counts", batch_key="batch")
    model = CellPLM(pancreas, latent_distribution=latent, max_cells_per_batch=700,
                    n_hidden=64, n_layers=1, n_heads=4, n_latent=16)
    model.train(max_epochs=15, enable_progress_bar=False, plan_kwargs={"n_steps_lr_warmup": 5})
    masked = model.history["recon_masked_validation"].to_numpy().ravel()
    cells = model.history["recon_cells_validation"].to_numpy().ravel()
    assert masked[-1] < 0.9 * masked[0]
    assert cells[-1] < 0.9 * cells[0]
    assert np.isfinite(model.get_latent_representation()).all()


def test_sdpa_attention_trains(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, attention="sdpa", **TINY)
    model.train(max_epochs=1, enable_progress_bar=False)
    assert model.get_latent_representation().shape == (small_pancreas.n_obs, TINY["n_latent"])


def test_mudata(small_pancreas):
    mdata = md.MuData({"rna": small_pancreas})
    CellPLM.setup_mudata(mdata, rna_layer="counts", batch_key="batch", modalities={
        "rna_layer": "rna", "batch_key": "rna"})
    model = CellPLM(mdata, **TINY)
    model.train(max_epochs=1, enable_progress_bar=False)
    assert model.get_latent_representation().shape == (small_pancreas.n_obs, TINY["n_latent"])


def test_inputs_are_not_modified(trained_small, small_pancreas):
    before = small_pancreas.layers["counts"].copy()
    x_before = small_pancreas.X.copy()
    trained_small.get_latent_representation()
    trained_small.get_normalized_expression()
    assert (small_pancreas.layers["counts"] != before).nnz == 0
    assert (small_pancreas.X != x_before).nnz == 0


def test_nan_loss_stops_training_with_a_hint(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    with torch.no_grad():
        model.module.embedder.gene_table.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning rate"):
        model.train(max_epochs=1, enable_progress_bar=False)


def test_training_after_inference_runs_in_train_mode(trained_small):
    trained_small.get_latent_representation()  # leaves the module in eval mode
    modes = []

    class Spy(__import__("lightning").pytorch.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            modes.append(pl_module.module.training)

    trained_small.train(max_epochs=1, enable_progress_bar=False, callbacks=[Spy()])
    assert modes and all(modes)
    assert not trained_small.module.training  # eval again afterwards
