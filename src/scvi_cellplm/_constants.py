"""Registry keys, module output keys and result slot names, defined once."""

from __future__ import annotations

from typing import NamedTuple


class _CELLPLM_REGISTRY_KEYS(NamedTuple):
    X_KEY: str = "X"
    BATCH_KEY: str = "batch"
    SAMPLE_KEY: str = "sample"
    LABELS_KEY: str = "labels"
    SPATIAL_KEY: str = "spatial"
    DATASET_KEY: str = "dataset"


class _CELLPLM_MODULE_KEYS(NamedTuple):
    X_KEY: str = "x"
    SENTENCE_KEY: str = "sentence"
    COORDS_KEY: str = "coords"
    GENE_INDEX_KEY: str = "gene_index"
    BATCH_INDEX_KEY: str = "batch_index"
    DATASET_INDEX_KEY: str = "dataset_index"
    GENE_MASK_KEY: str = "gene_mask"
    INPUT_MASK_KEY: str = "input_mask"
    HIDDEN_KEY: str = "h"
    Z_KEY: str = "z"
    QZ_KEY: str = "qz"
    QZM_KEY: str = "qzm"
    CLUSTER_PROBS_KEY: str = "cluster_probs"
    LATENT_LOSS_KEY: str = "latent_loss"
    PX_SCALE_KEY: str = "px_scale"
    PX_THETA_KEY: str = "px_theta"
    PX_KEY: str = "px"
    PX_RATE_KEY: str = "px_rate"
    LOGITS_KEY: str = "logits"
    LIBRARY_KEY: str = "library"
    PERTURBATION_KEY: str = "perturbation"
    PERTURBATION_EMBEDDING_KEY: str = "perturbation_embedding"
    PREDICTION_KEY: str = "prediction"


class _CELLPLM_SLOTS(NamedTuple):
    """Where results land in an AnnData."""

    EMBEDDING: str = "X_cellplm"
    DENOISED: str = "cellplm_denoised"
    IMPUTED: str = "cellplm_imputed"
    LEIDEN: str = "cellplm_leiden"
    UMAP: str = "X_umap_cellplm"
    PREDICTION: str = "cellplm_prediction"


class _CELLPLM_DATA_KEYS(NamedTuple):
    """Keys the sentence loaders add to each mini-batch (next to the registry keys)."""

    SENTENCE_KEY: str = "sentence"  # per-cell sentence number within the mini-batch
    INDICES_KEY: str = "_obs_indices"  # per-cell obs index
    GENE_INDEX_KEY: str = "gene_index"  # (n_input,) vocabulary row of each column (-1: none)
    PERTURBATION_KEY: str = "perturbation"  # per-cell multi-hot vector of perturbed genes
    TARGET_KEY: str = "perturbation_target"  # post-perturbation log-normalised expression
    PLATFORM_KEY: str = "platform"  # corpus pretraining: platform code of each cell
    PADDING_KEY: str = "_padding"  # corpus pretraining: a repeated batch that equalises DDP ranks


class _CELLPLM_COVARIATES(NamedTuple):
    """Covariates the decoder embeds (names of its tables, part of the weights' keys)."""

    BATCH: str = "batch"
    DATASET: str = "dataset"


class _CELLPLM_COLUMNS(NamedTuple):
    """Names this package writes into AnnData objects it builds (never the user's)."""

    DATASET: str = "_cellplm_dataset"  # joint spatial + reference AnnData: the source of each cell
    SAMPLE: str = "_cellplm_sample"  # joint AnnData: the sentence (sample) of each cell
    CONNECTIVITIES: str = "spatial_connectivities"  # squidpy's obsp graph, reused for windows


REGISTRY_KEYS = _CELLPLM_REGISTRY_KEYS()
MODULE_KEYS = _CELLPLM_MODULE_KEYS()
DATA_KEYS = _CELLPLM_DATA_KEYS()
COLUMNS = _CELLPLM_COLUMNS()
COVARIATES = _CELLPLM_COVARIATES()
SLOTS = _CELLPLM_SLOTS()

SENTENCE_KEY = DATA_KEYS.SENTENCE_KEY
INDICES_KEY = DATA_KEYS.INDICES_KEY
PERTURBATION_KEY = DATA_KEYS.PERTURBATION_KEY
TARGET_KEY = DATA_KEYS.TARGET_KEY

MODEL_FILE = "model.safetensors"
"""Weights of a saved model (safetensors: tensors only) in the folder :meth:`CellPLM.save` writes."""
METADATA_FILE = "metadata.json"
"""JSON metadata (class, setup, constructor arguments, gene vocabulary) next to :data:`MODEL_FILE`;
written last, it marks a complete save."""
LEGACY_MODEL_FILE = "model.pt"
"""File of a model saved by earlier versions (state dict + JSON metadata in one ``torch.save``);
still read, with ``weights_only=True``."""
CACHE_ENV = "CELLPLM_CACHE"
"""Environment variable naming the folder of downloaded models (default: the user cache)."""
ADATA_FILE = "adata.h5ad"
"""File of the AnnData saved next to a model with ``save_anndata=True``."""
UNLABELED = "unlabeled"
"""Label of cells of a query whose AnnData has no labels column."""
OFFICIAL_SENTENCE_CELLS = 100_000
"""Sentence bound of models loaded from official checkpoints: samples up to this many cells are
embedded as one sentence, as the official ``predict`` does; larger ones are windowed (logged)."""
LOW_VOCABULARY_SHARE = 0.5
"""Gene alignment warns when a dataset measures less than this share of the model's vocabulary."""
MAX_COORDINATE = 1e30
"""Largest usable absolute spatial coordinate. A cell with any coordinate NaN, ±inf or beyond this
(no tissue is that large; the loaders deliver float32, whose range ends at 3.4e38) has no usable
position: it gets the learned "missing position" encoding and no spatial neighbours."""
