"""Corpus sources other than .h5ad files: zarr stores, annbatch collections, TileDB-SOMA experiments.

The same cells stored in each format make the same corpus (vocabulary, panels, sentences) and the
same pretraining, to float precision; the sampler's guarantees (every cell once per epoch across
ranks, also across nodes; resume mid-epoch) hold whatever the source. SOMA tests skip when
``tiledbsoma`` is not installed (``pip install scvi-cellplm[corpus]``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import TINY, shared_file
from pretrain_helpers import FAST as PRETRAIN_FAST
from pretrain_helpers import one_thread  # noqa: F401  (fixture)
from scipy import sparse

from scvi_cellplm._exceptions import InputDataError
from scvi_cellplm.data import INDICES_KEY
from scvi_cellplm.pretrain import (
    Corpus,
    CorpusDataLoader,
    CorpusDataModule,
    CorpusDataset,
    CorpusSampler,
    SomaSource,
    pretrain,
)

FAST = {**PRETRAIN_FAST, "model_kwargs": TINY}
KEYS = {"gene_id_key": "gene_ids", "batch_key": "batch"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _subset(name: str, n_cells: int, n_genes: int, seed: int) -> ad.AnnData:
    """Real cells of a shared file, its ``n_genes`` most expressed genes, CSR float32."""
    adata = ad.read_h5ad(shared_file(name))
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, n_cells, replace=False))
    genes = np.sort(np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:n_genes])
    sub = adata[cells][:, genes].copy()
    sub.X = sparse.csr_matrix(sub.X, dtype=np.float32)
    keep = [c for c in ("batch", "cell_type") if c in sub.obs]
    sub.obs = sub.obs[keep].astype(str).astype("category")
    sub.var = sub.var[["gene_ids"]].astype(str)
    sub.uns = {}
    return sub


@pytest.fixture(scope="module")
def adatas() -> dict[str, ad.AnnData]:
    """Human pancreas (4 donors as batches, cell types) and human PBMC: overlapping panels."""
    pancreas = _subset("baron_human_pancreas_4donors.h5ad", 200, 300, 0)
    pbmc = _subset("pbmc3k_raw.h5ad", 120, 300, 1)
    pbmc.obs["batch"] = "pbmc"
    return {"pancreas": pancreas, "pbmc": pbmc}


@pytest.fixture(scope="module")
def h5ad_files(adatas, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("h5ad")
    for name, adata in adatas.items():
        adata.write_h5ad(root / f"{name}.h5ad")
    return [str(root / f"{name}.h5ad") for name in adatas]


@pytest.fixture(scope="module")
def zarr_stores(adatas, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("zarr")
    for name, adata in adatas.items():
        adata.write_zarr(root / f"{name}.zarr")
    return [str(root / f"{name}.zarr") for name in adatas]


@pytest.fixture(scope="module")
def soma_experiments(adatas, tmp_path_factory) -> list[str]:
    """One SOMA experiment per dataset (Census layout: ms["RNA"], X["raw"]), folder named as the file."""
    soma_io = pytest.importorskip("tiledbsoma.io", reason="needs tiledbsoma: pip install scvi-cellplm[corpus]")
    root = tmp_path_factory.mktemp("soma")
    for name, adata in adatas.items():
        soma_io.from_anndata(str(root / name), adata, measurement_name="RNA", X_layer_name="raw")
    return [str(root / name) for name in adatas]


def _soma_sources(uris, **kwargs) -> list[SomaSource]:
    return [SomaSource(uri, gene_id_key="gene_ids", **kwargs) for uri in uris]


def _assert_same_corpus(a: Corpus, b: Corpus) -> None:
    assert a.fingerprint() == b.fingerprint()
    assert a.vocabulary == b.vocabulary and a.batch_categories == b.batch_categories
    np.testing.assert_array_equal(a.gene_mask, b.gene_mask)
    for i in range(a.n_sentences):
        d, rows = a.sentence(i)
        x, y = a.read(d, rows), b.read(d, rows)
        assert x.shape == y.shape and (x != y).nnz == 0


# ---------------------------------------------------------------- same cells, same corpus
def test_zarr_stores_make_the_h5ad_corpus(adatas, h5ad_files, zarr_stores, tmp_path):
    reference = Corpus(h5ad_files, 64, **KEYS)
    corpus = Corpus(zarr_stores, 64, **KEYS)
    _assert_same_corpus(reference, corpus)
    assert [d["format"] for d in corpus.metadata()["datasets"]] == ["zarr", "zarr"]
    with ad.settings.override(zarr_write_format=3):  # zarr v3 stores, and AnnData backed on them
        for name, adata in adatas.items():
            adata.write_zarr(tmp_path / f"{name}.zarr")
    _assert_same_corpus(reference, Corpus([str(tmp_path / f"{n}.zarr") for n in adatas], 64, **KEYS))


def test_soma_experiments_make_the_h5ad_corpus(h5ad_files, soma_experiments):
    reference = Corpus(h5ad_files, 64, **KEYS)
    corpus = Corpus(_soma_sources(soma_experiments), 64, **KEYS)
    _assert_same_corpus(reference, corpus)
    # mixed with files, and through from_soma
    mixed = Corpus([h5ad_files[0], _soma_sources(soma_experiments)[1]], 64, **KEYS)
    _assert_same_corpus(reference, mixed)
    one = Corpus.from_soma(soma_experiments[1], 64, gene_id_key="gene_ids", batch_key="batch")
    _assert_same_corpus(Corpus(h5ad_files[1:], 64, **KEYS), one)


def test_annbatch_collection_is_one_dataset_across_its_stores(adatas, h5ad_files, tmp_path):
    """A collection (zarr group of dataset_0, dataset_1, ... stores, one gene space) is read as one
    dataset: a sample's cells form sentences across stores. Built here in annbatch's layout, since
    annbatch itself needs Python >= 3.12."""
    import zarr
    from anndata.io import write_elem

    pancreas = adatas["pancreas"]
    group = zarr.open_group(tmp_path / "pancreas.zarr", mode="w")
    for i, rows in enumerate((slice(0, 70), slice(70, 150), slice(150, None))):
        write_elem(group, f"dataset_{i}", pancreas[rows].copy())
    group.attrs.update({"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"})
    corpus = Corpus([str(tmp_path / "pancreas.zarr")], 64, **KEYS)
    _assert_same_corpus(Corpus(h5ad_files[:1], 64, **KEYS), corpus)
    assert corpus.metadata()["datasets"][0]["format"] == "annbatch"
    # stores whose genes differ are refused
    write_elem(group, "dataset_3", pancreas[:5, :10].copy())
    with pytest.raises(InputDataError, match="one gene space"):
        Corpus([str(tmp_path / "pancreas.zarr")], 64, **KEYS)


def test_soma_value_filter_selects_the_right_cells(adatas, soma_experiments, tmp_path):
    pancreas = adatas["pancreas"]
    beta = pancreas[pancreas.obs["cell_type"] == "beta"].copy()
    beta.write_h5ad(tmp_path / "pancreas.h5ad")
    corpus = Corpus.from_soma(soma_experiments[0], 64, obs_value_filter="cell_type == 'beta'",
                              gene_id_key="gene_ids", batch_key="batch")
    assert corpus.n_cells == beta.n_obs > 0
    _assert_same_corpus(Corpus([str(tmp_path / "pancreas.h5ad")], 64, **KEYS), corpus)
    assert corpus.metadata()["datasets"][0]["obs_value_filter"] == "cell_type == 'beta'"
    with pytest.raises(InputDataError, match="selects no cell"):
        Corpus.from_soma(soma_experiments[0], 64, obs_value_filter="cell_type == 'unicorn'", gene_id_key="gene_ids")
    with pytest.raises(InputDataError, match="obs_value_filter"):
        Corpus.from_soma(soma_experiments[0], 64, obs_value_filter="no_such_column == 1", gene_id_key="gene_ids")
    with pytest.raises(InputDataError, match="batch_key='donor'"):
        Corpus.from_soma(soma_experiments[0], 64, gene_id_key="gene_ids", batch_key="donor")
    with pytest.raises(InputDataError, match="layer='counts'"):
        Corpus.from_soma(soma_experiments[0], 64, gene_id_key="gene_ids", layer="counts")


# ---------------------------------------------------------------- same pretraining
def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_pretraining_from_zarr_and_soma_equals_pretraining_from_h5ad(h5ad_files, zarr_stores,
                                                                     soma_experiments, tmp_path):
    kwargs = {**FAST, "max_cells_per_batch": 64, "max_steps": 3, "checkpoint_every": 100, "seed": 5,
              "plan_kwargs": {"n_steps_lr_warmup": 1}, **KEYS}
    reference = _weights(pretrain(h5ad_files, tmp_path / "h5ad", **kwargs))
    for name, data in (("zarr", zarr_stores), ("soma", _soma_sources(soma_experiments))):
        weights = _weights(pretrain(data, tmp_path / name, **kwargs))
        diff = max((reference[k] - weights[k]).abs().max().item() for k in reference)
        assert diff < 1e-6, name


# ---------------------------------------------------------------- sampler guarantees on SOMA
def _cells(corpus: Corpus, batches) -> list[np.ndarray]:
    dataset = CorpusDataset(corpus)
    return [dataset[b][INDICES_KEY].numpy() for b in batches if not b[1]]


def test_soma_corpus_every_cell_once_over_two_ranks(soma_experiments):
    corpus = Corpus(_soma_sources(soma_experiments), 48, **KEYS)
    ranks = [CorpusSampler(corpus.sentence_sizes, 48, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [np.concatenate(_cells(corpus, list(s))) for s in ranks]
    assert len(list(ranks[0])) == len(list(ranks[1]))
    assert not set(seen[0]) & set(seen[1])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(corpus.n_cells))


def test_soma_corpus_resumes_mid_epoch_with_the_same_batches(soma_experiments):
    corpus = Corpus(_soma_sources(soma_experiments), 48, **KEYS)

    def loader():
        return CorpusDataLoader(CorpusDataset(corpus), CorpusSampler(corpus.sentence_sizes, 48, seed=2))

    full = [(b[INDICES_KEY].numpy(), b["X"].to_dense().numpy()) for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = [(b[INDICES_KEY].numpy(), b["X"].to_dense().numpy()) for b in head + rest]
    assert len(got) == len(full) > 3
    for (ia, xa), (ib, xb) in zip(full, got):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(xa, xb)


# ---------------------------------------------------------------- several nodes
def test_two_nodes_of_two_devices_see_every_cell_once(h5ad_files):
    """Lightning's world size is num_nodes × devices and a rank is node_rank × devices + local_rank:
    the data module deals every cell of an epoch to exactly one of the 4 processes."""
    corpus = Corpus(h5ad_files, 48, **KEYS)
    module = CorpusDataModule(corpus, seed=3)
    per_rank = []
    for node_rank in (0, 1):
        for local_rank in (0, 1):
            module.trainer = SimpleNamespace(world_size=4, global_rank=node_rank * 2 + local_rank)
            loader = module.train_dataloader()
            assert loader.sampler.num_replicas == 4
            per_rank.append(list(loader.sampler))
    assert len({len(b) for b in per_rank}) == 1  # ranks stay in step
    real = [ids for batches in per_rank for ids, pad in batches if not pad]
    assert sorted(np.concatenate(real).tolist()) == list(range(corpus.n_sentences))
    cells = np.concatenate([corpus.offsets[corpus.sentence(int(i))[0]] + corpus.sentence(int(i))[1]
                            for ids in real for i in ids])
    assert np.array_equal(np.sort(cells), np.arange(corpus.n_cells))


def test_pretrain_passes_num_nodes_to_the_trainer(h5ad_files, tmp_path, monkeypatch):
    from scvi_cellplm.pretrain import _pretrain

    class Stop(Exception):
        pass

    def trainer(**kwargs):
        raise Stop(kwargs)

    monkeypatch.setattr(_pretrain.pl, "Trainer", trainer)
    with pytest.raises(Stop) as stop:
        pretrain(h5ad_files, tmp_path, num_nodes=2, strategy="ddp", **{**FAST, "devices": 2}, **KEYS)
    passed = stop.value.args[0]
    assert passed["num_nodes"] == 2 and passed["devices"] == 2 and not passed["use_distributed_sampler"]


# ---------------------------------------------------------------- errors
def test_missing_tiledbsoma_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)
    with pytest.raises(ImportError, match=r"pip install scvi-cellplm\[corpus\]"):
        SomaSource("somewhere")


def test_a_folder_that_is_no_store_is_refused(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputDataError, match="empty.zarr"):
        Corpus([str(tmp_path / "empty.zarr")], 64)



WORKER = """
import sys, torch
torch.set_num_threads(1)
from pretrain_helpers import RecordCells
from scvi_cellplm.pretrain import SomaSource, pretrain
out, steps, *uris = sys.argv[1:]
pretrain([SomaSource(u, gene_id_key="gene_ids") for u in uris], out, max_cells_per_batch=48,
         max_steps=int(steps), checkpoint_every=100, accelerator="cpu", devices=1, num_nodes=2,
         strategy="ddp", progress_bar=False, logger_kind="none", model_kwargs={tiny},
         gene_id_key="gene_ids", batch_key="batch", callbacks=[RecordCells(out)])
"""


def test_two_nodes_launched_by_hand_train_every_cell_once(soma_experiments, tmp_path):
    """Two "machines" (processes on this one) started with MASTER_ADDR/MASTER_PORT/NODE_RANK, as
    on a cluster without a launcher: `num_nodes=2` makes one DDP group over them; every cell of the
    SOMA corpus is trained on once, and both end with the same weights."""
    import os
    import socket
    import subprocess

    corpus = Corpus(_soma_sources(soma_experiments), 48, **KEYS)
    steps = len(CorpusSampler(corpus.sentence_sizes, 48, num_replicas=2, rank=0))
    script = tmp_path / "node.py"
    script.write_text(WORKER.format(tiny=TINY))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    cmd = [sys.executable, str(script), str(tmp_path), str(steps), *soma_experiments]
    nodes = [subprocess.Popen(cmd, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), results[0][1][-3000:] + results[1][1][-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["steps"] == steps for r in ranks)
    seen = torch.cat([r["seen"] for r in ranks]).numpy()
    assert np.array_equal(np.sort(seen), np.arange(corpus.n_cells))
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
