"""Pretraining at scale: corpus of files, masks of disjoint panels, DDP, kill-and-resume, CLI."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, shared_file
from pretrain_helpers import FAST as PRETRAIN_FAST
from pretrain_helpers import Crash, CrashAt, RecordCells, one_thread  # noqa: F401  (fixture)
from scipy import sparse

from scvi_cellplm import CellPLM
from scvi_cellplm.data import INDICES_KEY
from scvi_cellplm.pretrain import (
    PADDING_KEY,
    Corpus,
    CorpusDataset,
    CorpusSampler,
    build_model,
    load_pretrained,
    pretrain,
)
from scvi_cellplm.train import CellPLMTrainingPlan

FAST = {**PRETRAIN_FAST, "model_kwargs": TINY}


pytestmark = pytest.mark.usefixtures("one_thread")


def _subset(path, n_cells: int, n_genes: int, seed: int) -> ad.AnnData:
    """Real cells of a shared file, its ``n_genes`` most expressed genes, written uncompressed."""
    adata = ad.read_h5ad(path)
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, n_cells, replace=False))
    genes = np.sort(np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:n_genes])
    sub = adata[cells][:, genes].copy()
    sub.X = sparse.csr_matrix(sub.X, dtype=np.float32)
    return sub


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """Three real datasets with different panels: human pancreas (3 batches), human PBMC, mouse.

    Human and mouse panels are disjoint (Ensembl ids ENSG vs ENSMUSG); the two human panels overlap.
    """
    root = tmp_path_factory.mktemp("corpus")
    baron = _subset(shared_file("baron_human_pancreas.h5ad"), 240, 300, 0)
    pbmc = _subset(shared_file("pbmc3k_raw.h5ad"), 150, 300, 1)
    pbmc.obs["batch"] = "pbmc"
    mouse = _subset(shared_file("mouse_10k_subset.h5ad"), 150, 200, 2)
    mouse.obs["batch"] = np.where(np.arange(mouse.n_obs) % 2, "m1", "m2")
    paths = {}
    for name, adata in (("baron", baron), ("pbmc", pbmc), ("mouse", mouse)):
        paths[name] = str(root / f"{name}.h5ad")
        adata.write_h5ad(paths[name])
    return paths


def _corpus(files, max_cells=64, **kwargs) -> Corpus:
    return Corpus(list(files.values()), max_cells, gene_id_key="gene_ids", batch_key="batch", **kwargs)


# ---------------------------------------------------------------- corpus
def test_corpus_vocabulary_masks_and_exact_reads(corpus_files):
    corpus = _corpus(corpus_files)
    files = {k: ad.read_h5ad(v) for k, v in corpus_files.items()}
    ids = {k: [g for g in a.var["gene_ids"] if g.startswith("ENS")] for k, a in files.items()}
    assert corpus.vocabulary == sorted(set().union(*ids.values()))
    assert corpus.n_cells == sum(a.n_obs for a in files.values())
    for d, name in enumerate(files):
        np.testing.assert_array_equal(corpus.gene_mask[d], np.isin(corpus.vocabulary, ids[name]))
    # each sentence: one sample, within budget, and its counts exactly the file's
    seen = []
    for i in range(corpus.n_sentences):
        d, rows = corpus.sentence(i)
        adata = list(files.values())[d]
        assert len(rows) <= 64
        assert adata.obs["batch"].iloc[rows].nunique() == 1
        x = corpus.read(d, rows).toarray()
        vocab_pos = pd.Index(corpus.vocabulary).get_indexer(adata.var["gene_ids"])
        keep = vocab_pos >= 0
        np.testing.assert_array_equal(x[:, vocab_pos[keep]], adata.X[rows][:, keep].toarray())
        assert x[:, ~corpus.gene_mask[d]].sum() == 0
        seen.append(corpus.offsets[d] + rows)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(corpus.n_cells))
    assert len(corpus.batch_categories) == 3 + 1 + 2
    assert corpus.batch_categories[0].startswith("baron/")


def test_corpus_accepts_anndata_mudata_and_backed(corpus_files):
    import mudata as md

    mem = ad.read_h5ad(corpus_files["pbmc"])
    backed = ad.read_h5ad(corpus_files["baron"], backed="r")
    mdata = md.MuData({"rna": ad.read_h5ad(corpus_files["mouse"])})
    corpus = Corpus([backed, mem, mdata], 64, gene_id_key="gene_ids", names=["b", "p", "m"])
    reference = _corpus(corpus_files)
    assert corpus.vocabulary == reference.vocabulary
    np.testing.assert_array_equal(corpus.gene_mask, reference.gene_mask)
    d, rows = corpus.sentence(corpus.n_sentences - 1)
    assert (corpus.read(d, rows) != reference.read(d, rows)).nnz == 0
    from anndata.experimental import AnnCollection

    # an AnnCollection contributes each of its AnnData with its full panel (not the joined genes)
    human = {k: corpus_files[k] for k in ("baron", "pbmc")}
    collection = AnnCollection([ad.read_h5ad(v) for v in human.values()], join_vars="inner")
    from_collection = Corpus(collection, 64, gene_id_key="gene_ids")
    np.testing.assert_array_equal(from_collection.gene_mask, _corpus(human).gene_mask)


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_deals_every_cell_once_across_ranks(world):
    sizes = np.random.default_rng(world).integers(1, 60, 37)
    for epoch in (0, 1):
        ranks = [CorpusSampler(sizes, 64, seed=3, num_replicas=world, rank=r) for r in range(world)]
        for s in ranks:
            s.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        assert len({len(b) for b in batches}) == 1  # ranks stay in step
        real = [i for b in batches for ids, pad in b if not pad for i in ids]
        assert sorted(real) == list(range(len(sizes)))
        assert all(sizes[ids].sum() <= 64 for b in batches for ids, _ in b)
    e0 = CorpusSampler(sizes, 64, seed=3).global_batches(0)
    e1 = CorpusSampler(sizes, 64, seed=3).global_batches(1)
    assert [list(b) for b, _ in e0] != [list(b) for b, _ in e1]


def test_sampler_pads_only_when_no_batch_can_be_split():
    sampler = CorpusSampler(np.array([64, 64, 64]), 64, num_replicas=2, rank=1)
    batches = sampler.global_batches()
    assert [pad for _, pad in batches] == [False, False, False, True]


# ---------------------------------------------------------------- masks of disjoint panels
def test_disjoint_panels_train_with_their_own_masks(corpus_files):
    """Human and mouse panels share no gene: each cell is embedded from, and reconstructs, only the
    genes its dataset measured; the others get no gradient (they are never read as zeros)."""
    corpus = _corpus({k: corpus_files[k] for k in ("baron", "mouse")})
    human, mouse = corpus.gene_mask
    assert human.any() and mouse.any() and not (human & mouse).any()
    model = build_model(corpus, TINY)
    module = model.module
    assert not module.embed_shared_genes
    np.testing.assert_array_equal(module.dataset_gene_mask.numpy(), corpus.gene_mask)
    plan = CellPLMTrainingPlan(module)
    dataset = CorpusDataset(corpus)
    mouse_sentences = np.flatnonzero(corpus.sentence_dataset == 1)[:2]
    batch = dataset[(mouse_sentences, False)]
    batch.pop(PADDING_KEY)
    torch.manual_seed(0)
    corrupted, mask = plan._corrupt(batch, drop_cells=False)
    valid = module.measured_genes(len(corrupted["X"]), corrupted["X"].shape[1], corrupted["dataset"])
    assert torch.equal(valid, torch.as_tensor(mouse).expand_as(valid))
    _, _, out = plan.forward(corrupted, inference_kwargs={"input_mask": mask},
                             loss_kwargs={"input_mask": mask, "kl_weight": 1.0})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    mean_grad = module.decoder.mean.weight.grad.abs().sum(1)
    theta_grad = module.decoder.log_theta.grad.abs()
    table_grad = module.embedder.gene_table.grad.abs().sum(1)
    human, mouse = torch.as_tensor(human), torch.as_tensor(mouse)
    assert theta_grad[human].sum() == 0 and table_grad[human].sum() == 0
    # the decoder's means are renormalised over measured genes: zero up to rounding
    assert mean_grad[human].max() < 1e-4 * mean_grad[mouse].max()
    for grad in (mean_grad, theta_grad, table_grad):
        assert grad[mouse].sum() > 0
    # with the intersection (empty here) every cell would get the same embedding; not so
    module.eval()
    with torch.no_grad():
        h = module.embed(corrupted["X"], corrupted["sentence"])
    assert h.std(0).mean() > 1e-3


def test_pretrain_disjoint_panels_end_to_end(corpus_files, tmp_path):
    corpus = _corpus({k: corpus_files[k] for k in ("baron", "mouse")})
    model = pretrain(corpus, tmp_path, max_steps=3, checkpoint_every=10, **FAST)
    assert model.is_trained_
    assert model.module.dataset_gene_mask is None
    # the saved model loads as a normal CellPLM on data whose genes are the vocabulary
    mouse = ad.read_h5ad(corpus_files["mouse"])
    x = sparse.csr_matrix((mouse.n_obs, corpus.n_genes), dtype=np.float32)
    x = sparse.lil_matrix(x)
    pos = pd.Index(corpus.vocabulary).get_indexer(mouse.var["gene_ids"])
    x[:, pos] = mouse.X
    adata = ad.AnnData(sparse.csr_matrix(x), var=pd.DataFrame(index=corpus.vocabulary))
    loaded = CellPLM.load(str(tmp_path / "model"), adata=adata)
    z = loaded.get_latent_representation(adata)
    assert z.shape == (mouse.n_obs, TINY["n_latent"]) and np.isfinite(z).all()
    # ... and on any genes (here mouse symbols) through the vocabulary alignment
    CellPLM.setup_anndata(mouse, gene_id_key="gene_ids")
    aligned = load_pretrained(tmp_path, mouse)
    np.testing.assert_allclose(aligned.get_latent_representation(mouse), z, atol=1e-5)
    meta = json.loads((tmp_path / "corpus.json").read_text())
    assert meta["vocabulary"] == corpus.vocabulary


# ---------------------------------------------------------------- kill and resume
def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_kill_and_resume_gives_the_uninterrupted_weights(corpus_files, tmp_path):
    """Crash after k steps (the last checkpoint is mid-epoch), resume: the run crosses an epoch
    boundary and ends with the weights, to float precision, of an uninterrupted run."""
    corpus = _corpus(corpus_files, max_cells=96)
    n_per_epoch = len(CorpusSampler(corpus.sentence_sizes, 96))
    crash = n_per_epoch - 1  # checkpoints every 3 steps: the last one is before the crash
    assert n_per_epoch >= 5 and crash % 3
    kwargs = {**FAST, "max_cells_per_batch": 96, "max_steps": n_per_epoch + 3, "checkpoint_every": 3,
              "seed": 7, "plan_kwargs": {"n_steps_lr_warmup": 2}}
    reference = _weights(pretrain(corpus, tmp_path / "a", **kwargs))
    with pytest.raises(Crash):
        pretrain(corpus, tmp_path / "b", callbacks=[CrashAt(crash)], **kwargs)
    last = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 * (crash // 3) and last["epoch"] == 0
    assert not (tmp_path / "b" / "model").exists()
    resumed = _weights(pretrain(corpus, tmp_path / "b", resume_from="last", **kwargs))
    diff = max((reference[k] - resumed[k]).abs().max().item() for k in reference)
    assert diff < 1e-6


def test_resume_refuses_another_corpus(corpus_files, tmp_path):
    corpus = _corpus(corpus_files)
    pretrain(corpus, tmp_path, max_steps=2, checkpoint_every=1, **FAST)
    other = _corpus({k: corpus_files[k] for k in ("baron", "pbmc")})
    with pytest.raises(ValueError, match="another corpus"):
        pretrain(other, tmp_path, max_steps=3, resume_from="last", **FAST)


# ---------------------------------------------------------------- DDP
def test_ddp_two_processes_see_every_cell_once_and_agree(corpus_files, tmp_path):
    """DDP over 2 CPU processes (gloo) for one epoch of real data: every cell seen exactly once
    across ranks, and both ranks end with identical weights."""
    corpus = _corpus(corpus_files, max_cells=96)
    steps = len(CorpusSampler(corpus.sentence_sizes, 96, num_replicas=2, rank=0))
    model = pretrain(corpus, tmp_path, max_cells_per_batch=96, max_steps=steps, checkpoint_every=100,
                     strategy="ddp_spawn", callbacks=[RecordCells(str(tmp_path))],
                     **{**FAST, "devices": 2})
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["steps"] == steps for r in ranks)
    seen = torch.cat([r["seen"] for r in ranks]).numpy()
    assert len(seen) == corpus.n_cells
    assert np.array_equal(np.sort(seen), np.arange(corpus.n_cells))
    assert set(ranks[0]["seen"].tolist()).isdisjoint(ranks[1]["seen"].tolist())
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    final = model.module.state_dict()
    for key, value in final.items():
        torch.testing.assert_close(value, ranks[0]["state"][key], msg=key)
    assert (tmp_path / "model" / "model.safetensors").exists()


# ---------------------------------------------------------------- CLI
def test_cli_pretrain_with_yaml_config(corpus_files, tmp_path):
    import yaml

    from scvi_cellplm.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": [corpus_files["baron"], corpus_files["pbmc"]],
        "gene_id_key": "gene_ids",
        "batch_key": "batch",
        "max_steps": 3,
        "max_cells_per_batch": 64,
        "checkpoint_every": 2,
        "log_every_n_steps": 1,
        "model_kwargs": TINY,
        "accelerator": "cpu",
    }))
    out = tmp_path / "run"
    assert main(["pretrain", str(config), "--out", str(out), "--no-progress"]) == 0
    assert (out / "model" / "model.safetensors").exists()
    metrics = pd.read_csv(next((out / "logs").glob("version_*/metrics.csv")))
    assert metrics["train_loss_step"].notna().sum() >= 1
    # flags override the config; --resume-from last continues the run
    assert main(["pretrain", str(config), "--out", str(out), "--max-steps", "4", "--resume-from", "last",
                 "--no-progress"]) == 0
    assert (out / "checkpoints" / "step00000004.ckpt").exists()


def test_loader_batches_are_what_the_plan_consumes(corpus_files):
    corpus = _corpus(corpus_files)
    batch = CorpusDataset(corpus)[(np.array([0, corpus.n_sentences - 1]), False)]
    n = batch["X"].shape[0]
    assert batch["X"].layout == torch.sparse_csr and batch["X"].shape[1] == corpus.n_genes
    for key in ("batch", "dataset", "platform"):
        assert batch[key].shape == (n, 1)
    assert batch["sentence"].unique().tolist() == [0, 1]
    assert batch[INDICES_KEY].shape == (n,)


@pytest.mark.slow
def test_cli_pretrain_ddp_script_launcher(corpus_files, tmp_path):
    """`cellplm pretrain --strategy ddp --devices 2` (Lightning re-launches the command per rank)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scvi_cellplm.cli", "pretrain", "--data", *corpus_files.values(),
           "--out", str(out), "--gene-id-key", "gene_ids", "--batch-key", "batch", "--max-steps", "3",
           "--max-cells-per-batch", "64", "--checkpoint-every", "3", "--accelerator", "cpu",
           "--devices", "2", "--strategy", "ddp", "--preset", "small", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    state = last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["num_replicas"] == 2 and state["consumed"] == 3
    assert CellPLM.load(str(out / "model")).is_trained_
