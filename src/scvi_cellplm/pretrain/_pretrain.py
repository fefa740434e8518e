"""Pretraining CellPLM on a corpus streamed from disk, on one or many devices, resumable."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from anndata import AnnData
from scipy import sparse

from .._constants import DATA_KEYS, REGISTRY_KEYS
from .._exceptions import CheckpointError, InputDataError
from .._presets import PRESETS
from ..io._genes import Species
from ..io._safe_load import safe_torch_load
from ..train import CellPLMTrainingPlan
from ._corpus import Corpus
from ._loader import CorpusDataModule

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
CORPUS_FILE = "corpus.json"


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the random draws (masks, dropout) of one training step on one rank."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PretrainingPlan(CellPLMTrainingPlan):
    """:class:`~scvi_cellplm.train.CellPLMTrainingPlan` for corpus pretraining.

    Adds what resuming and DDP need: the random draws of each step (masks, cell dropout, dropout)
    are seeded from ``(seed, global step, rank)``, so a resumed run draws what the uninterrupted
    run would; padding mini-batches count with weight 0; the training loss is logged every step;
    checkpoints carry the corpus fingerprint and refuse to resume on another corpus.

    Parameters
    ----------
    module
        The :class:`~scvi_cellplm.module.CellPLMModule`.
    seed
        Seed of the per-step draws.
    corpus_fingerprint
        :meth:`Corpus.fingerprint` of the training corpus.
    **kwargs
        Passed to :class:`~scvi_cellplm.train.CellPLMTrainingPlan`.
    """

    def __init__(self, module, *, seed: int = 0, corpus_fingerprint: str | None = None, **kwargs) -> None:
        super().__init__(module, **kwargs)
        self.seed = seed
        self.corpus_fingerprint = corpus_fingerprint

    def training_step(self, batch, batch_idx):
        """Seed this step's draws, then mask and reconstruct (weight 0 for padding)."""
        torch.manual_seed(step_seed(self.seed, self.global_step, self.global_rank))
        padding = bool(batch.pop(DATA_KEYS.PADDING_KEY, torch.tensor(False)))
        loss = super().training_step(batch, batch_idx)
        if padding:
            loss = loss * 0.0
        self.log("train_loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch[REGISTRY_KEYS.X_KEY].shape[0])
        return loss

    @property
    def use_sync_dist(self) -> bool:
        """Whether to sync logged values across ranks: never.

        Epoch aggregates of the metrics are per rank (rank 0 logs them): no collective per logged
        value (Lightning's integer batch-size sync fails on CPU/gloo).
        """
        return False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the corpus fingerprint."""
        checkpoint["cellplm_corpus_fingerprint"] = self.corpus_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another corpus."""
        saved = checkpoint.get("cellplm_corpus_fingerprint")
        if saved is not None and self.corpus_fingerprint is not None and saved != self.corpus_fingerprint:
            raise CheckpointError(
                f"The checkpoint was trained on another corpus (fingerprint {saved}, this corpus "
                f"{self.corpus_fingerprint}): resume with the same files, keys, max_cells_per_batch "
                "and seed."
            )


def vocabulary_template(corpus: Corpus) -> AnnData:
    """Build a one-cell AnnData whose genes are the corpus vocabulary (what the saved model is set up on).

    ``uns["cellplm_pretraining"]`` describes the corpus; ``var["n_datasets_measured"]`` counts the
    datasets that measured each gene.
    """
    adata = AnnData(sparse.csr_matrix((1, corpus.n_genes), dtype=np.float32))
    adata.obs_names = ["vocabulary"]
    adata.var_names = list(corpus.vocabulary)
    adata.var["n_datasets_measured"] = corpus.gene_mask.sum(0).astype(np.int64)
    meta = corpus.metadata()
    adata.uns["cellplm_pretraining"] = {
        "n_cells": meta["n_cells"],
        "datasets": [d["name"] for d in meta["datasets"]],
        "batch_categories": meta["batch_categories"],
        "platform_categories": meta["platform_categories"],
        "fingerprint": meta["fingerprint"],
    }
    return adata


def build_model(corpus: Corpus, model_kwargs: dict | None = None, preset: str = "small",
                max_cells_per_batch: int | None = None):
    """Build a :class:`~scvi_cellplm.CellPLM` over the corpus vocabulary, ready for corpus pretraining.

    The model is set up on :func:`vocabulary_template`; its decoder has one batch embedding per
    corpus batch and one dataset embedding per dataset, and its module carries the corpus's
    per-dataset gene panels (``dataset_gene_mask``) for the loss. Each cell is embedded from its
    own measured genes (``embed_shared_genes=False``): panels may even be disjoint.
    """
    from ..model import CellPLM

    if preset not in PRESETS:
        raise InputDataError(f"`preset` must be one of {list(PRESETS)}, got {preset!r}.")
    kwargs = {**PRESETS[preset], **(model_kwargs or {})}
    kwargs.setdefault("embed_shared_genes", False)
    template = vocabulary_template(corpus)
    with warnings.catch_warnings():  # scvi-tools warns about categories of under 3 cells
        warnings.filterwarnings("ignore", message="Category .* has fewer than")
        CellPLM.setup_anndata(template)
    model = CellPLM(
        template,
        gene_vocabulary=list(corpus.vocabulary),  # the corpus's vocabulary, never a selection of it
        max_cells_per_batch=max_cells_per_batch or corpus.max_cells,
        n_batch_embeddings=len(corpus.batch_categories),
        n_dataset_embeddings=len(corpus.dataset_names),
        batch_in_decoder=False,  # new data's batches are not the corpus's: decode with their sum
        **kwargs,
    )
    # the corpus's panels: unmeasured genes leave the loss (a buffer, dropped before saving)
    model.module.dataset_gene_mask = torch.as_tensor(corpus.gene_mask)
    return model


def pretrain(
    data,
    out_dir: str | os.PathLike,
    *,
    preset: Literal["small", "paper"] = "small",
    model_kwargs: dict | None = None,
    max_cells_per_batch: int = 512,
    max_steps: int = 10_000,
    max_epochs: int | None = None,
    lr: float = 1e-3,
    plan_kwargs: dict | None = None,
    layer: str | None = None,
    gene_id_key: str | None = None,
    batch_key: str | None = None,
    sample_key: str | None = None,
    platform_key: str | None = None,
    gene_vocabulary: Sequence[str] | None = None,
    species: Species = "auto",
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 3,
    resume_from: str | os.PathLike | None = None,
    logger_kind: Literal["csv", "tensorboard", "both", "none"] = "csv",
    progress_bar: bool = True,
    log_every_n_steps: int = 50,
    num_workers: int = 0,
    gradient_clip_val: float = 1.0,
    seed: int = 0,
    callbacks: Sequence[pl.Callback] | None = None,
    overwrite: bool = False,
    sparse_loss: bool = True,
    **trainer_kwargs,
):
    """Pretrain CellPLM by masked reconstruction on a corpus of AnnData files streamed from disk.

    Genes are unified into one vocabulary by Ensembl id; each dataset's unmeasured genes are masked
    out of the loss (see :class:`Corpus`). Cells are read per mini-batch from backed files, so memory
    is bounded by the mini-batch, not the corpus. Training runs on Lightning (``accelerator``,
    ``devices``, ``strategy="ddp"``), checkpoints every ``checkpoint_every`` steps into
    ``OUT_DIR/checkpoints`` (``last.ckpt`` and the latest ``keep_checkpoints``), logs to
    ``OUT_DIR/logs``, and resumes from a checkpoint with the optimiser, schedule, step and data
    position of the interrupted run (with the same seed, a resumed run ends with the weights of an
    uninterrupted one).

    Parameters
    ----------
    data
        A :class:`Corpus` (e.g. :meth:`Corpus.from_soma`), or what :class:`Corpus` reads: ``.h5ad``
        paths, zarr stores or annbatch collections, AnnData objects (in memory or backed), MuData,
        AnnCollection, :class:`SomaSource`, or a list of them.
    out_dir
        Output folder: ``model/`` (a :class:`~scvi_cellplm.CellPLM` for :meth:`CellPLM.load
        <scvi_cellplm.CellPLM.load>`), ``corpus.json``, ``checkpoints/`` and ``logs/``.
    preset, model_kwargs
        Architecture: a preset of :data:`~scvi_cellplm.PRESETS` updated with keyword arguments of
        :class:`~scvi_cellplm.CellPLM`.
    max_cells_per_batch
        Cell budget of a sentence and of a mini-batch (per device).
    max_steps, max_epochs
        Length of training (optimiser steps; or epochs with ``max_steps=-1``).
    lr
        Peak AdamW learning rate.
    plan_kwargs
        Passed to the training plan (masking rates, warm-ups, ...; see
        :class:`~scvi_cellplm.train.CellPLMTrainingPlan`).
    layer, gene_id_key, batch_key, sample_key, platform_key, gene_vocabulary, species
        How datasets are read, see :class:`Corpus`.
    accelerator, devices, num_nodes, strategy, precision
        Lightning device settings, e.g. ``devices=4, strategy="ddp"``; across machines
        ``num_nodes=2, devices=4, strategy="ddp"`` with one process per device launched by SLURM
        (``srun``) or ``torchrun --nnodes`` (world size ``num_nodes × devices``; see the pretraining
        guide).
    checkpoint_every
        Save a checkpoint every this many steps.
    keep_checkpoints
        Step checkpoints kept (besides ``last.ckpt``).
    resume_from
        A checkpoint to resume from, or ``"last"`` for ``OUT_DIR/checkpoints/last.ckpt``.
    logger_kind
        Lightning logger(s) writing to ``OUT_DIR/logs``.
    progress_bar
        Show Lightning's progress bar.
    log_every_n_steps
        Logging interval.
    num_workers
        DataLoader worker processes reading the files.
    gradient_clip_val
        Gradient-norm clipping.
    seed
        Seed of the weights, the sentence windows, the shuffle and every step's random draws.
    callbacks
        Extra Lightning callbacks.
    overwrite
        Start a new run in an ``OUT_DIR`` whose ``checkpoints/`` holds an earlier run's checkpoints
        (they are deleted first). Without it such a folder is refused unless ``resume_from``
        continues that run, so ``resume_from="last"`` always means the run of this folder.
    sparse_loss
        Compute the training loss over each mini-batch's measured genes only, zero counts in closed
        form (the same loss up to float rounding, several times faster at a large vocabulary; see
        :attr:`CellPLMModule.sparse_loss <scvi_cellplm.module.CellPLMModule>`). ``False``: the
        dense loss over the whole vocabulary (the reference).
    **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer`.

    Returns
    -------
    The pretrained :class:`~scvi_cellplm.CellPLM` (also saved to ``OUT_DIR/model`` by rank 0). It is
    set up on a one-cell AnnData of the vocabulary; use it on data whose genes are the vocabulary
    with ``CellPLM.load(OUT_DIR/"model", adata=...)``, or on any genes with :func:`load_pretrained`.

    Examples
    --------
    >>> from scvi_cellplm.pretrain import pretrain
    >>> model = pretrain(["a.h5ad", "b.h5ad"], "run1", gene_id_key="gene_ids", max_steps=2000)
    >>> model = pretrain(["a.h5ad", "b.h5ad"], "run1", gene_id_key="gene_ids", max_steps=2000,
    ...                  resume_from="last")  # after a crash
    """
    out_dir = Path(out_dir)
    if resume_from == "last":
        resume_from = out_dir / CHECKPOINT_DIR / "last.ckpt"
    _check_checkpoints(out_dir / CHECKPOINT_DIR, resume_from, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    corpus = data if isinstance(data, Corpus) else Corpus(
        data, max_cells_per_batch, layer=layer, gene_id_key=gene_id_key, batch_key=batch_key,
        sample_key=sample_key, platform_key=platform_key, gene_vocabulary=gene_vocabulary,
        species=species, seed=seed,
    )
    model = build_model(corpus, model_kwargs, preset, max_cells_per_batch)
    model.module.sparse_loss = sparse_loss
    plan = PretrainingPlan(model.module, seed=seed, corpus_fingerprint=corpus.fingerprint(),
                           **{"lr": lr, **(plan_kwargs or {})})
    plan.n_obs_training = corpus.n_cells
    datamodule = CorpusDataModule(corpus, max_cells_per_batch, seed=seed, num_workers=num_workers)

    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs if max_epochs is not None else (-1 if max_steps != -1 else 1),
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        callbacks=[_checkpointing(out_dir, checkpoint_every, keep_checkpoints), *(callbacks or [])],
        logger=_loggers(out_dir, logger_kind),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps,
        gradient_clip_val=gradient_clip_val,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the corpus sampler deals mini-batches to ranks itself
        **trainer_kwargs,
    )
    model.module.train()
    trainer.fit(plan, datamodule=datamodule, ckpt_path=None if resume_from is None else str(resume_from),
                weights_only=True)
    model.module.dataset_gene_mask = None  # the saved model reads new data as one full panel
    model.module.eval()
    model.is_trained_ = True
    model.trainer = trainer
    if trainer.is_global_zero:
        model.save(str(out_dir / MODEL_DIR), overwrite=True, save_anndata=True)
        with open(out_dir / CORPUS_FILE, "w") as fh:
            json.dump(corpus.metadata(), fh)
        logger.info("Pretrained CellPLM saved to %s after %d steps.", out_dir / MODEL_DIR, trainer.global_step)
    return model


def load_pretrained(dir_path: str | os.PathLike, adata: AnnData, **kwargs):
    """Load a :class:`~scvi_cellplm.CellPLM` on ``adata`` with the weights of a pretraining run.

    ``adata`` must be registered with :meth:`CellPLM.setup_anndata
    <scvi_cellplm.CellPLM.setup_anndata>` (raw counts); its genes (Ensembl ids, or symbols mapped
    offline) are aligned to the pretraining vocabulary, so they need not be the vocabulary.

    Parameters
    ----------
    dir_path
        The ``OUT_DIR`` of :func:`pretrain`, or its ``model`` folder.
    adata
        Registered AnnData.
    **kwargs
        Replace keyword arguments of the pretrained model (e.g. ``max_cells_per_batch``).
    """
    from ..model import CellPLM
    from ..model._saving import has_saved_model

    path = Path(dir_path)
    if has_saved_model(path / MODEL_DIR):
        path = path / MODEL_DIR
    if not has_saved_model(path):
        raise CheckpointError(
            f"No pretrained weights in {dir_path}: pass the OUT_DIR of `pretrain` or its `{MODEL_DIR}` folder."
        )
    model = CellPLM.load(str(path), adata, **kwargs)
    model.is_trained_ = True
    return model


def _is_rank_zero() -> bool:
    """Whether this process is the first (or only) one of a distributed launch."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _check_checkpoints(folder: Path, resume_from, overwrite: bool) -> None:
    """Refuse to mix two runs in one checkpoints folder; check a checkpoint to resume from.

    Lightning writes ``last-v1.ckpt`` next to an earlier run's ``last.ckpt``, so a later
    ``resume_from="last"`` would resume the wrong run: a folder with checkpoints is refused unless
    ``resume_from`` is one of them (the same run continues) or ``overwrite`` deletes them.
    """
    if resume_from is not None:
        if not Path(resume_from).is_file():
            raise CheckpointError(f"No checkpoint at {resume_from}: pass an existing .ckpt file, or "
                                  "`resume_from=None`.")
        checkpoint = safe_torch_load(str(resume_from), "pretraining checkpoint", mmap=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"{resume_from} is not a Lightning checkpoint of a pretraining run.")
        del checkpoint
    if not _is_rank_zero():  # the other ranks of a DDP launch: rank 0 checked (and cleaned)
        return
    existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    ours = resume_from is not None and Path(resume_from).resolve().parent == folder.resolve()
    if not existing or ours:
        return
    if not overwrite:
        raise CheckpointError(
            f"{folder} holds the checkpoints of an earlier run ({existing[0].name}, ...): pass "
            "resume_from='last' to continue it, overwrite=True (--overwrite) to start a new run "
            "there, or another output folder."
        )
    for path in existing:
        path.unlink()
    logger.info("Deleted %d checkpoints of an earlier run in %s.", len(existing), folder)


def _checkpointing(out_dir: Path, every: int, keep: int) -> pl.callbacks.ModelCheckpoint:
    return pl.callbacks.ModelCheckpoint(
        dirpath=out_dir / CHECKPOINT_DIR,
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_last=True,
        monitor="step",
        mode="max",
        save_top_k=keep,
    )


def _loggers(out_dir: Path, kind: str):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if kind == "none":
        return False
    loggers = []
    if kind in ("csv", "both"):
        loggers.append(CSVLogger(out_dir, name="logs"))
    if kind in ("tensorboard", "both"):
        loggers.append(TensorBoardLogger(out_dir, name="logs"))
    if not loggers:
        raise InputDataError(f"`logger_kind` must be 'csv', 'tensorboard', 'both' or 'none', got {kind!r}.")
    return loggers
