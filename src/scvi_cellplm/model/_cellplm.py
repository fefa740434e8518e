"""CellPLM as an scvi-tools model: the only place that touches AnnData."""

from __future__ import annotations

import logging
import signal
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  (scvi-tools' view_anndata_setup uses rich.pretty without importing it)
import torch
from anndata import AnnData
from mudata import MuData
from scipy import sparse
from scvi.data import AnnDataManager, fields
from scvi.model._utils import _get_batch_code_from_category, get_max_epochs_heuristic
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from .._constants import MODULE_KEYS, REGISTRY_KEYS, SLOTS
from .._exceptions import GeneAlignmentError, InputDataError
from .._presets import PRESETS
from ..data import (
    INDICES_KEY,
    SentenceDataSplitter,
    bisect_windows,
    make_sentences,
    sentence_dataloader,
)
from ..io._genes import align_genes
from ..module import CellPLMModule
from ..module._norm import Norm
from ..module.attention import AttentionKind
from ..module.latent import LatentDistribution
from ..module.positional import PositionalEncodingKind
from ..train import CellPLMTrainingPlan
from . import _saving

logger = logging.getLogger(__name__)


class CellPLM(BaseModelClass):
    """CellPLM: a single-cell foundation model whose tokens are cells :cite:p:`Wen2024`.

    Each cell's counts are embedded through a learned gene table, cells of one *sentence* (a
    sample, or a contiguous window of a large one) attend to each other in a transformer, and a
    (Gaussian-mixture) VAE latent gives the cell embedding; a negative-binomial decoder with batch
    embeddings reconstructs expression. Pretraining masks genes of most cells and reconstructs them.

    Parameters
    ----------
    adata
        AnnData or MuData registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    n_hidden, n_layers, n_heads
        Width, depth and attention heads of the cell transformer.
    n_latent
        Dimension of the cell embedding.
    n_decoder_layers
        Decoder layers counting the output head (at least 2).
    n_clusters
        Mixture components of the GMVAE prior.
    latent_distribution
        ``"gmvae"`` (paper) or ``"vae"``.
    attention
        ``"flowformer"`` (linear cost, paper) or ``"sdpa"`` (softmax attention).
    positional_encoding
        ``"none"``, ``"sinusoidal"`` or ``"learned"`` encoding of the registered spatial
        coordinates (requires ``spatial_key`` unless ``"none"``).
    norm
        ``"layernorm"`` or ``"groupnorm"`` (official checkpoints) in embedder and decoder.
    dropout
        Dropout rate.
    max_cells_per_batch
        Cell budget of a sentence and of a mini-batch; larger samples are cut into contiguous
        windows (in space when coordinates are registered, else in expression space).
    gene_vocabulary
        Gene ids of the model's gene table. ``None``: the registered genes. Given (e.g. by
        :meth:`from_official`), the registered genes are aligned to it by Ensembl id, with offline
        symbol mapping; unmatched genes are ignored.
    n_batch_embeddings
        Rows of the decoder's batch embedding (default: the registered batch categories).
    n_dataset_embeddings
        Rows of the decoder's dataset embedding (0: none).
    batch_in_decoder
        Feed the registered batch to the decoder. ``False`` (official checkpoints, whose batch
        table does not know the user's batches) uses the sum over all batch vectors.
    gene_likelihood
        ``"nb"`` (raw counts; the paper's pretraining) or ``"gaussian"`` for normalised,
        non-count values (e.g. in-situ measurements); NB on non-count data is an error.
    center_input
        Embed ``log1p(x)`` minus each gene's mean over the registered cells (over the cells of
        the datasets that measured it), with masked entries reading as that mean. Use it to train
        from scratch on dense data (MERFISH panels, in-situ values, deep counts), where the
        uncentred embedding collapses all cells onto one token (see
        :class:`~scvi_cellplm.module.CellPLMModule`). ``False``: the official embedder.
    n_spatial_neighbors
        Spatial data: each cell's expression embedding becomes a learned weighted average of its
        own and its ``n_spatial_neighbors`` nearest cells' (by coordinates, within its sentence:
        the spatial kNN graph) before the transformer, local tissue context that sentence-wide
        linear attention cannot single out; cells without coordinates keep their own. ``0``
        (default; the official architecture): no such layer. Requires ``spatial_key``.
    **module_kwargs
        Passed to :class:`~scvi_cellplm.module.CellPLMModule` (e.g. ``kl_free_bits``).

    Examples
    --------
    >>> adata = scvi_cellplm.datasets.pancreas_demo()
    >>> CellPLM.setup_anndata(adata, batch_key="batch")
    >>> model = CellPLM(adata)
    >>> model.train(max_epochs=5)
    >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
    """

    _module_cls = CellPLMModule
    _training_plan_cls = CellPLMTrainingPlan
    _transfer_kwargs: dict = {}  # extra arguments of the registry transfer to new AnnData

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_latent: int = 32,
        n_decoder_layers: int = 2,
        n_clusters: int = 16,
        latent_distribution: LatentDistribution = "gmvae",
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
        **module_kwargs,
    ) -> None:
        super().__init__(adata)
        if max_cells_per_batch < 1:
            raise ValueError(f"`max_cells_per_batch` must be positive, got {max_cells_per_batch}.")
        self.max_cells_per_batch = int(max_cells_per_batch)
        self.batch_in_decoder = batch_in_decoder
        gene_ids = self._registered_gene_ids()
        if gene_vocabulary is None:
            duplicated = pd.Index(gene_ids)[pd.Index(gene_ids).duplicated()].unique()
            if len(duplicated):
                raise GeneAlignmentError(
                    f"Gene ids must be unique; duplicated: {list(duplicated[:5])}. Call "
                    "`adata.var_names_make_unique()` or choose another `gene_id_key`."
                )
            self.gene_vocabulary = list(gene_ids)
            gene_index = None
        else:
            self.gene_vocabulary = [str(g) for g in gene_vocabulary]
            self.gene_alignment = align_genes(gene_ids, self.gene_vocabulary)
            logger.info("CellPLM gene alignment: %s", self.gene_alignment.summary())
            gene_index = torch.as_tensor(self.gene_alignment.index)
        n_spatial = self.summary_stats.get(f"n_{REGISTRY_KEYS.SPATIAL_KEY}", 0)
        if positional_encoding != "none" and not n_spatial:
            raise InputDataError(
                f"positional_encoding={positional_encoding!r} needs spatial coordinates: call "
                "`CellPLM.setup_anndata(adata, spatial_key='spatial')` first."
            )
        if n_spatial_neighbors < 0:
            raise ValueError(f"`n_spatial_neighbors` must be >= 0, got {n_spatial_neighbors}.")
        if n_spatial_neighbors and not n_spatial:
            raise InputDataError(
                f"n_spatial_neighbors={n_spatial_neighbors} needs spatial coordinates: call "
                "`CellPLM.setup_anndata(adata, spatial_key='spatial')` first."
            )
        n_batch = self.summary_stats.n_batch if n_batch_embeddings is None else n_batch_embeddings
        if gene_likelihood == "nb" and not _looks_like_counts(self.adata_manager):
            raise InputDataError(
                "gene_likelihood='nb' needs raw counts, but the registered data holds non-integer "
                "values. Register the raw counts (`layer=...`), or use gene_likelihood='gaussian' "
                "for normalised data."
            )
        dataset_gene_mask = None
        if REGISTRY_KEYS.DATASET_KEY in self.adata_manager.data_registry:
            dataset_gene_mask = torch.as_tensor(_measured_genes(self.adata_manager))
            if not n_dataset_embeddings:
                n_dataset_embeddings = int(dataset_gene_mask.shape[0])
        center = {}  # (module_kwargs stays as given: it is saved with the init parameters)
        if center_input:
            center["input_center"] = _vocabulary_center(
                _log1p_means(self.adata_manager, dataset_gene_mask), gene_index, len(self.gene_vocabulary)
            )
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_genes=len(self.gene_vocabulary),
            gene_index=gene_index,
            n_batch=n_batch,
            n_dataset=n_dataset_embeddings,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_latent=n_latent,
            n_decoder_layers=n_decoder_layers,
            n_clusters=n_clusters,
            latent_distribution=latent_distribution,
            attention=attention,
            positional_encoding=positional_encoding,
            n_spatial_dims=max(int(n_spatial), 2),
            norm=norm,
            dropout=dropout,
            gene_likelihood=gene_likelihood,
            dataset_gene_mask=dataset_gene_mask,
            n_spatial_neighbors=n_spatial_neighbors,
            **center,
            **module_kwargs,
        )
        config = {
            "n_hidden": n_hidden, "n_layers": n_layers, "n_heads": n_heads, "n_latent": n_latent,
            "latent_distribution": latent_distribution, "attention": attention,
        }
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
            + f"vocabulary={len(self.gene_vocabulary)} "
            f"genes, {n_params / 1e6:.2f}M parameters, max_cells_per_batch="
            f"{self.max_cells_per_batch}."
        )
        logger.info(self._model_summary_string)
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        sample_key: str | None = None,
        labels_key: str | None = None,
        spatial_key: str | None = None,
        gene_id_key: str | None = None,
        dataset_key: str | None = None,
        **kwargs,
    ) -> None:
        """%(summary)s.

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
        %(param_batch_key)s
        sample_key
            Key in ``adata.obs`` of the sample each cell belongs to; the cells of a sample form a
            sentence (attend to each other). Default: ``batch_key``, else the whole AnnData.
        %(param_labels_key)s
        spatial_key
            Key in ``adata.obsm`` of spatial coordinates (2 or 3 columns), used by the positional
            encoding and to window large samples.
        gene_id_key
            Column of ``adata.var`` with gene ids (Ensembl ids for official checkpoints). Default:
            ``adata.var_names``.
        dataset_key
            Key in ``adata.obs`` of the dataset (gene panel) of each cell, for data joined from
            datasets that measured different genes (e.g. a spatial panel and an scRNA-seq
            reference, concatenated with zeros for unmeasured genes). A gene counts as measured by a
            dataset when it is non-zero in at least one of its cells; unmeasured genes are
            excluded from the loss and are what imputation predicts.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if gene_id_key is not None and gene_id_key not in adata.var:
            raise InputDataError(
                f"`gene_id_key={gene_id_key!r}` is not a column of adata.var "
                f"(columns: {list(adata.var.columns)})."
            )
        _check_obs_keys(adata, labels_key=labels_key)
        labels = fields.CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key)
        anndata_fields = _anndata_fields(adata, layer, batch_key, sample_key, labels, spatial_key,
                                         dataset_key)
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
        batch_key: str | None = None,
        sample_key: str | None = None,
        labels_key: str | None = None,
        gene_id_key: str | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """Register a :class:`~mudata.MuData` whose RNA modality holds counts.

        Parameters
        ----------
        mdata
            MuData object.
        rna_layer
            Layer of the RNA modality with raw counts (default: its ``.X``).
        batch_key, sample_key, labels_key
            Keys in ``mdata.obs`` (or the modality named in ``modalities``).
        gene_id_key
            Column of the RNA modality's ``.var`` with gene ids (default: its var_names).
        modalities
            Modality of each field, e.g. ``{"rna_layer": "rna"}`` (required for ``rna_layer``).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if modalities is None or "rna_layer" not in modalities:
            raise InputDataError("`modalities` must name the RNA modality: {'rna_layer': 'rna'}.")
        mods = cls._create_modalities_attr_dict(modalities, setup_method_args)
        if mods.rna_layer not in mdata.mod:
            raise InputDataError(f"Modality {mods.rna_layer!r} is not in mdata.mod ({list(mdata.mod)}).")
        _check_counts(mdata[mods.rna_layer], rna_layer)
        mudata_fields = [
            fields.MuDataLayerField(
                REGISTRY_KEYS.X_KEY, rna_layer, mod_key=mods.rna_layer, is_count_data=True,
                mod_required=True,
            ),
            fields.MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key,
                                             mod_key=mods.batch_key),
            fields.MuDataCategoricalObsField(REGISTRY_KEYS.SAMPLE_KEY, sample_key or batch_key,
                                             mod_key=mods.sample_key or mods.batch_key),
            fields.MuDataCategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key,
                                             mod_key=mods.labels_key),
        ]
        adata_manager = AnnDataManager(fields=mudata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ helpers
    def _setup_args(self, adata_manager: AnnDataManager | None = None) -> dict:
        manager = adata_manager or self.adata_manager
        return manager.registry["setup_args"]

    def _registered_var(self, adata_manager: AnnDataManager | None = None) -> pd.DataFrame:
        manager = adata_manager or self.adata_manager
        adata = manager.adata
        if isinstance(adata, MuData):
            mod = self._setup_args(manager)["modalities"]["rna_layer"]
            return adata[mod].var
        return adata.var

    def _registered_gene_ids(self, adata_manager: AnnDataManager | None = None) -> list[str]:
        var = self._registered_var(adata_manager)
        key = self._setup_args(adata_manager).get("gene_id_key")
        ids = var.index if key is None else var[key]
        return [str(g) for g in ids]

    def _windower(self, adata_manager: AnnDataManager, max_cells: int | None = None):
        """How oversized samples are cut into windows of at most ``max_cells`` cells.

        Samples with coordinates: spectral bisection of squidpy's spatial graph (reusing
        ``obsp['spatial_connectivities']``); others: bisection of an expression PCA, fitted on a
        random subsample and projected chunk by chunk (bounded memory, also for backed data).
        """
        max_cells = max_cells or self.max_cells_per_batch
        coords = None
        if REGISTRY_KEYS.SPATIAL_KEY in adata_manager.data_registry:
            coords = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.SPATIAL_KEY), dtype=float)
        cache: dict = {}

        def graph():
            if "graph" not in cache:
                from ..spatial import spatial_graph

                setup = self._setup_args(adata_manager)
                cache["graph"] = spatial_graph(
                    adata_manager.adata, setup["spatial_key"],
                    library_key=setup.get("sample_key") or setup.get("batch_key"),
                )
            return cache["graph"]

        def windower(members: np.ndarray) -> list[np.ndarray]:
            if coords is not None and np.isfinite(coords[members]).all():
                from ..spatial import graph_windows

                sub = graph()[members][:, members]
                return graph_windows(sub, max_cells, coords[members])
            x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            order = np.argsort(np.argsort(members))
            return bisect_windows(_expression_features(x, np.sort(members))[order], max_cells)

        return windower

    def _sample_codes(self, adata_manager: AnnDataManager) -> np.ndarray:
        return np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.SAMPLE_KEY)).reshape(-1)

    def sentences(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None
    ) -> list[np.ndarray]:
        """The sentences (arrays of obs indices) that inference on ``adata`` uses.

        Each is one sample or one contiguous window of a sample with more than
        ``max_cells_per_batch`` cells; every cell is in exactly one.
        """
        adata = self._validate_anndata(adata)
        return self._sentences(self.get_anndata_manager(adata, required=True), indices)

    def _sentences(self, manager: AnnDataManager, indices=None) -> list[np.ndarray]:
        return make_sentences(
            self._sample_codes(manager),
            self.max_cells_per_batch,
            self._windower(manager),
            indices=None if indices is None else np.asarray(indices),
        )

    def _inference_batches(self, adata, indices, max_cells: int | None, validate: bool = True):
        """Yield ``(obs_indices, tensors)`` over whole sentences, module in eval mode.

        With ``indices``, the samples they belong to are processed whole (a cell's output
        depends on its full sentence), and callers keep the rows they asked for. Callers that
        validated ``adata`` already pass ``validate=False`` (validation runs once per call).
        """
        if validate:
            adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        sentences = self._sentences(manager)
        if indices is not None:
            wanted = np.zeros(adata.n_obs, dtype=bool)
            wanted[np.asarray(indices)] = True
            sentences = [s for s in sentences if wanted[s].any()]
        loader = sentence_dataloader(
            manager, sentences, max_cells or self.max_cells_per_batch, load_sparse_tensor=True
        )
        self.module.eval()
        for tensors in loader:
            yield tensors[INDICES_KEY].numpy(), tensors

    def _validate_anndata(self, adata=None, copy_if_view: bool = True):
        """As scvi-tools, but new batch/sample/label categories are allowed (zero-shot)."""
        if adata is None or self.adata_manager is None:
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        from scvi.data._constants import _SCVI_UUID_KEY
        from scvi.data._utils import _assign_adata_uuid, _check_if_view

        store = type(self)._per_instance_manager_store.get(self.id, {})
        manager = store.get(adata.uns.get(_SCVI_UUID_KEY))
        if manager is not None and manager.adata is adata:
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)
        _check_if_view(adata, copy_if_view=copy_if_view)
        if manager is not None:  # a copy of a registered AnnData
            _assign_adata_uuid(adata, overwrite=True)
        try:
            manager = self.adata_manager.transfer_fields(adata, extend_categories=True,
                                                         **self._transfer_kwargs)
        except (ValueError, KeyError) as err:
            raise InputDataError(f"The AnnData does not match the model's setup: {err}") from err
        self._register_manager_for_instance(manager)
        return adata

    @staticmethod
    def _positions(indices: np.ndarray | None, n_obs: int) -> np.ndarray:
        pos = np.full(n_obs, -1, dtype=np.int64)
        idx = np.arange(n_obs) if indices is None else np.asarray(indices)
        pos[idx] = np.arange(len(idx))
        return pos

    # ------------------------------------------------------------------ outputs
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        return_cluster_probs: bool = False,
        precision: Literal["32", "bf16"] = "32",
        out=None,
    ) -> np.ndarray:
        """Cell embeddings ``(n_cells, n_latent)`` in the order of ``indices`` (default: all).

        Cells are processed sentence by sentence, so a cell's embedding depends only on its
        sentence and the weights, never on ``batch_size`` or on the other samples. With
        ``give_mean`` (default) the result is deterministic.

        Works on backed AnnData (``anndata.read_h5ad(path, backed="r")``) with memory bounded by
        the sentence size: cells are read from disk one mini-batch at a time, and large samples
        are windowed from a subsample-fitted PCA projected chunk by chunk. With ``out``, each
        mini-batch's rows are written as soon as they are computed, so no ``(n_cells, n_latent)``
        array is held in memory (see :meth:`embed` for writing into a backed file's ``obsm``).

        Parameters
        ----------
        adata
            AnnData registered with :meth:`setup_anndata` (default: the training data).
        indices
            Cells to embed.
        give_mean
            Posterior mean (most likely cluster for the GMVAE); else a posterior sample.
        batch_size
            Cell budget of an inference mini-batch (default: ``max_cells_per_batch``); whole
            sentences are always kept together.
        return_cluster_probs
            Return the GMVAE cluster probabilities ``(n_cells, n_clusters)`` instead.
        precision
            ``"32"`` (exact) or ``"bf16"`` (autocast to bfloat16: faster on CPUs and GPUs with
            bf16 units; cosine similarity to fp32 embeddings is reported in the benchmark).
        out
            Array-like of shape ``(n_cells, n_latent)`` (``n_clusters`` columns with
            ``return_cluster_probs``) to write into, mini-batch by mini-batch in increasing row
            order: an :class:`h5py.Dataset`, a zarr array or a :class:`numpy.memmap`. Returned.

        Returns
        -------
        Array for ``adata.obsm["X_cellplm"]`` (``out`` when given).
        """
        adata = self._validate_anndata(adata)
        pos = self._positions(indices, adata.n_obs)
        n_out = adata.n_obs if indices is None else len(indices)
        if precision not in ("32", "bf16"):
            raise ValueError(f"`precision` must be '32' or 'bf16', got {precision!r}.")
        if out is not None and (len(out.shape) != 2 or out.shape[0] != n_out):
            raise ValueError(f"`out` must have shape ({n_out}, n_latent), got {tuple(out.shape)}.")
        for obs, tensors in self._inference_batches(adata, indices, batch_size, validate=False):
            inputs = self.module._get_inference_input(tensors)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                res = self.module.inference(**inputs, sample=not give_mean)
            if return_cluster_probs:
                if MODULE_KEYS.CLUSTER_PROBS_KEY not in res:
                    raise ValueError("Cluster probabilities exist only for the 'gmvae' latent.")
                values = res[MODULE_KEYS.CLUSTER_PROBS_KEY]
            else:
                values = res[MODULE_KEYS.QZM_KEY] if give_mean else res[MODULE_KEYS.Z_KEY]
            values = values.float().cpu().numpy()
            del res, inputs  # the other outputs: freed before the copies below
            if out is None:
                out = np.zeros((n_out, values.shape[1]), dtype=np.float32)
            rows, keep = pos[obs], pos[obs] >= 0
            if not keep.all():
                rows, values = rows[keep], values[keep]
            if np.any(np.diff(rows) < 0):  # on-disk arrays want increasing rows
                order = np.argsort(rows, kind="stable")
                rows, values = rows[order], values[order]
            out[rows] = values
        if out is None:
            out = np.zeros((0, self.module.n_latent), dtype=np.float32)
        return out

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[int | str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        batch_size: int | None = None,
        return_numpy: bool = False,
        transform_dataset: str | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Denoised expression: the decoder's normalised means, scaled to ``library_size``.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.
        transform_batch
            Batch categories to decode every cell as (averaged); default: each cell's own batch.
        gene_list
            Genes to return (default: all registered genes).
        library_size
            Total counts each cell is scaled to, or ``"latent"`` for its observed library (over the
            genes its dataset measured). Ignored for ``gene_likelihood="gaussian"``, whose
            predictions are on the scale of the data.
        return_numpy
            Return an array instead of a DataFrame (obs names × gene names).
        transform_dataset
            Decode every cell as if measured by this dataset (category of ``dataset_key``), e.g.
            the reference when imputing genes a spatial panel lacks.

        Returns
        -------
        Values for ``adata.layers["cellplm_denoised"]``.
        """
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        var_names = self._registered_var(manager).index
        genes = np.arange(len(var_names))
        if gene_list is not None:
            missing = [g for g in gene_list if g not in var_names]
            if missing:
                raise ValueError(f"`gene_list` has genes not in the model: {missing[:5]}.")
            genes = var_names.get_indexer(gene_list)
        codes = (
            [None]
            if transform_batch is None
            else _get_batch_code_from_category(manager, list(np.atleast_1d(transform_batch)))
        )
        pos = self._positions(indices, adata.n_obs)
        n_out = adata.n_obs if indices is None else len(indices)
        out = np.zeros((n_out, len(genes)), dtype=np.float32)
        n_batch_decoder = self.summary_stats.n_batch
        dataset_code = None
        if transform_dataset is not None:
            mapping = list(manager.get_state_registry(REGISTRY_KEYS.DATASET_KEY).categorical_mapping)
            if transform_dataset not in mapping:
                raise ValueError(f"`transform_dataset` must be one of {mapping}, got {transform_dataset!r}.")
            dataset_code = mapping.index(transform_dataset)
        for obs, tensors in self._inference_batches(adata, indices, batch_size, validate=False):
            inputs = self.module._get_inference_input(tensors)
            res = self.module.inference(**inputs)
            acc = 0.0
            for code in codes:
                batch = tensors[REGISTRY_KEYS.BATCH_KEY]
                if code is not None:
                    batch = torch.full_like(batch, code)
                if self.batch_in_decoder and int(batch.max()) >= n_batch_decoder:
                    raise InputDataError(
                        "Some cells belong to batches the model was not trained on; decode them "
                        "as a known batch with `transform_batch=[...]` (e.g. "
                        f"{list(self.adata_manager.get_state_registry('batch').categorical_mapping[:3])})."
                    )
                dataset = tensors.get(REGISTRY_KEYS.DATASET_KEY)
                gen = self.module.generative(
                    res[MODULE_KEYS.Z_KEY],
                    res[MODULE_KEYS.LIBRARY_KEY],
                    batch if self.batch_in_decoder else None,
                    dataset,
                    None if dataset_code is None else torch.full_like(dataset, dataset_code),
                )
                if self.module.gene_likelihood == "gaussian":
                    acc = acc + gen[MODULE_KEYS.PX_SCALE_KEY]  # predictions on the data's scale
                elif library_size == "latent":
                    acc = acc + gen["px_rate"]
                else:
                    acc = acc + gen[MODULE_KEYS.PX_SCALE_KEY] * library_size
            keep = pos[obs] >= 0
            values = (acc / len(codes))[:, genes].float().cpu().numpy()
            out[pos[obs][keep]] = values[keep]
        if return_numpy:
            return out
        obs_names = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        return pd.DataFrame(out, index=obs_names, columns=var_names[genes])

    def impute(
        self,
        adata: AnnData | None = None,
        genes: Sequence[str] | None = None,
        indices: Sequence[int] | None = None,
        transform_dataset: str | None = None,
    ) -> pd.DataFrame:
        """Predicted expression of ``genes`` for every cell, on the scale of its own data.

        For a model set up with ``dataset_key`` on a spatial panel joined with a reference,
        this predicts the genes the panel did not measure (counts at the cell's observed library
        for NB; values on the data's scale for the Gaussian likelihood).

        ``transform_dataset`` decodes as that dataset (default: each cell's own).

        Returns
        -------
        DataFrame (cells x genes), e.g. for ``sp_adata.obsm["cellplm_imputed"]``.
        """
        return self.get_normalized_expression(adata, indices=indices, gene_list=genes,
                                              library_size="latent",
                                              transform_dataset=transform_dataset)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        lr: float = 1e-3,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        validation_size: float = 0.1,
        max_cells_per_batch: int | None = None,
        gradient_clip_val: float = 1.0,
        plan_kwargs: dict | None = None,
        seed: int = 0,
        **trainer_kwargs,
    ):
        """Pretrain by masked reconstruction (the paper's objective).

        Parameters
        ----------
        max_epochs
            Passes over the data (default: scvi-tools' heuristic from the number of cells).
        lr
            Peak AdamW learning rate.
        accelerator, devices
            Lightning device selection (``"gpu"`` uses CUDA when present).
        validation_size
            Fraction of each sample's cells held out for validation.
        max_cells_per_batch
            Cell budget of a training mini-batch (default: the model's).
        gradient_clip_val
            Gradient-norm clipping.
        plan_kwargs
            Passed to :class:`~scvi_cellplm.train.CellPLMTrainingPlan` (masking rates, warm-up, ...).
        seed
            Seed of the train/validation split and of the sentence shuffling.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar``).
        """
        if max_epochs is None:
            max_epochs = get_max_epochs_heuristic(self.adata.n_obs)
        splitter = self._data_splitter(max_cells_per_batch, validation_size, seed)
        plan_kwargs = {"lr": lr, **getattr(self, "_default_plan_kwargs", {}), **(plan_kwargs or {})}
        plan = self._training_plan_cls(self.module, **plan_kwargs)
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1 if splitter.n_val else None)
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

    def _data_splitter(self, max_cells_per_batch: int | None, validation_size: float, seed: int):
        """The training data module (subclasses with other training data override this)."""
        manager = self.adata_manager
        return SentenceDataSplitter(
            manager,
            self._sample_codes(manager),
            max_cells_per_batch or self.max_cells_per_batch,
            self._windower(manager, max_cells_per_batch),
            validation_size=validation_size,
            seed=seed,
        )

    # ------------------------------------------------------------------ convenience
    def embed(
        self,
        adata: AnnData | None = None,
        key_added: str = SLOTS.EMBEDDING,
        **kwargs,
    ) -> None:
        """Write the embedding to ``adata.obsm[key_added]`` (default ``"X_cellplm"``).

        For a backed AnnData opened for writing (``anndata.read_h5ad(path, backed="r+")``), the
        embedding is streamed into the file's ``obsm/{key_added}`` mini-batch by mini-batch (an
        existing entry is replaced), so memory stays bounded by the sentence size whatever the
        number of cells; ``anndata.read_h5ad(path)`` reads it back as ``.obsm[key_added]``.
        ``**kwargs`` go to :meth:`get_latent_representation` (e.g. ``precision="bf16"``).

        Examples
        --------
        >>> adata = anndata.read_h5ad("atlas.h5ad", backed="r+")
        >>> CellPLM.setup_anndata(adata, batch_key="sample")
        >>> model = CellPLM.from_official("ckpt/20231027_85M", adata)
        >>> model.embed(adata)  # writes atlas.h5ad:/obsm/X_cellplm chunk by chunk
        """
        adata = self._validate_anndata(adata)
        if not adata.isbacked:
            adata.obsm[key_added] = self.get_latent_representation(adata, **kwargs)
            return
        if adata.file._filemode not in ("r+", "a"):
            raise InputDataError(
                "Streaming the embedding into a backed file needs it open for writing: "
                "`anndata.read_h5ad(path, backed='r+')`; or pass `out=` (an h5py/zarr array) "
                "to `get_latent_representation`."
            )
        n_cols = self.module.n_latent
        if kwargs.get("return_cluster_probs"):
            n_cols = self.module.latent.n_clusters
        group = adata.file["obsm"]
        if key_added in group:
            del group[key_added]
        dataset = group.create_dataset(key_added, (adata.n_obs, n_cols), dtype=np.float32,
                                       chunks=(min(adata.n_obs, 4096), n_cols))
        dataset.attrs["encoding-type"], dataset.attrs["encoding-version"] = "array", "0.2.0"
        self.get_latent_representation(adata, out=dataset, **kwargs)
        adata.file._file.flush()

    def denoise(
        self,
        adata: AnnData | None = None,
        key_added: str = SLOTS.DENOISED,
        library_size: float | Literal["latent"] = "latent",
    ) -> None:
        """Write denoised expression to ``adata.layers[key_added]`` (default ``"cellplm_denoised"``).

        By default each cell keeps its observed library size, so the layer is on the count scale.
        """
        adata = self._validate_anndata(adata)
        adata.layers[key_added] = self.get_normalized_expression(
            adata, library_size=library_size, return_numpy=True
        )

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path`` (atomically; loadable without executing pickled code).

        Parameters
        ----------
        dir_path
            Directory to write into (created).
        prefix
            Prefix of the file names.
        overwrite
            Replace an existing saved model.
        save_anndata
            Also write the AnnData (``adata.h5ad``).
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
    ) -> CellPLM:
        """Load a model saved by :meth:`save`, set up on ``adata`` (or the saved AnnData).

        The file is read with ``torch.load(weights_only=True)``; a truncated, tampered or
        mismatching file raises :class:`~scvi_cellplm.CheckpointError`.
        """
        return _saving.load_model(cls, dir_path, adata, accelerator, device, prefix)

    # ------------------------------------------------------------------ query mapping
    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: CellPLM,
        freeze_encoder: bool = True,
    ) -> CellPLM:
        """A model for new data (new batches/samples) built on ``reference_model`` (scArches style).

        The query AnnData is set up like the reference (new categories allowed); the decoder's
        batch table gets rows for the new batches. With ``freeze_encoder`` (default) only those
        new rows train: every reference weight stays exactly as it was, so reference
        embeddings are unchanged. Train with :meth:`train` (weight decay is off for frozen models).

        Parameters
        ----------
        adata
            Query data with the reference's genes.
        reference_model
            A trained :class:`~scvi_cellplm.CellPLM`.
        freeze_encoder
            Train only the new batch embeddings.
        """
        registry = reference_model.adata_manager.registry
        cls.setup_anndata(adata, source_registry=registry, extend_categories=True,
                          **registry["setup_args"])
        params = reference_model.init_params_
        kwargs = {**params["non_kwargs"], **params["kwargs"].get("module_kwargs", {})}
        reference_state = reference_model.module.state_dict()
        rows = {k: v.shape[0] for k, v in reference_state.items() if k.endswith("batch.embedding.weight")}
        n_old = next(iter(rows.values())) if rows else 0
        n_new = cls._get_most_recent_anndata_manager(adata, required=True).summary_stats.n_batch
        if rows:
            kwargs["n_batch_embeddings"] = max(n_new, n_old)
        model = cls(adata, **kwargs)
        state = model.module.state_dict()
        for key, value in reference_state.items():
            if key in rows:
                state[key][: value.shape[0]] = value
            else:
                state[key] = value
        model.module.load_state_dict(state)
        if freeze_encoder:
            for name, p in model.module.named_parameters():
                p.requires_grad_(name in rows)
                if name in rows:
                    n_old = rows[name]
                    p.register_hook(lambda g, n=n_old: torch.cat([torch.zeros_like(g[:n]), g[n:]]))
            model._default_plan_kwargs = {"weight_decay": 0.0}
        model.is_trained_ = False
        logger.info("Query model: %d batches, %d of them new.", n_new, max(n_new - n_old, 0))
        return model

    # ------------------------------------------------------------------ official checkpoints
    @classmethod
    def from_official(cls, prefix: str, adata: AnnData, **kwargs) -> CellPLM:
        """Load an official CellPLM checkpoint pair ``PREFIX.config.json`` + ``PREFIX.best.ckpt``.

        The official configuration is translated into keyword arguments of this class, and every
        official weight is mapped, with its shape checked, onto the new model. Weights are read with
        ``torch.load(weights_only=True)``. Embeddings equal the official package's to 1e-5.

        Parameters
        ----------
        prefix
            Path prefix of the pair, e.g. ``"ckpt/20231027_85M"``.
        adata
            AnnData registered with :meth:`setup_anndata` (raw counts). Its genes (Ensembl ids, or
            symbols mapped offline) are aligned to the checkpoint's gene vocabulary.
        **kwargs
            Replace translated keyword arguments, e.g. ``max_cells_per_batch`` or
            ``positional_encoding="sinusoidal"`` (a new, untrained encoding to fine-tune).

        Returns
        -------
        The loaded model, marked as trained.

        Raises
        ------
        ~scvi_cellplm.CheckpointError
            Missing, unreadable, unsafe or mismatching files, or an unsupported configuration.
        """
        from ..io._official import from_official

        return from_official(cls, prefix, adata, **kwargs)

    def to_official(self, prefix: str) -> None:
        """Write this model as an official checkpoint pair ``PREFIX.config.json`` + ``PREFIX.best.ckpt``.

        The official package loads the pair and computes the same embeddings. Only models with
        ``attention="flowformer"`` and ``positional_encoding="none"`` can be written (the official
        format has no other choice); others raise :class:`~scvi_cellplm.CheckpointError`.

        Parameters
        ----------
        prefix
            Path prefix of the two files (missing folders are created).
        """
        from ..io._official import to_official

        to_official(self, prefix)


def _anndata_fields(
    adata: AnnData,
    layer: str | None,
    batch_key: str | None,
    sample_key: str | None,
    labels_field,
    spatial_key: str | None = None,
    dataset_key: str | None = None,
) -> list:
    """Validate the inputs and build the registry fields shared by CellPLM models."""
    _check_obs_keys(adata, batch_key=batch_key, sample_key=sample_key, dataset_key=dataset_key)
    _check_counts(adata, layer)
    anndata_fields = [
        fields.LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
        fields.CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        fields.CategoricalObsField(REGISTRY_KEYS.SAMPLE_KEY, sample_key or batch_key),
        labels_field,
    ]
    if dataset_key is not None:
        anndata_fields.append(fields.CategoricalObsField(REGISTRY_KEYS.DATASET_KEY, dataset_key))
    if spatial_key is not None:
        _check_spatial(adata, spatial_key)
        anndata_fields.append(fields.ObsmField(REGISTRY_KEYS.SPATIAL_KEY, spatial_key))
    return anndata_fields


def _looks_like_counts(adata_manager: AnnDataManager, max_rows: int = 20_000) -> bool:
    x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    x = x[: min(max_rows, x.shape[0])]
    values = x.data if sparse.issparse(x) else np.asarray(x)
    return all(_is_integral(v) for v in _value_chunks(values))


VALUE_CHUNK = 1 << 20
"""Values checked at a time by the input checks (bounded float64 temporaries)."""


def _value_chunks(values: np.ndarray):
    values = values.reshape(-1)
    for start in range(0, len(values), VALUE_CHUNK):
        yield values[start : start + VALUE_CHUNK].astype(np.float64, copy=False)


def _is_integral(values: np.ndarray) -> bool:
    return bool(np.allclose(values, np.round(values)))


def _measured_genes(adata_manager: AnnDataManager) -> np.ndarray:
    """``(n_dataset, n_vars)``: genes non-zero in at least one cell of each dataset."""
    x = sparse.csr_matrix(adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY))
    codes = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.DATASET_KEY)).ravel()
    n_dataset = adata_manager.summary_stats.get(f"n_{REGISTRY_KEYS.DATASET_KEY}", int(codes.max()) + 1)
    mask = np.zeros((n_dataset, x.shape[1]), dtype=bool)
    for d in range(n_dataset):
        rows = x[codes == d]
        mask[d] = rows.getnnz(axis=0) > 0
    return mask


def _log1p_means(adata_manager: AnnDataManager, dataset_gene_mask: torch.Tensor | None) -> np.ndarray:
    """Mean ``log1p`` value of each registered gene over the cells whose dataset measured it
    (all cells without datasets), read ``READ_CHUNK_CELLS`` rows at a time."""
    x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    n_obs, n_vars = x.shape
    codes = None
    if dataset_gene_mask is not None:
        codes = np.asarray(adata_manager.get_from_registry(REGISTRY_KEYS.DATASET_KEY)).ravel()
        mask = np.asarray(dataset_gene_mask, dtype=bool)
    total = np.zeros(n_vars)
    count = np.zeros(n_vars)
    for start in range(0, n_obs, READ_CHUNK_CELLS):
        rows = np.arange(start, min(start + READ_CHUNK_CELLS, n_obs))
        block = _read_log1p(x, rows)
        if codes is None:
            total += np.asarray(block.sum(0), dtype=np.float64).ravel()
            count += len(rows)
            continue
        measured = mask[codes[rows]]  # (rows, genes): only measured entries count
        total += np.asarray(block.multiply(measured).sum(0), dtype=np.float64).ravel()
        count += measured.sum(0)
    return (total / np.maximum(count, 1)).astype(np.float32)


def _vocabulary_center(column_center: np.ndarray, gene_index: torch.Tensor | None, n_genes: int) -> torch.Tensor:
    """Column centres placed on their vocabulary rows (0 for vocabulary genes not registered)."""
    if gene_index is None:
        return torch.as_tensor(column_center)
    index = np.asarray(gene_index)
    center = np.zeros(n_genes, dtype=np.float32)
    center[index[index >= 0]] = column_center[index >= 0]
    return torch.as_tensor(center)


WINDOW_PCA_CELLS = 20_000
"""Cells (a random subsample of a large sample) the windowing PCA is fitted on."""
READ_CHUNK_CELLS = 10_000
"""Rows read from the count matrix at a time while windowing."""


def _read_log1p(x, rows: np.ndarray) -> sparse.csr_matrix:
    """``log1p`` of the sorted ``rows`` of ``x`` (in memory or backed) as float32 CSR."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # contiguous: a slice reads fastest
        block = x[int(rows[0]) : int(rows[-1]) + 1]
    else:
        block = x[rows]
    return sparse.csr_matrix(block, dtype=np.float32).log1p()


def _expression_features(
    x, rows: np.ndarray, n_components: int = 10, n_fit: int | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """Truncated SVD of log1p counts of the sorted ``rows`` of ``x``: the space large
    non-spatial samples are windowed in.

    Fitted on at most ``n_fit`` rows (a seeded random subsample) and projected ``chunk`` rows at
    a time, so memory is bounded for any number of cells and for backed data; the result is
    the same whether ``x`` is in memory or on disk.
    """
    from sklearn.decomposition import TruncatedSVD

    n_fit = WINDOW_PCA_CELLS if n_fit is None else n_fit
    chunk = READ_CHUNK_CELLS if chunk is None else chunk
    rows = np.asarray(rows)
    fit_rows = rows
    if len(rows) > n_fit:
        fit_rows = np.sort(np.random.default_rng(0).choice(rows, n_fit, replace=False))
    sample = sparse.vstack([_read_log1p(x, fit_rows[i : i + chunk])
                            for i in range(0, len(fit_rows), chunk)], format="csr")
    n_comp = min(n_components, x.shape[1] - 1, len(fit_rows) - 1)
    if n_comp < 1:
        return np.vstack([_read_log1p(x, rows[i : i + chunk]).toarray()
                          for i in range(0, len(rows), chunk)])
    svd = TruncatedSVD(n_components=n_comp, random_state=0).fit(sample)
    del sample
    features = np.empty((len(rows), n_comp), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        features[start : start + chunk] = svd.transform(_read_log1p(x, rows[start : start + chunk]))
    return features


def _check_obs_keys(adata: AnnData, **keys: str | None) -> None:
    for name, key in keys.items():
        if key is None:
            continue
        if key not in adata.obs:
            raise InputDataError(
                f"`{name}={key!r}` is not a column of adata.obs (columns: {list(adata.obs.columns)})."
            )
        n_missing = int(adata.obs[key].isna().sum())
        if n_missing:
            raise InputDataError(
                f"adata.obs[{key!r}] (`{name}`) has {n_missing} missing values; fill them, e.g. "
                f"`adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).fillna('unknown')`."
            )


def _check_counts(adata: AnnData, layer: str | None, max_rows: int = 20_000) -> None:
    """Refuse what no count model can use (empty data, NaN/inf, negatives); warn on non-counts.

    Backed data is checked on its first ``max_rows`` rows.
    """
    if adata.is_view:
        raise InputDataError(
            "setup_anndata needs an actual AnnData, not a view: run `adata = adata.copy()` first."
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputDataError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        raise InputDataError(f"`layer={layer!r}` is not in adata.layers ({list(adata.layers)}).")
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise InputDataError(f"{where} is empty (None); pass `layer=` with raw counts.")
    if adata.isbacked or not hasattr(x, "dtype"):
        x = x[: min(max_rows, adata.n_obs)]
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if not np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_:
        raise InputDataError(f"{where} has dtype {values.dtype}; raw counts (numbers) are needed.")
    n_bad, minimum, integral = 0, np.inf, True
    for chunk in _value_chunks(values):  # chunked: no float64 copy of the whole matrix
        n_bad += int((~np.isfinite(chunk)).sum())
        if not n_bad and len(chunk):
            minimum = min(minimum, float(chunk.min()))
            integral = integral and _is_integral(chunk)
    if n_bad:
        raise InputDataError(
            f"{where} contains {n_bad} NaN/inf values; CellPLM needs finite raw counts. "
            "Fix or drop those cells/genes (e.g. `adata = adata[np.isfinite(...)]`) first."
        )
    if minimum < 0:
        raise InputDataError(
            f"{where} contains negative values ({minimum:.3g}): it looks scaled or "
            "centred, not raw counts. Pass the raw counts with `layer='counts'`."
        )
    if not integral:
        warnings.warn(
            f"{where} holds non-integer values: it looks normalised or log-transformed. "
            "CellPLM's negative-binomial model expects raw counts: pass them with `layer=...`.",
            UserWarning,
            stacklevel=3,
        )


def _check_spatial(adata: AnnData, spatial_key: str) -> None:
    if spatial_key not in adata.obsm:
        raise InputDataError(
            f"`spatial_key={spatial_key!r}` is not in adata.obsm (keys: {list(adata.obsm.keys())})."
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise InputDataError(
            f"adata.obsm[{spatial_key!r}] must have 2 or 3 columns (x, y[, z]); got shape "
            f"{coords.shape}."
        )
    if not np.issubdtype(coords.dtype, np.number):
        raise InputDataError(f"adata.obsm[{spatial_key!r}] must be numeric, got {coords.dtype}.")
    missing = ~np.isfinite(coords).all(axis=1)
    if missing.all():
        raise InputDataError(f"adata.obsm[{spatial_key!r}] has no finite coordinates.")
    if missing.any():
        warnings.warn(
            f"{int(missing.sum())} cells have NaN/inf coordinates in adata.obsm[{spatial_key!r}]; "
            "they get the learned 'missing position' encoding.",
            UserWarning,
            stacklevel=3,
        )
