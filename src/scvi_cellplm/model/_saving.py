"""Safe, atomic model files: a state dict plus JSON metadata, read with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch
from anndata import AnnData, read_h5ad
from scvi.model.base._save_load import _initialize_model

from .._exceptions import CheckpointError
from ..io._safe_load import safe_torch_load

MODEL_FILE = "model.pt"
ADATA_FILE = "adata.h5ad"
FORMAT = "scvi-cellplm/1"


def _encode(obj):
    """JSON-able copy of a registry (numpy arrays and scalars tagged)."""
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _encode(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _atomic_torch_save(payload: dict, path: str) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model, dir_path: str, prefix, overwrite: bool, save_anndata: bool, **write_kwargs):
    prefix = prefix or ""
    path = os.path.join(dir_path, f"{prefix}{MODEL_FILE}")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; pass `overwrite=True` to replace it.")
    os.makedirs(dir_path, exist_ok=True)
    if save_anndata:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5ad", dir=dir_path)
        os.close(fd)
        try:
            model.adata.write_h5ad(tmp, **write_kwargs)
            os.replace(tmp, os.path.join(dir_path, f"{prefix}{ADATA_FILE}"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    metadata = {
        "format": FORMAT,
        "class": type(model).__name__,
        "init_params_": _encode(model.init_params_),
        "registry_": _encode(model.adata_manager.registry),
        "is_trained_": bool(model.is_trained_),
        "var_names": [str(v) for v in model._registered_var().index],
    }
    payload = {"model_state_dict": model.module.state_dict(), "metadata": json.dumps(metadata)}
    _atomic_torch_save(payload, path)


def read_model_file(path: str) -> tuple[dict, dict]:
    """State dict and metadata of a saved model, refusing anything but tensors and plain data."""
    payload = safe_torch_load(path, "saved CellPLM model")
    if not isinstance(payload, dict) or "model_state_dict" not in payload or "metadata" not in payload:
        raise CheckpointError(f"{path} is not a scvi-cellplm model file.")
    try:
        metadata = json.loads(payload["metadata"])
    except (TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has unreadable metadata: {err}") from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {metadata.get('format')!r}, expected {FORMAT}.")
    return payload["model_state_dict"], metadata


def load_model(cls, dir_path, adata, accelerator, device, prefix):
    from scvi.model._utils import parse_device_args

    prefix = prefix or ""
    state, metadata = read_model_file(os.path.join(dir_path, f"{prefix}{MODEL_FILE}"))
    if metadata["class"] != cls.__name__:
        raise CheckpointError(f"The file holds a {metadata['class']}, not a {cls.__name__}.")
    if adata is None:
        adata_path = os.path.join(dir_path, f"{prefix}{ADATA_FILE}")
        if not os.path.exists(adata_path):
            raise ValueError("Pass `adata`: the model was saved without its AnnData.")
        adata = read_h5ad(adata_path)
    registry = _decode(metadata["registry_"])
    var_names = metadata["var_names"]
    method = registry.get("setup_method_name", "setup_anndata")
    rna_var = adata.var if isinstance(adata, AnnData) else None
    if rna_var is not None and list(map(str, rna_var.index)) != var_names:
        here, there = set(map(str, rna_var.index)), set(var_names)
        raise CheckpointError(
            "The AnnData's genes differ from the model's: "
            f"{len(there - here)} model genes missing (e.g. {sorted(there - here)[:5]}), "
            f"{len(here - there)} extra (e.g. {sorted(here - there)[:5]})"
            + ("; same genes in another order: reorder with adata[:, model_genes]."
               if here == there else ".")
        )
    getattr(cls, method)(adata, source_registry=registry, **registry["setup_args"])
    attr = {"init_params_": _decode(metadata["init_params_"]), "is_trained_": metadata["is_trained_"]}
    model = _initialize_model(cls, adata, registry, attr, None)
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"Saved weights do not fit the model: {err}") from err
    _, _, dev = parse_device_args(accelerator=accelerator, devices=device, return_device="torch",
                                  validate_single_device=True)
    model.to_device(dev)
    model.module.eval()
    return model
