"""The shared base of CellPLM models: the backbone, AnnData validation, training, saving."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Sequence
from typing import Literal

import pandas as pd
import rich.pretty  # noqa: F401  (scvi-tools' view_anndata_setup uses rich.pretty without importing it)
import torch
from anndata import AnnData
from mudata import MuData
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner

from .._constants import REGISTRY_KEYS
from .._exceptions import GeneAlignmentError, InputDataError
from .._presets import PRESETS
from ..data import SentenceDataSplitter, make_windower, registered_gene_ids, registered_var
from ..data._selection import highly_variable_genes
from ..data._statistics import log1p_means, measured_genes, to_vocabulary
from ..module import CellPLMModule
from ..module._norm import Norm, TokenNorm
from ..module.attention import AttentionKind
from ..module.latent import GMVAEEmbedding, LatentDistribution
from ..module.positional import PositionalEncodingKind
from ..train import CellPLMTrainingPlan, get_max_steps_heuristic
from . import _saving
from ._hub import HubMixin
from ._inference import SentenceInferenceMixin
from ._setup import looks_like_counts

logger = logging.getLogger(__name__)


class CellPLMBase(HubMixin, SentenceInferenceMixin, BaseModelClass):
    """A CellPLM backbone on registered data; :class:`~scvi_cellplm.CellPLM` documents the arguments.

    The heads (:class:`~scvi_cellplm.CellPLMAnnotator`, :class:`~scvi_cellplm.CellPLMPerturbation`)
    and :class:`~scvi_cellplm.CellPLM` are siblings over this base, each exposing only the outputs
    its module has.
    """

    _module_cls = CellPLMModule
    _training_plan_cls = CellPLMTrainingPlan
    # new data without a labels column still embeds (the encoder does not read labels)
    _transfer_kwargs: dict = {"allow_missing_labels": True}
    _plan_defaults: dict = {}  # training-plan defaults of this kind of model
    _train_cells: int | None = None  # training sentence budget (None: the model's)
    _train_sentences: str = "windows"  # how training sentences are drawn (see SentenceDataSplitter)
    _lr: float = 1e-3  # train()'s default peak learning rate
    _single_batch_lr: float | None = None  # its default on one batch without coordinates (None: _lr)

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_latent: int = 10,
        n_decoder_layers: int = 2,
        n_clusters: int = 16,
        latent_distribution: LatentDistribution = "vae",
        gmvae_embedding: GMVAEEmbedding = "mean",
        attention: AttentionKind = "flowformer",
        positional_encoding: PositionalEncodingKind = "none",
        norm: Norm = "layernorm",
        dropout: float = 0.1,
        max_cells_per_batch: int = 4000,
        gene_vocabulary: Sequence[str] | None = None,
        n_batch_embeddings: int | None = None,
        n_dataset_embeddings: int = 0,
        batch_in_decoder: bool = True,
        gene_likelihood: Literal["nb", "gaussian"] = "nb",
        center_input: bool = False,
        n_spatial_neighbors: int = 0,
        n_top_genes: int | None = 2000,
        input_target_sum: float | None = 1e4,
        token_norm: TokenNorm = "cell",
        **module_kwargs,
    ) -> None:
        super().__init__(adata)
        if gene_likelihood == "gaussian" or center_input:  # not raw counts / centred on raw log1p means
            input_target_sum = None
        if max_cells_per_batch < 1:
            raise InputDataError(f"`max_cells_per_batch` must be positive, got {max_cells_per_batch}.")
        if n_spatial_neighbors < 0:
            raise InputDataError(f"`n_spatial_neighbors` must be >= 0, got {n_spatial_neighbors}.")
        self.backbone_kwargs_ = {
            k: v for k, v in locals().items()
            if k not in ("self", "adata", "module_kwargs", "__class__")
        } | dict(module_kwargs)
        self.max_cells_per_batch = int(max_cells_per_batch)
        self.batch_in_decoder = batch_in_decoder
        manager = self.adata_manager
        if gene_vocabulary is None:
            ids = pd.Index(registered_gene_ids(manager))
            duplicated = ids[ids.duplicated()].unique()
            if len(duplicated):
                raise GeneAlignmentError(
                    f"Gene ids must be unique; duplicated: {list(duplicated[:5])}. Call "
                    "`adata.var_names_make_unique()` or choose another `gene_id_key`."
                )
            gene_vocabulary = list(ids)
            if n_top_genes is not None and len(ids) > n_top_genes:
                keep = highly_variable_genes(manager, n_top_genes, counts=looks_like_counts(manager))
                gene_vocabulary = list(ids[keep])
                logger.info("Vocabulary: the %d most variable of %d registered genes (n_top_genes=%d; "
                            "the others are not read, and decode as 0).", len(gene_vocabulary),
                            len(ids), n_top_genes)
        self.gene_vocabulary = _checked_vocabulary(gene_vocabulary)
        n_genes = len(self.gene_vocabulary)
        index = self._gene_index(manager)  # the training data's genes, by identity
        n_spatial = self.summary_stats.get(f"n_{REGISTRY_KEYS.SPATIAL_KEY}", 0)
        for what, wanted in ((f"positional_encoding={positional_encoding!r}", positional_encoding != "none"),
                             (f"n_spatial_neighbors={n_spatial_neighbors}", n_spatial_neighbors > 0)):
            if wanted and not n_spatial:
                raise InputDataError(
                    f"{what} needs spatial coordinates: call "
                    "`CellPLM.setup_anndata(adata, spatial_key='spatial')` first."
                )
        if gene_likelihood == "nb" and not looks_like_counts(manager):
            raise InputDataError(
                "gene_likelihood='nb' needs raw counts, but the registered data holds non-integer "
                "values. Register the raw counts (`layer=...`), or use gene_likelihood='gaussian' "
                "for normalised data."
            )
        registry = manager.data_registry
        self.decoder_batch_categories_ = (
            [str(c) for c in manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping]
            if REGISTRY_KEYS.BATCH_KEY in registry else []
        )
        n_batch = self.summary_stats.n_batch if n_batch_embeddings is None else n_batch_embeddings
        panels = vocabulary_panels = None
        if REGISTRY_KEYS.DATASET_KEY in registry:
            panels = measured_genes(manager)
            vocabulary_panels = torch.as_tensor(to_vocabulary(panels, index, n_genes, fill=False))
            n_dataset_embeddings = n_dataset_embeddings or int(panels.shape[0])
        center = {}  # (module_kwargs stays as given: it is saved with the init parameters)
        if center_input:
            center["input_center"] = torch.as_tensor(
                to_vocabulary(log1p_means(manager, panels), index, n_genes, fill=0.0)
            )
        self.module = self._module_cls(
            n_genes,
            n_batch=n_batch,
            n_dataset=n_dataset_embeddings,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_latent=n_latent,
            n_decoder_layers=n_decoder_layers,
            n_clusters=n_clusters,
            latent_distribution=latent_distribution,
            gmvae_embedding=gmvae_embedding,
            attention=attention,
            positional_encoding=positional_encoding,
            n_spatial_dims=max(int(n_spatial), 2),
            norm=norm,
            dropout=dropout,
            gene_likelihood=gene_likelihood,
            dataset_gene_mask=vocabulary_panels,
            n_spatial_neighbors=n_spatial_neighbors,
            input_target_sum=input_target_sum,
            token_norm=token_norm,
            **center,
            **module_kwargs,
        )
        config = {"n_hidden": n_hidden, "n_layers": n_layers, "n_heads": n_heads, "n_latent": n_latent,
                  "latent_distribution": latent_distribution, "attention": attention}
        preset = next(
            (name for name, p in PRESETS.items() if all(p.get(k) == v for k, v in config.items())),
            "custom",
        )
        n_params = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"CellPLM ({preset} preset): {n_layers} x {attention} layers, n_hidden={n_hidden}, "
            f"n_heads={n_heads}, {latent_distribution} latent n_latent={n_latent}, "
            f"positional_encoding={positional_encoding}, "
            + (f"n_spatial_neighbors={n_spatial_neighbors}, " if n_spatial_neighbors else "")
            + f"vocabulary={n_genes} genes, {n_params / 1e6:.2f}M parameters, "
            f"max_cells_per_batch={self.max_cells_per_batch}."
        )
        logger.info(self._model_summary_string)
        self.init_params_ = self._get_init_params(locals())

    def _default_lr(self, spatial: bool, frozen: bool) -> float:
        """``train()``'s learning rate when none is given (see its ``lr``)."""
        single = self._single_batch_lr is not None and self.summary_stats.get("n_batch", 1) < 2
        if single and not spatial and not frozen:
            logger.info("Learning rate %g: one registered batch (with batches: %g).",
                        self._single_batch_lr, self._lr)
            return self._single_batch_lr
        return self._lr

    # ------------------------------------------------------------------ data
    def _setup_args(self, adata_manager=None) -> dict:
        return (adata_manager or self.adata_manager).registry["setup_args"]

    def _registered_var(self, adata_manager=None) -> pd.DataFrame:
        return registered_var(adata_manager or self.adata_manager)

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        """As scvi-tools, but for a foundation model: any genes, any categories.

        An AnnData the user set up with this class's ``setup_anndata`` keeps that setup (its own
        layer, keys and categories); any other gets the model's setup with new batch, sample and
        label categories added (they never block inference: the encoder does not read them).
        Genes are aligned to the vocabulary by identifier when the data is read.
        """
        if adata is None or self.adata_manager is None:
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        from scvi.data._constants import _SCVI_UUID_KEY
        from scvi.data._utils import _assign_adata_uuid, _check_if_view

        cls = type(self)
        store = cls._per_instance_manager_store.get(self.id, {})
        manager = store.get(adata.uns.get(_SCVI_UUID_KEY))
        if manager is not None and manager.adata is adata:
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        _check_if_view(adata, copy_if_view=copy_if_view)
        own = cls._setup_adata_manager_store.get(adata.uns.get(_SCVI_UUID_KEY))
        if own is not None and own.adata is adata:
            self._register_manager_for_instance(own)
            return adata
        if manager is not None:  # a copy of a registered AnnData
            _assign_adata_uuid(adata, overwrite=True)
        try:
            manager = self.adata_manager.transfer_fields(adata, extend_categories=True,
                                                         **self._transfer_kwargs)
        except (ValueError, KeyError) as err:
            raise InputDataError(
                f"The AnnData does not match the model's setup ({err}). Set it up for this model "
                f"first: `{cls.__name__}.setup_anndata(adata, layer=..., batch_key=...)` with its "
                "own layer and keys."
            ) from err
        self._register_manager_for_instance(manager)
        return adata

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        lr: float | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        validation_size: float = 0.1,
        max_cells_per_batch: int | None = None,
        train_sentences: Literal["random", "windows"] | None = None,
        gradient_clip_val: float = 1.0,
        plan_kwargs: dict | None = None,
        seed: int = 0,
        **trainer_kwargs,
    ):
        """Train on the model's AnnData.

        The loss is masked reconstruction for :class:`~scvi_cellplm.CellPLM` (the paper's
        objective), the task loss for the heads.

        Parameters
        ----------
        max_epochs
            Passes over the data. Default: enough epochs for
            :func:`~scvi_cellplm.train.get_max_steps_heuristic` optimisation steps (about
            ``400 * n_cells / max_cells_per_batch``, between 1,000 and 20,000), or for
            ``max_steps`` when that is given.
        lr
            Peak AdamW learning rate. Default: 1e-3; for :class:`~scvi_cellplm.CellPLM` on data
            without coordinates and with fewer than two registered batches, 2e-4 (a model
            without batches to remove keeps its cell types more compact at the smaller step, one
            with batches needs the larger one to remove them; see docs/user_guide/quality.md).
            Models with frozen weights (query models) keep 1e-3.
        accelerator, devices
            Lightning device selection (``"gpu"`` uses CUDA when present).
        validation_size
            Fraction of each sample's cells held out for validation.
        max_cells_per_batch
            Cell budget of a training sentence and mini-batch. Default: 256 for
            :class:`~scvi_cellplm.CellPLM` on data without coordinates (many optimisation steps;
            inference still reads whole samples up to the model's ``max_cells_per_batch``), the
            model's budget otherwise.
        train_sentences
            ``"random"``: every epoch, each sample's cells are cut into new random sentences;
            ``"windows"``: the samples, windowed as at inference. Default: ``"random"`` for
            :class:`~scvi_cellplm.CellPLM` on data without coordinates, ``"windows"`` otherwise
            (spatial windows keep neighbours together).
        gradient_clip_val
            Gradient-norm clipping.
        plan_kwargs
            Passed to :class:`~scvi_cellplm.train.CellPLMTrainingPlan` (masking rates, warm-up, ...).
            :class:`~scvi_cellplm.CellPLM` trains with a batch adversary on the latent when there
            are batches (``batch_adversarial_weight=5``; ``0`` turns it off; see
            docs/user_guide/quality.md).
            Models with frozen weights (query models, frozen heads) train without weight decay,
            so frozen rows of a table stay exactly as they were.
        seed
            Seed of the train/validation split and of the sentence shuffling.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar``, ``max_steps``).
        """
        spatial = REGISTRY_KEYS.SPATIAL_KEY in self.adata_manager.data_registry
        if max_cells_per_batch is None:
            max_cells_per_batch = self.max_cells_per_batch if spatial or self._train_cells is None else min(
                self._train_cells, self.max_cells_per_batch)
        if train_sentences is None:
            train_sentences = "windows" if spatial else self._train_sentences
        splitter = self._data_splitter(max_cells_per_batch, validation_size, seed, train_sentences)
        steps_per_epoch = max(len(splitter.train_dataloader()), 1)
        if max_epochs is None:
            steps = trainer_kwargs.get("max_steps", -1)
            if steps is None or steps < 0:
                steps = get_max_steps_heuristic(splitter.n_train, max_cells_per_batch)
            max_epochs = math.ceil(steps / steps_per_epoch)
            logger.info("Training for %d epochs of %d steps (sentences of at most %d cells): %d steps.",
                        max_epochs, steps_per_epoch, max_cells_per_batch, max_epochs * steps_per_epoch)
        defaults = dict(self._plan_defaults)
        frozen = any(not p.requires_grad for p in self.module.parameters())
        if lr is None:
            lr = self._default_lr(spatial, frozen)
        if frozen:
            defaults["weight_decay"] = 0.0
        # no batch adversary for a query model (it keeps the reference's latent) or a decoder
        # without batch (a latent without batch needs a decoder with it)
        if frozen or not self.batch_in_decoder:
            defaults.pop("batch_adversarial_weight", None)
        plan = self._training_plan_cls(self.module, **{"lr": lr, **defaults, **(plan_kwargs or {})})
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1 if splitter.n_val else None)
        # log each epoch's steps even when an epoch is shorter than Lightning's 10-step interval
        trainer_kwargs.setdefault("log_every_n_steps", min(10, steps_per_epoch))
        if splitter.n_val == 0:
            trainer_kwargs.setdefault("limit_val_batches", 0)
        runner = TrainRunner(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            gradient_clip_val=gradient_clip_val,
            **trainer_kwargs,
        )
        self.module.train()  # Lightning keeps modules' modes: leave eval() from earlier inference
        try:
            return runner()
        except SystemExit as err:
            # Lightning turns Ctrl+C into SystemExit after ignoring SIGINT; give the user back a
            # usable model (weights of the last step) and a normal KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.module.eval()
            self.trainer = runner.trainer
            logger.warning("Training interrupted at step %d; the model keeps the weights of "
                           "that step.", runner.trainer.global_step)
            raise KeyboardInterrupt from err

    def _data_splitter(self, max_cells_per_batch: int, validation_size: float, seed: int,
                       train_sentences: str = "windows"):
        """Return the training data module (subclasses with other training data override this)."""
        manager = self.adata_manager
        return SentenceDataSplitter(
            manager,
            self._sample_codes(manager),
            max_cells_per_batch,
            make_windower(manager, max_cells_per_batch),
            validation_size=validation_size,
            seed=seed,
            gene_index=self._gene_index(manager),
            train_sentences=train_sentences,
        )

    # ------------------------------------------------------------------ save / load
    @staticmethod
    def load_registry(dir_path: str, prefix: str | None = None) -> dict:
        """Return the registry (setup arguments, categories) saved with a model, without its weights.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save` (``metadata.json`` is read, no weights; the ``model.pt``
            of earlier versions is memory-mapped).
        prefix
            Prefix of the file names.
        """
        return _saving._decode(_saving.read_metadata(dir_path, prefix)["registry_"])

    @classmethod
    def _load_kwargs(cls, metadata: dict, registry: dict) -> dict:
        """Return the constructor arguments a saved model of this class needs besides its init parameters."""
        return {}

    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path``: ``model.safetensors`` (weights) and ``metadata.json``.

        The files are written atomically (temporary files, then moved into place, the metadata
        last), and safetensors holds tensors only: loading cannot execute code. The folder is also
        what :meth:`load`, ``from_pretrained`` and scvi-hub's ``HubModel`` read.

        Parameters
        ----------
        dir_path
            Directory to write into (created).
        prefix
            Prefix of the file names.
        overwrite
            Replace an existing saved model (and AnnData).
        save_anndata
            Also write the AnnData (``adata.h5ad``).
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        _saving.save_model(self, dir_path, prefix, overwrite, save_anndata, **anndata_write_kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | MuData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **overrides,
    ):
        """Load a model saved by :meth:`save`, on ``adata`` (default: the saved AnnData).

        ``adata`` may hold any genes (matched to the model's vocabulary by identifier) and new
        batch, sample or label categories. Set up with this class's ``setup_anndata`` first, it
        keeps its own setup (layer, keys); otherwise it gets the saved one. Weights are read from
        ``model.safetensors``, or from the ``model.pt`` of earlier versions with
        ``torch.load(weights_only=True)``; a truncated, tampered or mismatching file raises
        :class:`~scvi_cellplm.CheckpointError`.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Data to attach the model to.
        accelerator, device
            Where to put the weights (scvi-tools' device selection).
        prefix
            Prefix of the file names.
        **overrides
            Replace saved constructor arguments that do not change the weights' shapes, e.g.
            ``max_cells_per_batch``.
        """
        return _saving.load_model(cls, dir_path, adata, accelerator, device, prefix, overrides)


def _checked_vocabulary(genes) -> list[str]:
    """Return the gene vocabulary as distinct, non-empty strings, or raise a GeneAlignmentError."""
    if isinstance(genes, str) or not hasattr(genes, "__iter__"):
        raise GeneAlignmentError(f"`gene_vocabulary` must be a list of gene ids, got {type(genes).__name__}.")
    vocabulary = pd.Index([str(g) for g in genes])
    if not len(vocabulary) or (vocabulary.str.strip() == "").any():
        raise GeneAlignmentError("`gene_vocabulary` must be a non-empty list of non-empty gene ids.")
    duplicated = vocabulary[vocabulary.duplicated()].unique()
    if len(duplicated):
        raise GeneAlignmentError(
            f"`gene_vocabulary` has duplicated genes: {list(duplicated[:5])}; pass each gene once "
            "(e.g. `list(dict.fromkeys(genes))`)."
        )
    return list(vocabulary)
