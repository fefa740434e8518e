"""Official CellPLM checkpoints (``PREFIX.config.json`` + ``PREFIX.best.ckpt``) ↔ our model.

The official JSON config is translated once, here, into :class:`~scvi_cellplm.CellPLM` keyword
arguments; every official state-dict key is mapped explicitly to ours. Weights are read with
``torch.load(weights_only=True)``: no pickled code runs. Missing, unexpected or mis-shaped weights
raise :class:`~scvi_cellplm.CheckpointError` (the official loader silently drops them).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch

from .._constants import COVARIATES, OFFICIAL_SENTENCE_CELLS
from .._exceptions import CheckpointError
from ._safe_load import safe_torch_load
from ._validate import (
    MAX_CATEGORIES,
    MAX_DEPTH,
    MAX_WIDTH,
    check_bool,
    check_float,
    check_int,
    check_mapping,
    check_names,
)

logger = logging.getLogger(__name__)

CONFIG_SUFFIX = ".config.json"
WEIGHTS_SUFFIX = ".best.ckpt"

# Official config keys that describe training or data, not the network: read and ignored.
TRAINING_KEYS = frozenset({
    "name", "dataset", "architecture", "epochs", "lr", "wd", "ddp", "val_num", "beta",
    "batch_mixing", "batch_flip", "mask_node_rate", "mask_feature_rate", "drop_node_rate",
    "mask_beta", "max_batch_size", "dae", "mask_type", "es", "patience", "workers", "seed",
    "max_eval_batch_size", "hvg", "device", "activation", "pe_type", "w_ce",
})
# Official config keys that describe the network, with the values we support.
MODEL_KEYS = frozenset({
    "enc_mod", "enc_hid", "enc_layers", "enc_head", "latent_mod", "post_latent_dim", "dec_mod",
    "dec_hid", "dec_layers", "model_dropout", "norm", "num_clusters", "out_dim", "batch_num",
    "dataset_num", "platform_num", "gene_list", "lamda", "w_li", "w_en", "cat_pe",
    "input_covariate", "dsbn", "ecs", "dar", "head_type",
})
# Parameters the official embedder builds but never uses in its forward pass: ``norm0`` is
# commented out, and the positional encoding is multiplied by zero (``pe = 0.``).
UNUSED_OFFICIAL_KEYS = (
    "embedder.norm0.weight",
    "embedder.norm0.bias",
    "embedder.pe_enc.missing_pe",
    "embedder.pe_enc.pe_enc.weight",
)
_MUST_BE_OFF = ("input_covariate", "dsbn", "ecs", "dar", "cat_pe")
# Integer network keys: (lowest, highest); the required ones are in _REQUIRED.
_INT_KEYS = {
    "enc_hid": (1, MAX_WIDTH), "enc_layers": (1, MAX_DEPTH), "enc_head": (1, MAX_DEPTH),
    "post_latent_dim": (1, MAX_WIDTH), "dec_hid": (1, MAX_WIDTH), "dec_layers": (2, MAX_DEPTH),
    "num_clusters": (1, MAX_WIDTH), "out_dim": (1, MAX_CATEGORIES), "batch_num": (0, MAX_CATEGORIES),
    "dataset_num": (0, MAX_CATEGORIES), "platform_num": (0, MAX_CATEGORIES),
}
# Float network keys: (lowest, highest, highest excluded)
_FLOAT_KEYS = {"model_dropout": (0.0, 1.0, True), "lamda": (0.0, 1e6, False), "w_li": (0.0, 1e6, False),
               "w_en": (0.0, 1e6, False)}
_REQUIRED = ("enc_mod", "enc_hid", "enc_layers", "latent_mod", "post_latent_dim", "dec_hid",
             "dec_layers", "norm", "gene_list")
MAX_OFFICIAL_PARAMETERS = 2_000_000_000
"""Largest network an official config may describe (the official checkpoints have 85M parameters)."""


def read_official_config(path: str) -> dict:
    """Read an official ``*.config.json`` and check it (see :func:`check_official_config`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError as err:
        raise CheckpointError(f"No official config at {path}.") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    except OSError as err:
        raise CheckpointError(f"Cannot read the official config {path}: {err}") from err
    return check_official_config(config, path)


def check_official_config(config, where: str = "official config") -> dict:
    """Check the types and ranges of every network key of an official config; return it.

    Sizes are integers in bounded ranges (widths up to ``MAX_WIDTH``, layers and heads up to
    ``MAX_DEPTH``, batch and dataset tables and genes up to ``MAX_CATEGORIES``, the whole network
    up to ``MAX_OFFICIAL_PARAMETERS``), rates finite numbers, switches booleans, and ``gene_list``
    a list of distinct non-empty strings. Raises :class:`~scvi_cellplm.CheckpointError` naming the
    first bad field, before anything is built.
    """
    check_mapping(config, "(top level)", where)
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise CheckpointError(f"{where}: required fields missing: {missing}.")
    sizes = {k: check_int(config[k], k, lo, hi, where) for k, (lo, hi) in _INT_KEYS.items() if k in config}
    for key, (lo, hi, open_) in _FLOAT_KEYS.items():
        if key in config:
            check_float(config[key], key, lo, hi, where, high_open=open_)
    for key in _MUST_BE_OFF:
        if key in config:
            check_bool(config[key], key, where)
    genes = check_names(config["gene_list"], "gene_list", where)
    if sizes["enc_hid"] % sizes.get("enc_head", 8):
        raise CheckpointError(f"{where}: field 'enc_hid' ({sizes['enc_hid']}) must be a multiple of "
                              f"'enc_head' ({sizes.get('enc_head', 8)}).")
    hid, dec, lat = sizes["enc_hid"], sizes["dec_hid"], sizes["post_latent_dim"]
    tables = sizes.get("batch_num", 0) + sizes.get("dataset_num", 0)
    n_params = (len(genes) * (hid + 2 * dec) + sizes["enc_layers"] * 12 * hid * hid
                + hid * (2 * lat + sizes.get("num_clusters", 16))
                + (sizes["dec_layers"] - 1) * dec * (lat + dec + tables))
    if n_params > MAX_OFFICIAL_PARAMETERS:
        raise CheckpointError(f"{where}: the sizes describe a network of about {n_params:.3g} parameters "
                              f"(at most {MAX_OFFICIAL_PARAMETERS:.0e}); the config is damaged or not CellPLM's.")
    return config


def config_to_kwargs(config: dict) -> dict[str, Any]:
    """Translate an official config into :class:`~scvi_cellplm.CellPLM` keyword arguments.

    Raises :class:`~scvi_cellplm.CheckpointError` naming unknown keys, malformed fields (see
    :func:`check_official_config`) and unsupported values.
    """
    check_official_config(config)
    unknown = sorted(set(config) - MODEL_KEYS - TRAINING_KEYS)
    if unknown:
        raise CheckpointError(f"Unknown keys in the official config: {unknown}.")
    problems = []
    if config.get("enc_mod") != "flowformer":
        problems.append(f"enc_mod={config.get('enc_mod')!r} (only 'flowformer')")
    if config.get("latent_mod") not in ("gmvae", "vae"):
        problems.append(f"latent_mod={config.get('latent_mod')!r} (only 'gmvae' or 'vae')")
    if config.get("dec_mod", "nbmlp") != "nbmlp":
        problems.append(f"dec_mod={config.get('dec_mod')!r} (only 'nbmlp')")
    if config.get("norm") not in ("layernorm", "groupnorm"):
        problems.append(f"norm={config.get('norm')!r} (only 'layernorm' or 'groupnorm')")
    problems += [f"{k}=True (unsupported)" for k in _MUST_BE_OFF if config.get(k, False)]
    if config.get("head_type") is not None:
        problems.append(f"head_type={config['head_type']!r} (only None)")
    if config.get("platform_num", 0):
        problems.append("platform_num > 0 (platform covariate unsupported)")
    if config.get("out_dim", len(config["gene_list"])) != len(config["gene_list"]):
        problems.append(f"out_dim={config['out_dim']} differs from len(gene_list)")
    if problems:
        raise CheckpointError("Unsupported official config: " + "; ".join(problems) + ".")
    latent = config["latent_mod"]
    return {
        "n_hidden": int(config["enc_hid"]),
        "n_layers": int(config["enc_layers"]),
        "n_heads": int(config.get("enc_head", 8)),
        "n_latent": int(config["post_latent_dim"]),
        "n_decoder_layers": int(config["dec_layers"]),
        "n_decoder_hidden": int(config["dec_hid"]),
        "n_clusters": int(config.get("num_clusters", 16)),
        "latent_distribution": latent,
        "attention": "flowformer",
        "positional_encoding": "none",
        "norm": config["norm"],
        "dropout": float(config.get("model_dropout", 0.1)),
        "gene_vocabulary": [str(g) for g in config["gene_list"]],
        "n_batch_embeddings": int(config.get("batch_num", 0)),
        "n_dataset_embeddings": int(config.get("dataset_num", 0)),
        "batch_in_decoder": False,
        # the official predict embeds a whole sample as one sentence: so do we, up to a bound
        "max_cells_per_batch": OFFICIAL_SENTENCE_CELLS,
        # the official VAE layer is built with its default free bits (1.0), the GMVAE with lamda
        "kl_free_bits": float(config.get("lamda", 0.5)) if latent == "gmvae" else 1.0,
        "gmvae_gaussian_weight": float(config.get("w_li", 1.0)),
        "gmvae_categorical_weight": float(config.get("w_en", 1.0)),
        # parity: the official GMVAE embeds a cell with one cluster (compared at the most likely one)
        "gmvae_embedding": "cluster",
        "input_target_sum": None,  # the official embedder reads log1p of the raw counts
        "token_norm": "cell",  # the official embedder's LayerNorm/GroupNorm of each cell token
    }


def official_key_map(
    n_layers: int, n_decoder_layers: int, latent: str, covariates: tuple[str, ...]
) -> dict[str, str]:
    """Official state-dict key → our key, for a network of the given shape."""
    pairs = {
        "embedder.feat_enc.emb": "embedder.gene_table",
        "embedder.extra_linear.0": "embedder.proj",
        "embedder.extra_linear.3": "embedder.norm",
        "pre_latent_norm.norm": "encoder.final_norm",
    }
    attn = {"query_projection": "q_proj", "key_projection": "k_proj",
            "value_projection": "v_proj", "out_projection": "out_proj"}
    for i in range(n_layers):
        o, u = f"encoder.layers.{i}.", f"encoder.blocks.{i}."
        pairs.update({f"{o}self_attn.{a}": f"{u}attn.{b}" for a, b in attn.items()})
        pairs.update({f"{o}norm1": f"{u}norm1", f"{o}norm2": f"{u}norm2",
                      f"{o}_ff_block.0": f"{u}ff.0", f"{o}_ff_block.3": f"{u}ff.3"})
    if latent == "gmvae":
        p = "latent.layers.1.inference."
        pairs.update({
            f"{p}inference_qyx.0.logits": "latent.cluster_logits",
            f"{p}inference_qzyx.0": "latent.hidden",
            f"{p}inference_qzyx.2.mu": "latent.mean",
            f"{p}inference_qzyx.2.var": "latent.var",
            f"{p}y_mu": "latent.prior_mean",
            f"{p}y_var": "latent.prior_var",
        })
    else:
        pairs.update({"latent.layers.1.hid_2mu": "latent.mean",
                      "latent.layers.1.hid_2sigma": "latent.log_var"})
    for i in range(n_decoder_layers - 1):
        o, u = f"decoder.layers.{i}.", f"decoder.layers.{i}."
        pairs.update({f"{o}0": f"{u}linear", f"{o}3": f"{u}norm"})
        for cov in covariates:
            oc, uc = f"decoder.covariate_layers.{i}.{cov}.", f"decoder.covariates.{i}.{cov}."
            pairs.update({f"{oc}2": f"{uc}norm"})
    pairs.update({"decoder.out_layer.dec_1": "decoder.head",
                  "decoder.out_layer.dec_mean.0": "decoder.mean"})
    key_map = {}
    for o, u in pairs.items():
        if o == "embedder.feat_enc.emb":
            key_map[o] = u
            continue
        key_map[f"{o}.weight"] = f"{u}.weight"
        key_map[f"{o}.bias"] = f"{u}.bias"
    for i in range(n_decoder_layers - 1):
        key_map[f"decoder.layers.{i}.1.weight"] = f"decoder.layers.{i}.act.weight"
        for cov in covariates:
            oc, uc = f"decoder.covariate_layers.{i}.{cov}.", f"decoder.covariates.{i}.{cov}."
            key_map[f"{oc}0.weight"] = f"{uc}embedding.weight"
            key_map[f"{oc}1.weight"] = f"{uc}act.weight"
    key_map["decoder.out_layer.dec_disp"] = "decoder.log_theta"
    return key_map


def _key_map_for(module) -> dict[str, str]:
    covariates = tuple(module.decoder.covariates[0].keys()) if len(module.decoder.covariates) else ()
    latent = module.latent_distribution
    n_dec = len(module.decoder.layers) + 1
    return official_key_map(len(module.encoder.blocks), n_dec, latent, covariates)


def read_official_weights(path: str) -> dict[str, torch.Tensor]:
    """Read the official state dict in ``path``, loaded without executing pickled code."""
    payload = safe_torch_load(path, "official weights")
    state = payload.get("model_state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors.")
    return state


def official_to_ours(official: dict[str, torch.Tensor], module) -> dict[str, torch.Tensor]:
    """Map an official state dict onto ``module``'s keys, checking every key and shape."""
    key_map = _key_map_for(module)
    ours = module.state_dict()
    unexpected = sorted(set(official) - set(key_map) - set(UNUSED_OFFICIAL_KEYS))
    missing = sorted(set(key_map) - set(official))
    shapes = [
        f"{k}: checkpoint {tuple(official[k].shape)} vs model {tuple(ours[v].shape)}"
        for k, v in key_map.items()
        if k in official and tuple(official[k].shape) != tuple(ours[v].shape)
    ]
    if unexpected or missing or shapes:
        raise CheckpointError(
            "The official checkpoint does not fit the model built from its config: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}, {len(shapes)} shape mismatches {shapes[:5]}."
        )
    return {v: official[k] for k, v in key_map.items()}


def official_sinusoidal_table(n_hidden: int, height: int = 100, width: int = 100) -> torch.Tensor:
    """Return the fixed table of the official (unused) ``Sinusoidal2dPE``, for complete exports."""
    pe = torch.zeros(n_hidden, height, width)
    half = n_hidden // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    pe[0:half:2] = torch.sin(pos_w * div).T.unsqueeze(1).repeat(1, height, 1)
    pe[1:half:2] = torch.cos(pos_w * div).T.unsqueeze(1).repeat(1, height, 1)
    pe[half::2] = torch.sin(pos_h * div).T.unsqueeze(2).repeat(1, 1, width)
    pe[half + 1 :: 2] = torch.cos(pos_h * div).T.unsqueeze(2).repeat(1, 1, width)
    return pe.flatten(1).T.contiguous()


def ours_to_official(module) -> dict[str, torch.Tensor]:
    """Our module's weights under official keys, including the official unused parameters."""
    ours = module.state_dict()
    out = {k: ours[v].detach().clone() for k, v in _key_map_for(module).items()}
    n_hidden = ours["embedder.gene_table"].shape[1]
    out["embedder.norm0.weight"] = torch.ones(n_hidden)
    out["embedder.norm0.bias"] = torch.zeros(n_hidden)
    out["embedder.pe_enc.missing_pe"] = torch.zeros(n_hidden)
    out["embedder.pe_enc.pe_enc.weight"] = official_sinusoidal_table(n_hidden)
    return out


def model_to_config(model) -> dict:
    """Return the official config describing ``model``'s network."""
    module = model.module
    params = model.init_params_["non_kwargs"]
    extra = model.init_params_["kwargs"].get("module_kwargs", {})
    if params["attention"] != "flowformer":
        raise CheckpointError("The official format holds only attention='flowformer' models.")
    if params["positional_encoding"] != "none":
        raise CheckpointError(
            "The official format has no working positional encoding (the official code zeroes "
            "it): export a model with positional_encoding='none'."
        )
    needs = {"input_target_sum=None": getattr(module, "input_target_sum", None) is not None,
             "token_norm='cell'": getattr(module, "sample_norm", None) is not None}
    if any(needs.values()):
        raise CheckpointError(
            "The official network reads raw counts and normalises each cell token on its own: "
            f"export a model built with `CellPLM(adata, {', '.join(k for k, v in needs.items() if v)})`."
        )
    first = module.decoder.covariates[0] if len(module.decoder.covariates) else {}
    n_batch = first[COVARIATES.BATCH].embedding.num_embeddings if COVARIATES.BATCH in first else 0
    n_dataset = first[COVARIATES.DATASET].embedding.num_embeddings if COVARIATES.DATASET in first else 0
    return {
        "name": "scvi-cellplm export",
        "architecture": "OmicsFormer",
        "enc_mod": "flowformer",
        "enc_hid": params["n_hidden"],
        "enc_layers": params["n_layers"],
        "enc_head": params["n_heads"],
        "latent_mod": params["latent_distribution"],
        "post_latent_dim": params["n_latent"],
        "dec_mod": "nbmlp",
        "dec_hid": extra.get("n_decoder_hidden") or params["n_hidden"],
        "dec_layers": params["n_decoder_layers"],
        "model_dropout": params["dropout"],
        "norm": params["norm"],
        "num_clusters": params["n_clusters"],
        "lamda": module.kl_free_bits,
        "w_li": module.gmvae_gaussian_weight,
        "w_en": module.gmvae_categorical_weight,
        "out_dim": module.n_genes,
        "batch_num": n_batch,
        "dataset_num": n_dataset,
        "cat_pe": False,
        "dsbn": False,
        "ecs": False,
        "dar": False,
        "input_covariate": False,
        "mask_node_rate": 0.75,
        "mask_feature_rate": 0.25,
        "drop_node_rate": 0.3,
        "mask_beta": True,
        "dae": True,
        "max_batch_size": model.max_cells_per_batch,
        "gene_list": list(model.gene_vocabulary),
    }


def to_official(model, prefix: str) -> None:
    """Write ``model`` as ``PREFIX.config.json`` + ``PREFIX.best.ckpt`` for the official package."""
    config = model_to_config(model)
    state = ours_to_official(model.module)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = prefix + WEIGHTS_SUFFIX + ".tmp"
    torch.save({"model_state_dict": state}, tmp)
    os.replace(tmp, prefix + WEIGHTS_SUFFIX)
    tmp = prefix + CONFIG_SUFFIX + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(config, fh)
    os.replace(tmp, prefix + CONFIG_SUFFIX)
