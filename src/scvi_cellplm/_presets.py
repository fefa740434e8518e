"""Hyperparameter presets: plain dicts of :class:`~scvi_cellplm.CellPLM` keyword arguments."""

from __future__ import annotations

SMALL_CPU: dict = {
    "n_hidden": 128,
    "n_layers": 2,
    "n_heads": 4,
    "n_latent": 10,
    "n_decoder_layers": 2,
    "n_clusters": 16,
    "latent_distribution": "vae",
    "attention": "flowformer",
    "norm": "layernorm",
    "dropout": 0.1,
}
"""Default: a small model that pretrains on a laptop CPU in minutes.

Its latent is a 10-dimensional VAE (scVI's latent size; the official ``20231027_85M`` checkpoint's
prior): on the quality benchmark (docs/user_guide/quality.md) it gave better Leiden clusters than
the paper's GMVAE prior and, with 256-cell training sentences, Leiden ARI level with scVI's."""

PAPER: dict = {
    "n_hidden": 1024,
    "n_layers": 4,
    "n_heads": 8,
    "n_latent": 512,
    "n_decoder_layers": 2,
    "n_clusters": 16,
    "latent_distribution": "gmvae",
    "attention": "flowformer",
    "norm": "groupnorm",
    "dropout": 0.2,
    "gmvae_gaussian_weight": 5.0,
    "gmvae_categorical_weight": 5.0,
    "kl_free_bits": 5.0,
}
"""The configuration of the official ``20230926_85M`` checkpoint (Wen et al., ICLR 2024)."""

PRESETS: dict[str, dict] = {"small": SMALL_CPU, "paper": PAPER}
