"""Safe, atomic model files: a state dict plus JSON metadata, read with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch
from anndata import read_h5ad

from .._constants import ADATA_FILE, MODEL_FILE
from .._exceptions import CellPLMError, CheckpointError, InputDataError
from ..io._safe_load import safe_torch_load
from ._metadata import check_metadata, decode

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
    """Invert :func:`_encode` (arrays of safe dtypes only, see ``_metadata.decode``)."""
    return decode(obj)


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
    """Write ``model`` (and its AnnData) into ``dir_path``; nothing is replaced without ``overwrite``."""
    prefix = prefix or ""
    path = os.path.join(dir_path, f"{prefix}{MODEL_FILE}")
    adata_path = os.path.join(dir_path, f"{prefix}{ADATA_FILE}")
    for existing in (path, adata_path) if save_anndata else (path,):
        if os.path.exists(existing) and not overwrite:
            raise CheckpointError(f"{existing} already exists; pass `overwrite=True` to replace it.")
    os.makedirs(dir_path, exist_ok=True)
    if save_anndata:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5ad", dir=dir_path)
        os.close(fd)
        try:
            model.adata.write_h5ad(tmp, **write_kwargs)
            os.replace(tmp, adata_path)
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
        "gene_vocabulary": list(model.gene_vocabulary),
        "decoder_batch_categories": list(model.decoder_batch_categories_),
    }
    payload = {"model_state_dict": model.module.state_dict(), "metadata": json.dumps(metadata)}
    _atomic_torch_save(payload, path)


def read_model_file(path: str, mmap: bool = False) -> tuple[dict, dict]:
    """Read the state dict and metadata of a saved model (tensors and plain data only).

    With ``mmap`` the tensors are mapped, not read: reading only the metadata is cheap.
    """
    payload = safe_torch_load(path, "saved CellPLM model", mmap=mmap)
    if not isinstance(payload, dict) or "model_state_dict" not in payload or "metadata" not in payload:
        raise CheckpointError(f"{path} is not a scvi-cellplm model file.")
    try:
        metadata = json.loads(payload["metadata"])
    except (TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has unreadable metadata: {err}") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(f"{path} has format {found!r}, expected {FORMAT}.")
    check_metadata(metadata, path)
    state = payload["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a mapping of names to tensors.")
    return state, metadata


def init_kwargs(metadata: dict) -> dict:
    """Return the constructor keyword arguments recorded in saved metadata (``init_params_``)."""
    params = _decode(metadata["init_params_"])
    kwargs = dict(params.get("non_kwargs", {}))
    for inner in params.get("kwargs", {}).values():
        kwargs.update(inner or {})
    kwargs.pop("adata", None)
    return kwargs


def saved_vocabulary(metadata: dict, adata_manager) -> list[str]:
    """Return the gene vocabulary of a saved model (files before 0.2 did not store it)."""
    if isinstance(metadata.get("gene_vocabulary"), list):
        return [str(g) for g in metadata["gene_vocabulary"]]
    given = init_kwargs(metadata).get("gene_vocabulary")
    if given is not None:
        return [str(g) for g in given]
    registry = _decode(metadata["registry_"])
    var_names = [str(v) for v in metadata["var_names"]]
    if registry["setup_args"].get("gene_id_key") is None:
        return var_names
    # an older file set up with gene_id_key: its training data, in its order, gives the ids
    from ..data import registered_gene_ids, registered_var

    here = [str(v) for v in registered_var(adata_manager).index]
    if here != var_names:
        raise CheckpointError(
            "This model was saved by an older version without its gene vocabulary; load it on its "
            "training AnnData once and save it again."
        )
    return registered_gene_ids(adata_manager)


def _attach(cls, adata, registry: dict):
    """Set ``adata`` up for ``cls``: its own setup when it has one, else the saved one."""
    from scvi.data._constants import _SCVI_UUID_KEY

    own = cls._setup_adata_manager_store.get(adata.uns.get(_SCVI_UUID_KEY))
    if own is not None and own.adata is adata:
        return own
    method = registry.get("setup_method_name", "setup_anndata")  # checked by check_metadata
    if not hasattr(cls, method):
        raise CheckpointError(f"The saved model was set up with {method!r}, which {cls.__name__} does not have.")
    try:
        getattr(cls, method)(adata, source_registry=registry, extend_categories=True,
                             **registry["setup_args"])
    except TypeError as err:
        raise CheckpointError(f"The saved setup arguments do not fit {cls.__name__}.{method}: {err}; "
                              "the file is damaged or from another class.") from err
    except (KeyError, ValueError) as err:
        if isinstance(err, CellPLMError):
            raise
        raise InputDataError(
            f"The AnnData lacks what the saved model was set up with ({err}). Set it up first: "
            f"`{cls.__name__}.{method}(adata, layer=..., batch_key=...)` with its own layer and keys."
        ) from err
    return cls._get_most_recent_anndata_manager(adata, required=True)


def load_model(cls, dir_path, adata, accelerator, device, prefix, overrides: dict | None = None):
    """Rebuild a saved model of class ``cls`` on ``adata`` (see ``CellPLMBase.load``)."""
    from scvi.model._utils import parse_device_args

    from ._transfer import backbone_prefix, copy_backbone, table_sizes

    prefix = prefix or ""
    state, metadata = read_model_file(os.path.join(dir_path, f"{prefix}{MODEL_FILE}"))
    if metadata["class"] != cls.__name__:
        raise CheckpointError(f"The file holds a {metadata['class']}, not a {cls.__name__}.")
    if adata is None:
        adata_path = os.path.join(dir_path, f"{prefix}{ADATA_FILE}")
        if not os.path.exists(adata_path):
            raise InputDataError("Pass `adata`: the model was saved without its AnnData.")
        adata = read_h5ad(adata_path)
    registry = _decode(metadata["registry_"])
    manager = _attach(cls, adata, registry)
    try:
        kwargs = init_kwargs(metadata)
        kwargs["gene_vocabulary"] = saved_vocabulary(metadata, manager)
        kwargs.update(table_sizes(state, "backbone." if any(k.startswith("backbone.") for k in state) else ""))
        kwargs.update(cls._load_kwargs(metadata, registry))
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"The saved model's metadata lacks or garbles {err}; the file is damaged: "
                              "save the model again.") from err
    kwargs.update(overrides or {})
    try:
        model = cls(adata, **kwargs)
    except TypeError as err:
        raise CheckpointError(f"The saved model's parameters do not fit {cls.__name__}: {err}") from err
    prefix_ = backbone_prefix(model.module)
    backbone = {k[len(prefix_):]: v for k, v in state.items() if k.startswith(prefix_)}
    copy_backbone(backbone, model.module)
    if prefix_:  # a head: its own weights, all of them
        head_state = {k: v for k, v in state.items() if not k.startswith(prefix_)}
        current = {k: v for k, v in model.module.state_dict().items() if not k.startswith(prefix_)}
        wrong = sorted(set(head_state) ^ set(current)) + sorted(
            k for k in head_state.keys() & current.keys() if head_state[k].shape != current[k].shape)
        if wrong:
            raise CheckpointError(f"Saved head weights do not fit the model: {wrong[:5]}.")
        model.module.load_state_dict(head_state, strict=False)
    model.is_trained_ = bool(metadata.get("is_trained_", True))
    batches = metadata.get("decoder_batch_categories")
    if batches is None and "batch" in registry.get("field_registries", {}):
        mapping = registry["field_registries"]["batch"]["state_registry"].get("categorical_mapping", [])
        batches = [str(c) for c in mapping]
    if batches is not None:
        model.decoder_batch_categories_ = list(batches)
    _, _, dev = parse_device_args(accelerator=accelerator, devices=device, return_device="torch",
                                  validate_single_device=True)
    model.to_device(dev)
    model.module.eval()
    return model
