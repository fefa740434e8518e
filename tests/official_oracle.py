"""Helpers that drive the official ``cellplm`` package (import ``CellPLM``) as a reference oracle.

The official GMVAE samples a Gumbel cluster even in ``eval()``; :func:`deterministic_official`
patches its sampler to return zeros, which selects the most likely cluster (our eval behaviour).
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
import torch

CellPLM_official = pytest.importorskip(
    "CellPLM", reason="the official `cellplm` package is not installed (pip install --no-deps cellplm)"
)


def small_config(gene_list, latent_mod="gmvae", **overrides) -> dict:
    """A small official config with the paper's layout (random weights)."""
    config = {
        "name": "test_small", "enc_mod": "flowformer", "enc_hid": 64, "enc_layers": 2,
        "enc_head": 4, "latent_mod": latent_mod, "lamda": 5.0, "post_latent_dim": 16,
        "dec_mod": "nbmlp", "dec_hid": 48, "dec_layers": 2, "model_dropout": 0.2,
        "mask_node_rate": 0.75, "mask_feature_rate": 0.25, "drop_node_rate": 0.3,
        "norm": "groupnorm", "w_li": 5.0, "w_en": 5.0, "num_clusters": 8,
        "out_dim": len(gene_list), "cat_pe": False, "max_batch_size": 4000, "dar": False,
        "input_covariate": False, "ecs": False, "dsbn": False, "dae": True, "mask_beta": True,
        "batch_num": 7, "dataset_num": 3, "gene_list": list(gene_list),
    }
    config.update(overrides)
    return config


def build_official(config: dict, seed: int = 0):
    """An official ``OmicsFormer`` with random weights built from ``config``."""
    from CellPLM.model import OmicsFormer

    torch.manual_seed(seed)
    model = OmicsFormer(**config)
    with torch.no_grad():  # make every parameter non-trivial (norms and PReLU included)
        for name, p in model.named_parameters():
            if "pe_enc.pe_enc" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_official(model, config: dict, directory: str, prefix: str) -> str:
    """Write the official checkpoint pair; returns the path prefix."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{prefix}.config.json"), "w") as fh:
        json.dump(config, fh)
    torch.save({"model_state_dict": model.state_dict()},
               os.path.join(directory, f"{prefix}.best.ckpt"))
    return os.path.join(directory, prefix)


@contextlib.contextmanager
def deterministic_official():
    """Patch the official Gumbel sampler to zeros (argmax cluster in eval)."""
    from CellPLM.latent.autoencoders import GumbelSoftmax

    original = GumbelSoftmax.sample_gumbel
    GumbelSoftmax.sample_gumbel = lambda self, logits, eps=1e-20: torch.zeros_like(logits)
    try:
        yield
    finally:
        GumbelSoftmax.sample_gumbel = original


def official_embedding(directory: str, prefix: str, adata) -> np.ndarray:
    """Embeddings from the official pipeline; ``adata.var_names`` must be Ensembl ids and
    ``adata.obs['batch']`` defines the sentences (as the official code does)."""
    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline

    with deterministic_official(), contextlib.redirect_stdout(open(os.devnull, "w")):
        pipeline = CellEmbeddingPipeline(pretrain_prefix=prefix, pretrain_directory=directory)
        out = pipeline.predict(adata, device="cpu", ensembl_auto_conversion=False)
    return out.cpu().numpy()


def official_decoder_mean(model, latent: torch.Tensor, batch=None) -> np.ndarray:
    """The official NB decoder's normalised means for given latents (and batch ids)."""
    x_dict = {"h": latent}
    if batch is not None:
        x_dict["batch"] = batch
    with torch.no_grad():
        out = model.decoder(x_dict)
    mean = out["mean"]
    return (mean / mean.sum(1, keepdim=True)).numpy()
