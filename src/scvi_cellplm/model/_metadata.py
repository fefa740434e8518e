"""Checks of the JSON metadata of a saved model file, before anything is built from it.

A tampered or damaged file (missing fields, wrong types, absurd sizes, duplicated genes) is refused
with one :class:`~scvi_cellplm.CheckpointError` naming the field; nothing is allocated first.
"""

from __future__ import annotations

import numpy as np

from .._exceptions import CheckpointError
from ..io._validate import (
    MAX_CATEGORIES,
    MAX_DEPTH,
    MAX_WIDTH,
    check_bool,
    check_float,
    check_int,
    check_mapping,
    check_names,
    check_str,
)

# Constructor arguments recorded in ``init_params_``: integer ones (lowest, highest, may be None)
INT_PARAMS = {
    "n_hidden": (1, MAX_WIDTH, False), "n_layers": (1, MAX_DEPTH, False), "n_heads": (1, MAX_DEPTH, False),
    "n_latent": (1, MAX_WIDTH, False), "n_decoder_layers": (2, MAX_DEPTH, False),
    "n_decoder_hidden": (1, MAX_WIDTH, True), "n_clusters": (1, MAX_WIDTH, False),
    "max_cells_per_batch": (1, 10**9, False), "n_batch_embeddings": (0, MAX_CATEGORIES, True),
    "n_dataset_embeddings": (0, MAX_CATEGORIES, False), "n_spatial_neighbors": (0, MAX_DEPTH, False),
    "n_head_hidden": (1, MAX_WIDTH, False),
}
# and float ones (lowest, highest, may be None)
FLOAT_PARAMS = {"dropout": (0.0, 1.0, False), "target_sum": (1e-12, 1e12, False), "kl_free_bits": (0.0, 1e6, False),
                "gmvae_gaussian_weight": (0.0, 1e6, False), "gmvae_categorical_weight": (0.0, 1e6, False),
                "class_balance": (0.0, 1e3, False), "input_target_sum": (1e-12, 1e12, True)}
STR_PARAMS = ("latent_distribution", "gmvae_embedding", "attention", "positional_encoding", "norm", "gene_likelihood",
              "token_norm")
BOOL_PARAMS = ("batch_in_decoder", "center_input", "freeze_encoder", "zero_perturbed_genes",
               "embed_shared_genes")
# lists of names: must the names be distinct?
NAME_PARAMS = {"gene_vocabulary": True, "label_categories": True, "head_genes": True,
               "training_perturbations": False}
SAFE_DTYPE_KINDS = "biufUO"
"""Kinds of the arrays a registry may hold (no void, datetime or huge records)."""


def decode(obj, where: str = "model file"):
    """Invert ``_encode``: tagged lists become arrays of a safe dtype, or a CheckpointError."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            try:
                dtype = np.dtype(obj.get("dtype"))
            except TypeError as err:
                raise CheckpointError(f"{where}: an array has the unreadable dtype {obj.get('dtype')!r:.60}.") from err
            if dtype.kind not in SAFE_DTYPE_KINDS or dtype.itemsize > 1 << 16:
                raise CheckpointError(f"{where}: an array has the unsupported dtype {dtype}.")
            try:
                return np.asarray(obj["__ndarray__"], dtype=dtype)
            except (TypeError, ValueError, OverflowError) as err:
                raise CheckpointError(f"{where}: an array does not fit its dtype {dtype}: {err}") from err
        return {k: decode(v, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, where) for v in obj]
    return obj


def check_metadata(metadata: dict, path: str) -> None:
    """Check every field of a model file's metadata that loading reads (see the module docstring)."""
    where = f"{path} (metadata)"
    for key, kind in (("class", str), ("init_params_", dict), ("registry_", dict), ("var_names", list)):
        if not isinstance(metadata.get(key), kind):
            raise CheckpointError(f"{path}: metadata field {key!r} is missing or not a {kind.__name__}.")
    check_names(metadata["var_names"], "var_names", where, unique=False, non_empty=False)
    if metadata.get("gene_vocabulary") is not None:
        check_names(metadata["gene_vocabulary"], "gene_vocabulary", where)
    if metadata.get("decoder_batch_categories") is not None:
        check_names(metadata["decoder_batch_categories"], "decoder_batch_categories", where,
                    non_empty=False)
    if "is_trained_" in metadata:
        check_bool(metadata["is_trained_"], "is_trained_", where)
    for key in ("weights_file", "weights_id", "gmvae_embedding"):  # absent from files of earlier versions
        check_str(metadata.get(key), key, where, optional=True)
    low, high, _ = FLOAT_PARAMS["input_target_sum"]  # absent from files of earlier versions
    check_float(metadata.get("input_target_sum"), "input_target_sum", low, high, where, optional=True)
    check_init_params(metadata["init_params_"], where)
    check_registry(metadata["registry_"], where)


def check_init_params(params: dict, where: str) -> None:
    """Check the structure of ``init_params_`` and the type and range of every known argument."""
    check_mapping(params, "init_params_", where)
    flat = dict(check_mapping(params.get("non_kwargs", {}), "init_params_.non_kwargs", where))
    for name, inner in check_mapping(params.get("kwargs", {}), "init_params_.kwargs", where).items():
        if inner is not None:
            flat.update(check_mapping(inner, f"init_params_.kwargs.{name}", where))
    flat = decode(flat, where)
    for key, (low, high, optional) in INT_PARAMS.items():
        if key in flat:
            check_int(flat[key], f"init_params_.{key}", low, high, where, optional=optional)
    for key, (low, high, optional) in FLOAT_PARAMS.items():
        if key in flat:
            check_float(flat[key], f"init_params_.{key}", low, high, where, optional=optional)
    for key in STR_PARAMS:
        if key in flat:
            check_str(flat[key], f"init_params_.{key}", where)
    for key in BOOL_PARAMS:
        if key in flat:
            check_bool(flat[key], f"init_params_.{key}", where)
    for key, unique in NAME_PARAMS.items():
        if flat.get(key) is not None:
            values = flat[key].tolist() if isinstance(flat[key], np.ndarray) else flat[key]
            check_names(values, f"init_params_.{key}", where, unique=unique)
    hidden, heads = flat.get("n_hidden"), flat.get("n_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise CheckpointError(f"{where}: field 'init_params_.n_hidden' ({hidden}) must be a multiple of "
                              f"'init_params_.n_heads' ({heads}).")


def check_registry(registry: dict, where: str) -> None:
    """Check the parts of ``registry_`` that loading reads: setup arguments and field registries."""
    setup = check_mapping(registry.get("setup_args"), "registry_.setup_args", where)
    for key, value in setup.items():
        if key == "layer" or key.endswith("_key"):
            check_str(value, f"registry_.setup_args.{key}", where, optional=True)
        elif value is not None and not isinstance(value, str | int | float | bool):
            raise CheckpointError(f"{where}: field 'registry_.setup_args.{key}' must be a plain value, "
                                  f"got {type(value).__name__}.")
    method = registry.get("setup_method_name", "setup_anndata")
    if method not in ("setup_anndata", "setup_mudata"):
        raise CheckpointError(f"{where}: field 'registry_.setup_method_name' must be 'setup_anndata' or "
                              f"'setup_mudata', got {method!r:.60}.")
    fields = check_mapping(registry.get("field_registries", {}), "registry_.field_registries", where)
    for name, field in fields.items():
        check_mapping(field, f"registry_.field_registries.{name}", where)
        state = check_mapping(field.get("state_registry", {}),
                              f"registry_.field_registries.{name}.state_registry", where)
        if "categorical_mapping" in state:
            mapping = decode(state["categorical_mapping"], where)
            if not isinstance(mapping, list | np.ndarray):
                raise CheckpointError(f"{where}: field 'registry_.field_registries.{name}.state_registry."
                                      "categorical_mapping' must be a list.")
