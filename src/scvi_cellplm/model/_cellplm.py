"""CellPLM: the foundation model as an scvi-tools model (embedding, denoising, query mapping)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData
from scvi.data import AnnDataManager, fields
from scvi.utils import setup_anndata_dsp

from .._constants import MODULE_KEYS, REGISTRY_KEYS, SLOTS
from .._exceptions import InputDataError
from ..io._official import (
    CONFIG_SUFFIX,
    WEIGHTS_SUFFIX,
    config_to_kwargs,
    official_to_ours,
    read_official_config,
    read_official_weights,
    to_official,
)
from ._base import CellPLMBase
from ._embedding import LatentMixin
from ._setup import LabelsField, MuDataGeneLayerField, anndata_fields, check_counts, check_obs_keys
from ._transfer import copy_backbone, transfer

logger = logging.getLogger(__name__)


class CellPLM(LatentMixin, CellPLMBase):
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
        Gene ids of the model's gene table. ``None``: the registered genes. Any AnnData the model
        reads (its own or another) is matched to the vocabulary by identifier (Ensembl id, with
        offline symbol mapping), never by column position; see :meth:`gene_alignment`.
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
        if "source_registry" not in kwargs:  # a transfer may fill a missing labels column
            check_obs_keys(adata, labels_key=labels_key)
        labels = LabelsField(REGISTRY_KEYS.LABELS_KEY, labels_key)
        adata_manager = AnnDataManager(
            fields=anndata_fields(adata, layer, batch_key, sample_key, labels, spatial_key, dataset_key),
            setup_method_args=setup_method_args,
        )
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
        check_counts(mdata[mods.rna_layer], rna_layer)
        mudata_fields = [
            MuDataGeneLayerField(
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
                raise InputDataError(f"`gene_list` has genes not in the AnnData: {missing[:5]}.")
            genes = var_names.get_indexer(gene_list)
        decode_batches = self._decoder_batches(manager, transform_batch)
        dataset_code = None
        if transform_dataset is not None:
            mapping = list(manager.get_state_registry(REGISTRY_KEYS.DATASET_KEY).categorical_mapping)
            if transform_dataset not in mapping:
                raise InputDataError(f"`transform_dataset` must be one of {mapping}, got {transform_dataset!r}.")
            dataset_code = mapping.index(transform_dataset)
        module = self.module
        keep = torch.as_tensor(genes)

        def compute(tensors: dict) -> torch.Tensor:
            inputs = module._get_inference_input(tensors)
            res = module.inference(**inputs)
            gen_inputs = module._get_generative_input(tensors, res)
            dataset = gen_inputs[MODULE_KEYS.DATASET_INDEX_KEY]
            gen_inputs["decode_dataset_index"] = (
                None if dataset_code is None else torch.full_like(dataset, dataset_code))
            acc = 0.0
            for codes in decode_batches(tensors[REGISTRY_KEYS.BATCH_KEY]):
                gen_inputs[MODULE_KEYS.BATCH_INDEX_KEY] = codes
                gen = module.generative(**gen_inputs)
                if module.gene_likelihood == "gaussian":
                    acc = acc + gen[MODULE_KEYS.PX_SCALE_KEY]  # predictions on the data's scale
                elif library_size == "latent":
                    acc = acc + gen[MODULE_KEYS.PX_RATE_KEY]
                else:
                    acc = acc + gen[MODULE_KEYS.PX_SCALE_KEY] * library_size
            return (acc / len(decode_batches))[:, keep]

        out = self._collect(compute, adata, indices, batch_size, n_cols=len(genes))
        if return_numpy:
            return out
        obs_names = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
        return pd.DataFrame(out, index=obs_names, columns=var_names[genes])

    def _decoder_batches(self, manager: AnnDataManager, transform_batch):
        """Map a mini-batch's registered batch codes to the decoder's batch codes.

        With ``transform_batch`` (category names), one code tensor per category; else each
        cell's own batch, matched to the decoder's categories by name (one code tensor). A batch
        the decoder was not trained on asks for ``transform_batch``. Models without a batch input
        to the decoder get ``[None]``.
        """
        known = self.decoder_batch_categories_
        if not self.batch_in_decoder:
            if transform_batch is not None:
                raise InputDataError("This model's decoder reads no batch: drop `transform_batch`.")
            return _Decode([None])
        if transform_batch is not None:
            wanted = [str(b) for b in np.atleast_1d(transform_batch)]
            unknown = [b for b in wanted if b not in known]
            if unknown:
                raise InputDataError(f"`transform_batch` names batches the model was not trained on: "
                                     f"{unknown[:5]}; known: {known[:10]}.")
            return _Decode([known.index(b) for b in wanted], constant=True)
        mapping = manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        lookup = torch.as_tensor([known.index(str(c)) if str(c) in known else -1 for c in mapping])
        if bool((lookup < 0).any()):
            new = [str(c) for c, code in zip(mapping, lookup.tolist()) if code < 0]
            return _Decode(lookup, unknown=new, known=known)
        return _Decode(lookup)

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

    # ------------------------------------------------------------------ query mapping
    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: CellPLM,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: int | str = "auto",
        unfrozen: bool = False,
        freeze_encoder: bool | None = None,
    ) -> CellPLM:
        """Build a model for new data on ``reference_model`` (scArches, as scvi-tools' ``ArchesMixin``).

        The query is set up like the reference; new batch, sample and label categories extend the
        reference's (a label column may be missing: its cells are unlabelled). Query genes are
        matched to the reference's vocabulary by identifier, in any order (missing genes are
        unmeasured, extra ones dropped). The decoder's batch table gets rows for the new batches;
        unless ``unfrozen``, only those rows train: every reference weight stays exactly as it
        was, so reference embeddings are unchanged. Train with :meth:`train` (weight decay is off
        for frozen models).

        Parameters
        ----------
        adata
            Query data (raw counts; any genes).
        reference_model
            A trained :class:`~scvi_cellplm.CellPLM`.
        inplace_subset_query_vars
            Accepted for ``ArchesMixin`` compatibility; nothing to do (genes match by identifier).
        accelerator, device
            Where to put the query model.
        unfrozen
            Train every weight (``ArchesMixin``'s ``unfrozen``).
        freeze_encoder
            Deprecated spelling of ``not unfrozen``.
        """
        frozen = not unfrozen if freeze_encoder is None else freeze_encoder
        registry = reference_model.adata_manager.registry
        method = registry.get("setup_method_name", "setup_anndata")
        getattr(cls, method)(adata, source_registry=registry, extend_categories=True,
                             allow_missing_labels=True, **registry["setup_args"])
        state = reference_model.module.state_dict()
        tables = {k: v.shape[0] for k, v in state.items() if k.endswith("batch.embedding.weight")}
        n_old = next(iter(tables.values()), 0)
        n_new = cls._get_most_recent_anndata_manager(adata, required=True).summary_stats.n_batch
        overrides = {"n_batch_embeddings": max(n_new, n_old)} if tables else {}
        model = transfer(cls, adata, reference_model, overrides)
        model.decoder_batch_categories_ = [str(c) for c in model.adata_manager.get_state_registry(
            REGISTRY_KEYS.BATCH_KEY).categorical_mapping]
        if frozen:
            for name, p in model.module.named_parameters():
                p.requires_grad_(name in tables)
                if name in tables:
                    p.register_hook(lambda g, n=tables[name]: torch.cat([torch.zeros_like(g[:n]), g[n:]]))
        model.to_device(_device(accelerator, device))
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
            Replace translated keyword arguments, e.g. ``positional_encoding="sinusoidal"`` (a
            new, untrained encoding to fine-tune) or ``max_cells_per_batch``. By default a sample
            of up to ``OFFICIAL_SENTENCE_CELLS`` (100,000) cells is one sentence, as in the
            official ``predict``; larger samples are windowed (logged).

        Returns
        -------
        The loaded model, marked as trained.

        Raises
        ------
        ~scvi_cellplm.CheckpointError
            Missing, unreadable, unsafe or mismatching files, or an unsupported configuration.
        """
        config = read_official_config(prefix + CONFIG_SUFFIX)
        kwargs = {**config_to_kwargs(config), **kwargs}
        state = read_official_weights(prefix + WEIGHTS_SUFFIX)
        model = cls(adata, **kwargs)
        copy_backbone(official_to_ours(state, model.module), model.module,
                      allow_missing=("pos_encoder.", "neighbourhood."))  # new, untrained parts
        model.module.eval()
        model.is_trained_ = True
        model.official_config = {k: v for k, v in config.items() if k != "gene_list"}
        logger.info("Loaded official checkpoint %s (%s).", prefix, config.get("name", "unnamed"))
        return model

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
        to_official(self, prefix)


def _device(accelerator: str, device: int | str):
    from scvi.model._utils import parse_device_args

    return parse_device_args(accelerator=accelerator, devices=device, return_device="torch",
                             validate_single_device=True)[2]


class _Decode:
    """The decoder batch codes of a mini-batch (see ``CellPLM._decoder_batches``)."""

    def __init__(self, codes, constant: bool = False, unknown=(), known=()) -> None:
        self.codes, self.constant, self.unknown, self.known = codes, constant, list(unknown), list(known)

    def __len__(self) -> int:
        return len(self.codes) if self.constant or isinstance(self.codes, list) else 1

    def __call__(self, batch: torch.Tensor) -> list:
        if isinstance(self.codes, list) and not self.constant:  # [None]: no batch input
            return self.codes
        if self.constant:
            return [torch.full_like(batch.view(-1, 1), code) for code in self.codes]
        codes = self.codes.to(batch.device)[batch.view(-1).long()].view(-1, 1)
        if bool((codes < 0).any()):
            raise InputDataError(
                f"Some cells belong to batches the model was not trained on ({self.unknown[:5]}); "
                f"decode them as known batches with `transform_batch=[...]` (e.g. {self.known[:3]})."
            )
        return [codes]
