"""The CUDA path, tested rather than assumed (issue #21): parity, device agreement, bf16, training.

Every test is marked ``gpu`` and skipped without CUDA; the default run excludes them
(``-m "not slow and not gpu"``). Run them on a GPU machine with ``nox -s gpu`` or
``pytest -m gpu``.

``CELLPLM_GPU_TESTS_DEVICE=cpu pytest -m gpu`` runs the same tests on the CPU (the accelerator is
then ``"cpu"``, and the profiler test skips: a CPU has no host<->device copies). That is a dry run
of the tests' own logic for machines without a GPU; it measures nothing about CUDA.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TINY, shared_file
from scipy import sparse

import scvi_cellplm
from scvi_cellplm import CellPLM

DEVICE = os.environ.get("CELLPLM_GPU_TESTS_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEVICE.startswith("cuda") else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (nox -s gpu / pytest -m gpu on a GPU machine)"),
]

# Ours vs the official package, same device, fp32. On the CPU: 1e-5. On a GPU the reduction order of
# cuBLAS's kernels depends on the shapes each implementation multiplies: measured on an H200 (paper
# network, values up to ~6), ours vs official 1.0-2.2e-5 (relative 1.6e-6), and the official package
# against its own CPU result 1.5e-5. So on CUDA: 5e-5 absolute and 1e-5 relative (Frobenius).
PARITY_TOL = 1e-5 if DEVICE == "cpu" else 5e-5
PARITY_REL = 1e-5
DEVICE_TOL = 1e-4  # ours on the CPU vs ours on CUDA, fp32
BF16_COSINE = 0.999  # per cell, bf16 autocast vs fp32 (cells that keep their GMVAE cluster)
BF16_MAX_FLIPS = 0.05  # share of cells whose GMVAE cluster changes under bf16 (near-ties)
DEVICE_MAX_FLIPS = 0.005  # the same between CPU and CUDA (fp32: rounding order only)

# Host<->device copies per training step (the test prints the measured counts). The batch is 6
# tensors (X, batch, labels, sample, sentence, obs indices), each copied once. Legitimate scalars on
# top, found on the CPU by hooking `.item()`/`bool()` over one step: the logged KL weight (a Python
# float made a device tensor), the Beta-distribution parameters of the gene mask and their argument
# validation (3 reads), one `valid.all()` per Flowformer layer, the finite-loss check (1 read), and
# the sizes of the boolean selections of cell dropout and masking. (Adam's `.item()` calls, one per
# parameter tensor a step, read its step counters, which live on the host: no copy.) A model copied
# to or from the host every step (57 parameter tensors in the small preset, counted by the test)
# exceeds these bounds.
# Measured on an H200 (small preset, 32 cells a step): 10 HtoD and 18-19 DtoH per step, the reads
# being torch.unique (3), boolean selections (nonzero, 6), `.item()`/`bool()` (13, overlapping) —
# scalars, none a parameter (57 tensors). The bound on reads was 16 before that measurement.
MAX_HTOD_PER_STEP = 24
MAX_DTOH_PER_STEP = 24


# ----------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def paper_config():
    return json.loads(shared_file("official/cellplm_20230926_85M.config.json").read_text())


@pytest.fixture(autouse=True)
def _fp32_matmul_untouched():
    """Parity needs IEEE fp32 products: fail if anything switched on TF32 behind our back."""
    before = torch.get_float32_matmul_precision()
    yield
    after = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(before)
    assert after == before, f"float32 matmul precision changed during the test: {before} -> {after}"


def official_embedding_on(directory: str, prefix: str, adata, device: str) -> np.ndarray:
    """The official pipeline's embedding on ``device`` (``official_oracle.official_embedding`` is
    CPU only)."""
    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline
    from official_oracle import deterministic_official

    with deterministic_official(), contextlib.redirect_stdout(open(os.devnull, "w")):
        pipeline = CellEmbeddingPipeline(pretrain_prefix=prefix, pretrain_directory=directory)
        out = pipeline.predict(adata, device=device, ensembl_auto_conversion=False)
    return out.cpu().numpy()


def _official_checkpoint(tmp_path, config, latent="gmvae"):
    from official_oracle import build_official, save_official

    config = {**config, "latent_mod": latent}
    return save_official(build_official(config), config, str(tmp_path), f"ckpt_{latent}"), f"ckpt_{latent}"


def _ours(prefix, adata, device):
    adata = adata.copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    model = CellPLM.from_official(prefix, adata)
    if device != "cpu":
        model.to_device(device)
    return model


def _same_cluster(clusters_a, clusters_b, n_cells: int):
    """Cells that take the same GMVAE cluster in both runs (all cells for a VAE latent), and the
    share that do not."""
    same = np.ones(n_cells, bool) if clusters_a is None else clusters_a == clusters_b
    return same, float(1 - same.mean())


def _clusters(model, **kwargs):
    if model.module.latent_distribution != "gmvae":
        return None
    return model.get_latent_representation(return_cluster_probs=True, **kwargs).argmax(1)


# ----------------------------------------------------------------- (a) official parity on the device
@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_paper_size_parity_with_official_on_device(tmp_path, paper_config, ensembl_pancreas, latent):
    """The paper-size network (4 x 1024 Flowformer, 19,374 genes) with random weights: ours and the
    official package, both on the GPU in fp32, agree to ``PARITY_TOL`` (one sample = one sentence)."""
    pytest.importorskip("CellPLM", reason="the official `cellplm` package is not installed")
    prefix, name = _official_checkpoint(tmp_path, paper_config, latent)
    reference = official_embedding_on(str(tmp_path), name, ensembl_pancreas.copy(), DEVICE)
    model = _ours(prefix, ensembl_pancreas, DEVICE)
    assert model.device.type == torch.device(DEVICE).type
    ours = model.get_latent_representation()
    assert ours.shape == reference.shape
    diff = float(np.abs(ours - reference).max())
    relative = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
    print(f"paper-size {latent} on {DEVICE}: max |ours - official| {diff:.2e}, relative {relative:.1e}")
    assert diff <= PARITY_TOL, f"max |ours - official| on {DEVICE} = {diff:.2e} (> {PARITY_TOL})"
    assert relative <= PARITY_REL, f"relative difference on {DEVICE} = {relative:.1e} (> {PARITY_REL})"


def test_small_parity_with_official_on_device(tmp_path, vocabulary, ensembl_pancreas):
    pytest.importorskip("CellPLM", reason="the official `cellplm` package is not installed")
    from official_oracle import small_config

    prefix, name = _official_checkpoint(tmp_path, small_config(vocabulary))
    reference = official_embedding_on(str(tmp_path), name, ensembl_pancreas.copy(), DEVICE)
    ours = _ours(prefix, ensembl_pancreas, DEVICE).get_latent_representation()
    assert np.abs(ours - reference).max() <= PARITY_TOL


# ----------------------------------------------------------------- (b) CPU vs CUDA
@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_cpu_and_device_embeddings_agree_paper_size(tmp_path, paper_config, ensembl_pancreas, latent):
    """One checkpoint loaded in ours, embedded on the CPU and again after ``to_device``: <= 1e-4
    (GMVAE: over the cells whose most likely cluster is the same on both, nearly all)."""
    pytest.importorskip("CellPLM", reason="the official `cellplm` package is not installed")
    prefix, _ = _official_checkpoint(tmp_path, paper_config, latent)
    model = _ours(prefix, ensembl_pancreas, "cpu")
    on_cpu, clusters_cpu = model.get_latent_representation(), _clusters(model)
    model.to_device(DEVICE)
    on_device, clusters_device = model.get_latent_representation(), _clusters(model)
    same, flips = _same_cluster(clusters_cpu, clusters_device, len(on_cpu))
    assert flips <= DEVICE_MAX_FLIPS, f"{100 * flips:.2f}% of cells changed GMVAE cluster between CPU and {DEVICE}"
    diff = float(np.abs(on_cpu[same] - on_device[same]).max())
    assert diff <= DEVICE_TOL, f"max |cpu - {DEVICE}| = {diff:.2e}"


def test_model_trained_on_cpu_embeds_the_same_on_device(trained_small, small_pancreas):
    """A model of ours (layer norm, its own vocabulary) trained on the CPU, moved to the device."""
    on_cpu = trained_small.get_latent_representation()
    trained_small.to_device(DEVICE)
    assert next(trained_small.module.parameters()).device.type == torch.device(DEVICE).type
    on_device = trained_small.get_latent_representation()
    assert np.abs(on_cpu - on_device).max() <= DEVICE_TOL
    # and back: denoised expression (the decoder path) on the device too
    expr = trained_small.get_normalized_expression(indices=np.arange(50))
    assert np.isfinite(np.asarray(expr)).all()


# ----------------------------------------------------------------- (c) bf16 autocast on the device
def test_bf16_autocast_close_to_fp32_on_device(tmp_path, paper_config, ensembl_pancreas):
    """``precision="bf16"`` on the device: per-cell cosine to fp32 > 0.999 for the cells that keep
    their GMVAE cluster; with random weights the cluster probabilities are near-uniform, so a few
    per cent of cells may flip cluster at a near-tie (a jump, not an accumulated error)."""
    pytest.importorskip("CellPLM", reason="the official `cellplm` package is not installed")
    prefix, _ = _official_checkpoint(tmp_path, paper_config)
    model = _ours(prefix, ensembl_pancreas, DEVICE)
    fp32 = model.get_latent_representation(precision="32")
    bf16 = model.get_latent_representation(precision="bf16")
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    same, flips = _same_cluster(_clusters(model, precision="32"), _clusters(model, precision="bf16"), len(fp32))
    cosine = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert flips <= BF16_MAX_FLIPS, f"{100 * flips:.1f}% of cells changed GMVAE cluster under bf16"
    assert cosine[same].min() > BF16_COSINE, f"min cosine (same cluster) {cosine[same].min():.5f}"
    assert np.mean(cosine > BF16_COSINE) >= 1 - BF16_MAX_FLIPS


# ----------------------------------------------------------------- (d) training on the device
class _StepLosses(pl.Callback):
    """Training losses of every step, and the device they were computed on."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.devices.add(loss.device.type)
        self.losses.append(float(loss.detach()))


def test_training_on_device_reduces_the_loss(pancreas):
    CellPLM.setup_anndata(pancreas, layer="counts", batch_key="batch")
    model = CellPLM(pancreas, **TINY)
    record = _StepLosses()
    model.train(max_epochs=2, accelerator=ACCELERATOR, devices=1, max_cells_per_batch=128,
                plan_kwargs={"n_steps_lr_warmup": 5}, enable_progress_bar=False, callbacks=[record])
    assert record.devices == {torch.device(DEVICE).type}
    epoch_losses = model.history["train_loss"].to_numpy(dtype=float).ravel()
    assert len(epoch_losses) == 2 and np.isfinite(epoch_losses).all()
    assert epoch_losses[1] < epoch_losses[0], f"training loss did not fall: {epoch_losses}"
    assert np.isfinite(record.losses).all()
    z = model.get_latent_representation()
    assert z.shape == (pancreas.n_obs, TINY["n_latent"]) and np.isfinite(z).all()


_HTOD = re.compile(r"memcpy\s*htod", re.IGNORECASE)
_DTOH = re.compile(r"memcpy\s*dtoh", re.IGNORECASE)


class _ProfileSteps(pl.Callback):
    """Profile exactly ``steps`` training steps after ``warmup`` (batch transfers included: the
    window opens at the end of the step before the first profiled one)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.profiler = None
        self.profiled = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.profiler is None:
            if batch_idx == self.warmup - 1:
                torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.profiler.start()
        elif self.profiled < self.steps:
            self.profiled += 1
            if self.profiled == self.steps:
                torch.cuda.synchronize()
                self.profiler.stop()


def test_training_steps_do_not_copy_beyond_the_batch(small_pancreas):
    """With the torch profiler over 5 training steps on CUDA: host->device copies per step stay
    within the batch's tensors plus a few scalars, device->host reads within a few scalars (see
    MAX_HTOD_PER_STEP / MAX_DTOH_PER_STEP), far below one copy per parameter tensor."""
    if not DEVICE.startswith("cuda"):
        pytest.skip("host<->device copies exist only on a CUDA device")
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **scvi_cellplm.SMALL_CPU)
    n_param_tensors = sum(1 for _ in model.module.parameters())
    steps = 5
    profile = _ProfileSteps(warmup=3, steps=steps)
    model.train(max_epochs=1, accelerator="gpu", devices=1, max_cells_per_batch=32, validation_size=0.0,
                enable_progress_bar=False, callbacks=[profile])
    assert profile.profiled == steps, f"only {profile.profiled} steps profiled (an epoch too short?)"
    events = profile.profiler.events()
    names = [e.name for e in events]
    htod = sum(bool(_HTOD.search(n)) for n in names) / steps
    dtoh = sum(bool(_DTOH.search(n)) for n in names) / steps
    syncs = sum(n == "aten::_local_scalar_dense" for n in names) / steps
    report = (f"per step: {htod:.1f} Memcpy HtoD, {dtoh:.1f} Memcpy DtoH, {syncs:.1f} .item()-style "
              f"reads; {n_param_tensors} parameter tensors")
    print(report)
    assert htod >= 1, f"the profiler saw no host->device copy at all (CUPTI unavailable?): {report}"
    assert htod <= MAX_HTOD_PER_STEP, report
    assert dtoh <= MAX_DTOH_PER_STEP, report
    assert max(htod, dtoh) < n_param_tensors / 2, report


# ----------------------------------------------------------------- (e) pretraining on the device
def _corpus_files(pancreas, root) -> list[str]:
    """The bundled pancreas split into two files (different gene panels), raw counts in X."""
    paths = []
    rng = np.random.default_rng(0)
    for i, batch in enumerate(pancreas.obs["batch"].cat.categories[:2]):
        sub = pancreas[(pancreas.obs["batch"] == batch).to_numpy()]
        genes = np.sort(rng.choice(sub.n_vars, 1500, replace=False))
        sub = sub[:, genes]
        adata = ad.AnnData(sparse.csr_matrix(sub.layers["counts"], dtype=np.float32),
                           obs=sub.obs[["batch"]].copy(), var=sub.var[["gene_ids"]].copy())
        paths.append(str(root / f"part{i}.h5ad"))
        adata.write_h5ad(paths[-1])
    return paths


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_pretraining_runs_on_device(pancreas, tmp_path, precision):
    from scvi_cellplm.pretrain import load_pretrained, pretrain

    files = _corpus_files(pancreas, tmp_path)
    record = _StepLosses()
    model = pretrain(files, tmp_path / "run", accelerator=ACCELERATOR, devices=1, max_steps=5,
                     precision=precision, max_cells_per_batch=128, model_kwargs=TINY,
                     gene_id_key="gene_ids", batch_key="batch", logger_kind="none", progress_bar=False,
                     checkpoint_every=5, callbacks=[record])
    assert model.trainer.global_step == 5
    assert record.devices == {torch.device(DEVICE).type}
    assert len(record.losses) == 5 and np.isfinite(record.losses).all()
    # the saved model loads anywhere (here: the CPU) and embeds new cells
    query = pancreas[(pancreas.obs["batch"] == pancreas.obs["batch"].cat.categories[-1]).to_numpy()].copy()
    query.var_names = query.var["gene_ids"].astype(str).to_numpy()
    CellPLM.setup_anndata(query, layer="counts", batch_key="batch")
    loaded = load_pretrained(tmp_path / "run", query)
    z = loaded.get_latent_representation()
    assert z.shape == (query.n_obs, TINY["n_latent"]) and np.isfinite(z).all()
