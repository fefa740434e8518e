"""Training defaults a user relies on: ``CellPLM(adata)`` then ``train()`` with no arguments.

``benchmarks/quality.py`` measures what these defaults give (docs/user_guide/quality.md); these
tests pin down what they are: an optimisation budget in steps, training sentences of at most 256
random cells drawn anew every epoch (inference still reads whole samples), a 10-dimensional VAE
latent, and a vocabulary of the most variable genes when the data has many.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import scvi_cellplm
from scvi_cellplm import CellPLM
from scvi_cellplm.data import SentenceDataSplitter, random_sentences
from scvi_cellplm.train import get_max_steps_heuristic

from .conftest import TINY


def test_random_sentences_cover_each_sample_once_and_change_every_epoch():
    codes = np.repeat([0, 1, 2], [1300, 200, 513])
    idx = np.flatnonzero(np.arange(len(codes)) % 7 != 0)  # some cells held out
    first = random_sentences(codes, 512, idx, np.random.default_rng([0, 0]))
    again = random_sentences(codes, 512, idx, np.random.default_rng([0, 0]))
    second = random_sentences(codes, 512, idx, np.random.default_rng([0, 1]))
    for sentences in (first, second):
        cells = np.concatenate(sentences)
        assert np.array_equal(np.sort(cells), idx)  # every cell exactly once
        assert all(len(s) <= 512 for s in sentences)
        assert all(len(np.unique(codes[s])) == 1 for s in sentences)  # within one sample
    sizes = sorted(len(s) for s in first if codes[s[0]] == 0)
    assert sizes[-1] - sizes[0] <= 1  # near-equal parts, not 512 + 512 + rest
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # seeded
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))  # new company each epoch


def test_step_budget_follows_data_size_within_bounds():
    assert get_max_steps_heuristic(2_000, 512) == 1_563  # 400 passes over 2,000 cells
    assert get_max_steps_heuristic(200, 512) == 1_000  # a full schedule even on tiny data
    assert get_max_steps_heuristic(100_000, 512) == 15_625  # scvi-tools' 8e6 cell passes
    assert get_max_steps_heuristic(10_000_000, 512) == 15_625  # no more passes on larger data
    assert get_max_steps_heuristic(10_000_000, 128) == 20_000  # at most 20,000 steps
    sizes = [100, 1_000, 5_000, 20_000, 50_000, 1_000_000]
    steps = [get_max_steps_heuristic(n, 512) for n in sizes]
    assert steps == sorted(steps)


def test_train_without_arguments_trains_the_step_budget_on_256_cell_random_sentences(small_pancreas, monkeypatch):
    import scvi_cellplm.model._base as base

    seen = {}

    def budget(n_cells, cells_per_step):
        seen.update(n_cells=n_cells, cells=cells_per_step)
        return 25

    monkeypatch.setattr(base, "get_max_steps_heuristic", budget)
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    model.train(enable_progress_bar=False)
    assert seen == {"n_cells": pytest.approx(0.9 * small_pancreas.n_obs, abs=3), "cells": 256}
    splitter = model._data_splitter(256, 0.1, 0, "random")
    assert splitter.train_sentences == "random"
    batches = list(splitter.train_dataloader().sampler)
    assert max(sum(len(s) for s in b) for b in batches) <= 256
    steps_per_epoch = len(batches)
    assert model.trainer.global_step == -(-25 // steps_per_epoch) * steps_per_epoch  # >= budget, whole epochs
    assert model.max_cells_per_batch == 4000  # inference keeps whole samples


def test_max_steps_sets_the_budget(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    model.train(max_steps=7, enable_progress_bar=False)
    assert model.trainer.global_step == 7


def test_training_sentences_can_be_the_inference_windows(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    model.train(max_epochs=1, max_cells_per_batch=64, train_sentences="windows", enable_progress_bar=False)
    splitter = model._data_splitter(64, 0.1, 0, "windows")
    sampler = splitter.train_dataloader().sampler
    first = [np.concatenate(b) for b in sampler]
    sampler.set_epoch(1)
    second = [np.concatenate(b) for b in sampler]
    assert model.trainer.global_step == len(first)
    # the same windows every epoch, only their order changes
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))
    with pytest.raises(scvi_cellplm.InputDataError, match="train_sentences"):
        SentenceDataSplitter(model.adata_manager, np.zeros(small_pancreas.n_obs, int), 64,
                             train_sentences="shuffled")


def test_random_training_sentences_see_every_training_cell_once_per_epoch(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    splitter = model._data_splitter(64, 0.1, 3, "random")
    sampler = splitter.train_dataloader().sampler
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        cells = np.concatenate([np.concatenate(b) for b in sampler])
        assert np.array_equal(np.sort(cells), splitter.train_idx)
        epochs.append([np.sort(s) for b in sampler for s in b])
    assert len(epochs[0]) == len(epochs[1])
    assert any(not np.array_equal(a, b) for a, b in zip(epochs[0], epochs[1]))


def _many_genes(n_cells=300, n_genes=2_600, seed=0) -> AnnData:
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.3, 1.0, size=n_genes)
    groups = rng.integers(0, 3, n_cells)
    marker = np.zeros((3, n_genes))
    for g in range(3):
        marker[g, rng.choice(n_genes, 40, replace=False)] = 8.0
    counts = rng.poisson(base + marker[groups]).astype(np.float32)
    adata = AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"GENE{i}" for i in range(n_genes)]
    adata.obs["batch"] = np.where(np.arange(n_cells) < n_cells // 2, "a", "b")
    return adata


def test_many_genes_get_a_vocabulary_of_the_most_variable():
    adata = _many_genes()
    CellPLM.setup_anndata(adata, batch_key="batch")
    model = CellPLM(adata, **TINY)
    assert len(model.gene_vocabulary) == 2000
    assert set(model.gene_vocabulary) <= set(adata.var_names)
    assert list(model.gene_vocabulary) == [g for g in adata.var_names if g in set(model.gene_vocabulary)]
    assert model.gene_alignment(adata).summary().startswith("2000 of the model's 2000 vocabulary genes")
    # the genes that tell the groups apart are kept
    variances = np.asarray(adata.X.power(2).mean(0) - np.square(adata.X.mean(0))).ravel()
    top = set(adata.var_names[np.argsort(-variances)[:100]])
    assert len(top & set(model.gene_vocabulary)) >= 95
    # the embedding reads genes by identity: permuted columns, same cells, same embedding
    model.train(max_steps=3, enable_progress_bar=False)
    z = model.get_latent_representation()
    perm = adata[:, np.random.default_rng(1).permutation(adata.n_vars)].copy()
    assert np.abs(model.get_latent_representation(perm) - z).max() < 1e-5


def test_gene_selection_can_be_turned_off_or_bypassed():
    adata = _many_genes(n_genes=2_100)
    CellPLM.setup_anndata(adata, batch_key="batch")
    assert len(CellPLM(adata, n_top_genes=None, **TINY).gene_vocabulary) == 2_100
    assert len(CellPLM(adata, n_top_genes=3_000, **TINY).gene_vocabulary) == 2_100
    chosen = list(adata.var_names[::3])
    assert CellPLM(adata, gene_vocabulary=chosen, **TINY).gene_vocabulary == chosen


def test_selected_vocabulary_survives_save_and_load(tmp_path):
    adata = _many_genes(n_genes=2_100)
    CellPLM.setup_anndata(adata, batch_key="batch")
    model = CellPLM(adata, **TINY)
    model.save(tmp_path / "m")
    loaded = CellPLM.load(tmp_path / "m", adata)
    assert loaded.gene_vocabulary == model.gene_vocabulary
    assert np.allclose(loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6)


def test_default_latent_is_a_10_dimensional_vae_and_the_gmvae_stays_available(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas)
    assert model.module.latent_distribution == "vae"
    assert model.get_latent_representation().shape == (small_pancreas.n_obs, 10)  # scVI's n_latent
    assert scvi_cellplm.SMALL_CPU["latent_distribution"] == "vae"  # the preset names the default
    assert scvi_cellplm.SMALL_CPU["n_latent"] == 10
    with pytest.raises(scvi_cellplm.InputDataError, match="gmvae"):
        model.get_latent_representation(return_cluster_probs=True)
    gmvae = CellPLM(small_pancreas, latent_distribution="gmvae", **TINY)
    assert gmvae.get_latent_representation(return_cluster_probs=True).shape == (small_pancreas.n_obs, 4)


def test_kl_warm_up_can_span_the_whole_run(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    model.train(max_steps=9, enable_progress_bar=False)
    assert model.trainer.lightning_module.n_steps_kl_warmup == 200  # the default: 200 steps
    model.train(max_steps=9, enable_progress_bar=False, plan_kwargs={"n_steps_kl_warmup": "all"})
    assert model.trainer.lightning_module.n_steps_kl_warmup == 9 == model.trainer.global_step
    with pytest.raises(scvi_cellplm.InputDataError, match="n_steps_kl_warmup"):
        model.train(max_steps=2, enable_progress_bar=False, plan_kwargs={"n_steps_kl_warmup": "half"})


def test_adamw_eps_is_a_training_plan_setting(small_pancreas):
    # the optimiser screens of docs/user_guide/quality.md set scvi-tools' eps (0.01) this way
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    for plan_kwargs, eps in (({}, 1e-8), ({"eps": 0.01}, 0.01)):
        model.train(max_steps=2, enable_progress_bar=False, plan_kwargs=plan_kwargs)
        assert model.trainer.lightning_module.optimizers().optimizer.defaults["eps"] == eps
    assert model.trainer.gradient_clip_val == 1.0  # the default clipping


def test_learning_rate_is_smaller_without_batches_to_remove(small_pancreas):
    """One registered batch: 2e-4; two or more (the adversary removes them): 1e-3; ``lr=`` wins."""
    def trained_lr(adata, train=None, **setup):
        CellPLM.setup_anndata(adata, layer="counts", **setup)
        model = CellPLM(adata, **TINY)
        model.train(max_steps=2, enable_progress_bar=False, **(train or {}))
        plan = model.trainer.lightning_module
        return plan.lr, plan.optimizers().optimizer.defaults["lr"]

    one = small_pancreas[small_pancreas.obs["batch"] == small_pancreas.obs["batch"].iloc[0]].copy()
    assert trained_lr(one) == (2e-4, 2e-4)  # no batch key
    assert trained_lr(one.copy(), batch_key="batch")[0] == 2e-4  # a batch key with one batch
    assert trained_lr(small_pancreas.copy(), batch_key="batch")[0] == 1e-3
    assert trained_lr(small_pancreas.copy(), sample_key="batch")[0] == 2e-4  # samples are not batches
    assert trained_lr(one.copy(), {"lr": 5e-4})[0] == 5e-4
    assert trained_lr(one.copy(), {"plan_kwargs": {"lr": 3e-3}})[0] == 3e-3
    one.obsm["spatial"] = np.random.default_rng(0).random((one.n_obs, 2))
    assert trained_lr(one, spatial_key="spatial")[0] == 1e-3  # spatial training keeps its rate


def test_pretraining_and_imputation_keep_every_gene_of_their_vocabulary():
    """n_top_genes selects genes of a user AnnData only: a corpus keeps its whole vocabulary."""
    import anndata as ad
    from conftest import shared_file

    from scvi_cellplm.pretrain import Corpus, build_model

    pbmc = ad.read_h5ad(shared_file("pbmc3k_raw.h5ad"))[:64, :3000].copy()
    pbmc.var_names_make_unique()
    corpus = Corpus([pbmc], 64, gene_id_key="gene_ids")
    model = build_model(corpus, dict(TINY))
    assert len(model.gene_vocabulary) == corpus.n_genes > 2000
