"""CellPLM: the foundation model as an scvi-tools model (embedding, denoising, query mapping)."""

from __future__ import annotations

import logging

import torch
from anndata import AnnData
from mudata import MuData
from scvi.data import AnnDataManager, fields
from scvi.utils import setup_anndata_dsp

from .._constants import REGISTRY_KEYS
from .._exceptions import InputDataError
from ._base import CellPLMBase
from ._embedding import LatentMixin
from ._expression import ExpressionMixin
from ._official import OfficialCheckpointMixin
from ._pretrained import PretrainedMixin
from ._setup import LabelsField, MuDataGeneLayerField, anndata_fields, check_counts, check_obs_keys
from ._transfer import transfer

logger = logging.getLogger(__name__)


class CellPLM(LatentMixin, ExpressionMixin, OfficialCheckpointMixin, PretrainedMixin, CellPLMBase):
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
        ``"vae"`` (default; the official ``20231027_85M`` checkpoint's standard normal prior) or
        ``"gmvae"`` (the paper's Gaussian-mixture prior, ``n_clusters`` components).
    gmvae_embedding
        The GMVAE's cell embedding: ``"mean"`` (default), the posterior mean over its mixture
        components, or ``"cluster"``, the mean of the most likely component (official checkpoints,
        whose embeddings it reproduces; it jumps between components for cells between clusters).
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
    n_top_genes
        Without ``gene_vocabulary``, data with more registered genes than this gets a vocabulary
        of its ``n_top_genes`` most variable genes (``seurat_v3`` on counts, per batch; see
        :func:`~scvi_cellplm.data.highly_variable_genes`): training time grows with the
        vocabulary (about 10x from 2,000 to 20,000 genes) and the selected genes carry the cell
        types. The other genes are not read, and decode as 0. ``None``: every registered gene.
    input_target_sum
        The embedder reads each cell's counts scaled to this total (over its vocabulary genes)
        before ``log1p``, as scanpy's ``normalize_total``: relative expression, so sequencing
        depth does not move the embedding (the decoder still uses each cell's library).
        ``None``: raw counts, as the official embedder (official checkpoints, models saved by
        earlier versions, ``center_input=True`` and ``gene_likelihood="gaussian"`` models).
    token_norm
        How cell tokens are normalised before the transformer. ``"cell"`` (default; the official
        architecture): each token on its own (``norm``), and a LayerNorm after the transformer.
        ``"sample"``: each token feature standardised over the cells of the token's sentence (its
        sample, or a window of a large one; :class:`~scvi_cellplm.module.SampleNorm`), which takes
        out what a sample's cells share (a batch's shift) and keeps how they differ; no norm after
        the transformer. Models with ``"sample"`` cannot be exported to the official format.
    **module_kwargs
        Passed to :class:`~scvi_cellplm.module.CellPLMModule` (e.g. ``kl_free_bits``).

    Examples
    --------
    >>> adata = scvi_cellplm.datasets.pancreas_demo()
    >>> CellPLM.setup_anndata(adata, batch_key="batch")
    >>> model = CellPLM(adata)
    >>> model.train()
    >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
    """

    _train_cells = 256  # training sentences (data without coordinates); see CellPLMBase.train
    _train_sentences = "random"
    _plan_defaults = {"batch_adversarial_weight": 5.0}  # see docs/user_guide/quality.md
    _single_batch_lr = 2e-4  # no batches to remove: the smaller step (docs/user_guide/quality.md)

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

        The signature and semantics are ``ArchesMixin``'s; the mixin itself is not used because
        it rebuilds the module from registry sizes and pads genes by position, where a CellPLM
        query keeps the reference's vocabulary and decoder tables (see ``model._transfer``).

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


def _device(accelerator: str, device: int | str):
    from scvi.model._utils import parse_device_args

    return parse_device_args(accelerator=accelerator, devices=device, return_device="torch",
                             validate_single_device=True)[2]
