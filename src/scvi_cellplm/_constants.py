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
    BATCH_INDEX_KEY: str = "batch_index"
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


REGISTRY_KEYS = _CELLPLM_REGISTRY_KEYS()
MODULE_KEYS = _CELLPLM_MODULE_KEYS()
SLOTS = _CELLPLM_SLOTS()
SENTENCE_KEY = "sentence"
"""Key of the per-cell sentence id that the sentence loader adds to each mini-batch."""
PERTURBATION_KEY = "perturbation"
"""Key of the per-cell multi-hot vector of perturbed genes in perturbation mini-batches."""
TARGET_KEY = "perturbation_target"
"""Key of the post-perturbation (log-normalised) expression a perturbation mini-batch is fitted to."""
