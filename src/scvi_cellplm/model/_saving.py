"""Safe, atomic model files: safetensors weights plus JSON metadata, and files of earlier versions.

A saved model is ``model.safetensors`` (the module's state dict; safetensors holds tensors only,
so reading it cannot execute code) and ``metadata.json`` (class, setup, constructor arguments, gene
vocabulary). Both are written to temporary files first and moved into place with
:func:`os.replace`, the metadata last: it marks a complete save, and it names the ``weights_id``
stored in the weights' header, so weights and metadata of two different saves are never combined.
Earlier versions wrote one ``model.pt`` (``torch.save`` of the state dict and the metadata as a
JSON string); it is still read, with ``weights_only=True``. Both formats go through the same
metadata checks (:func:`~scvi_cellplm.model._metadata.check_metadata`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from typing import NamedTuple

import numpy as np
import torch
from anndata import read_h5ad

from .._constants import ADATA_FILE, LEGACY_MODEL_FILE, METADATA_FILE, MODEL_FILE
from .._exceptions import CellPLMError, CheckpointError, InputDataError
from ..io._safe_load import safe_torch_load
from ._metadata import check_metadata, decode

FORMAT = "scvi-cellplm/1"
"""Format of the metadata (the same in ``metadata.json`` and in the legacy ``model.pt``)."""


class SavedFiles(NamedTuple):
    """Paths of the files of one saved model."""

    weights: str
    metadata: str
    legacy: str


def saved_files(dir_path, prefix: str | None = None) -> SavedFiles:
    """Return the paths of the weights, metadata and legacy files of a model saved in ``dir_path``."""
    prefix = prefix or ""
    return SavedFiles(*(os.path.join(os.fspath(dir_path), f"{prefix}{name}")
                        for name in (MODEL_FILE, METADATA_FILE, LEGACY_MODEL_FILE)))


def saved_format(dir_path, prefix: str | None = None) -> str | None:
    """Return ``"safetensors"``, ``"legacy"`` (a ``model.pt``) or ``None`` (no saved model there).

    ``metadata.json`` marks a complete save in the current format; without it, a legacy
    ``model.pt`` is the model (an interrupted save over a legacy folder leaves that one intact).
    """
    files = saved_files(dir_path, prefix)
    if os.path.isfile(files.metadata):
        return "safetensors"
    if os.path.isfile(files.legacy):
        return "legacy"
    return None


def has_saved_model(dir_path, prefix: str | None = None) -> bool:
    """Whether ``dir_path`` holds a model written by ``save`` (current or legacy format)."""
    return saved_format(dir_path, prefix) is not None


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


@contextlib.contextmanager
def _temporary(directory: str, suffix: str):
    """Yield the path of a new temporary file in ``directory``, removed afterwards unless moved."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _publish(tmp: str, path: str) -> None:
    """Move the finished temporary file ``tmp`` to ``path``, readable as a plain new file would be."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # temporary files are private to the owner; a saved model is shared
    os.replace(tmp, path)


def tensors_for_saving(state: dict) -> dict[str, torch.Tensor]:
    """Return ``state`` as CPU tensors that safetensors can write: contiguous, none sharing memory.

    Tensors that share storage (tied weights, views) are copied; loading copies values into the
    module's own parameters, so ties of the module are unaffected.
    """
    out, seen = {}, set()
    for name, value in state.items():
        tensor = value.detach().cpu()
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor.contiguous()
    return out


def write_weights(state: dict, path: str, header: dict[str, str]) -> None:
    """Write ``state`` as a safetensors file with string ``header`` metadata (not atomic)."""
    import safetensors.torch

    safetensors.torch.save_file(tensors_for_saving(state), path, metadata=header)


def read_weights(path: str, weights_id: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; with ``weights_id``, check it is the one the metadata names."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"No weights at {path}: the saved model is incomplete (its metadata is there); "
                              "copy the whole folder, or save the model again.")
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            found = (fh.metadata() or {}).get("weights_id")
            if weights_id is not None and found != weights_id:
                raise CheckpointError(
                    f"{path} and its {METADATA_FILE} come from different saves (weights {found}, metadata "
                    f"{weights_id}): a save was interrupted, or files were mixed. Save the model again.")
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if isinstance(err, CellPLMError):
            raise
        raise CheckpointError(f"{path} is truncated or corrupted and cannot be read: {err}") from err


def _check_format(metadata, path: str) -> dict:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(f"{path} has format {found!r}, expected {FORMAT}.")
    check_metadata(metadata, path)
    return metadata


def read_json_metadata(path: str) -> dict:
    """Read and check ``metadata.json`` (no tensor is read)."""
    try:
        with open(path, encoding="utf-8") as fh:
            metadata = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} is not readable JSON metadata of a saved model: {err}") from err
    return _check_format(metadata, path)


def read_legacy_file(path: str, mmap: bool = False) -> tuple[dict, dict]:
    """Read the state dict and metadata of a legacy ``model.pt`` (tensors and plain data only).

    With ``mmap`` the tensors are mapped, not read: reading only the metadata is cheap.
    """
    payload = safe_torch_load(path, "saved CellPLM model", mmap=mmap)
    if not isinstance(payload, dict) or "model_state_dict" not in payload or "metadata" not in payload:
        raise CheckpointError(f"{path} is not a scvi-cellplm model file.")
    try:
        metadata = json.loads(payload["metadata"])
    except (TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has unreadable metadata: {err}") from err
    _check_format(metadata, path)
    state = payload["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a mapping of names to tensors.")
    return state, metadata


def _missing(dir_path, prefix: str | None) -> CheckpointError:
    files = saved_files(dir_path, prefix)
    if os.path.isfile(files.weights):
        return CheckpointError(f"{dir_path} has {MODEL_FILE} but no {METADATA_FILE}: the save was interrupted "
                               "or the folder copied in part. Save the model again.")
    return CheckpointError(f"No saved model in {dir_path}: expected {METADATA_FILE} + {MODEL_FILE} (or the "
                           f"{LEGACY_MODEL_FILE} of earlier versions), as written by `save`.")


def read_metadata(dir_path, prefix: str | None = None) -> dict:
    """Return the checked metadata of a saved model; the current format reads no tensor at all."""
    files = saved_files(dir_path, prefix)
    kind = saved_format(dir_path, prefix)
    if kind == "safetensors":
        return read_json_metadata(files.metadata)
    if kind == "legacy":
        return read_legacy_file(files.legacy, mmap=True)[1]
    raise _missing(dir_path, prefix)


def read_saved(dir_path, prefix: str | None = None) -> tuple[dict, dict]:
    """Return the state dict and checked metadata of a saved model (either format)."""
    files = saved_files(dir_path, prefix)
    kind = saved_format(dir_path, prefix)
    if kind == "safetensors":
        metadata = read_json_metadata(files.metadata)
        return read_weights(files.weights, metadata.get("weights_id")), metadata
    if kind == "legacy":
        return read_legacy_file(files.legacy)
    raise _missing(dir_path, prefix)


def save_model(model, dir_path: str, prefix, overwrite: bool, save_anndata: bool, **write_kwargs):
    """Write ``model`` (and its AnnData) into ``dir_path``; nothing is replaced without ``overwrite``.

    The weights and metadata are written to temporary files first; an error or interruption while
    writing leaves the previous files as they were. A legacy ``model.pt`` of the same prefix is
    removed once the new files are in place (with ``overwrite``).
    """
    dir_path = os.fspath(dir_path)
    files = saved_files(dir_path, prefix)
    adata_path = os.path.join(dir_path, f"{prefix or ''}{ADATA_FILE}")
    for existing in (*files, adata_path) if save_anndata else files:
        if os.path.exists(existing) and not overwrite:
            raise CheckpointError(f"{existing} already exists; pass `overwrite=True` to replace it.")
    os.makedirs(dir_path, exist_ok=True)
    weights_id = uuid.uuid4().hex
    metadata = {
        "format": FORMAT,
        "class": type(model).__name__,
        "init_params_": _encode(model.init_params_),
        "registry_": _encode(model.adata_manager.registry),
        "is_trained_": bool(model.is_trained_),
        "var_names": [str(v) for v in model._registered_var().index],
        "gene_vocabulary": list(model.gene_vocabulary),
        "decoder_batch_categories": list(model.decoder_batch_categories_),
        "gmvae_embedding": model.backbone_kwargs_["gmvae_embedding"],
        "input_target_sum": model.backbone_kwargs_["input_target_sum"],
        "weights_file": os.path.basename(files.weights),
        "weights_id": weights_id,
    }
    with _temporary(dir_path, ".safetensors") as tmp_weights, _temporary(dir_path, ".json") as tmp_metadata:
        write_weights(model.module.state_dict(), tmp_weights, {"format": FORMAT, "weights_id": weights_id})
        with open(tmp_metadata, "w", encoding="utf-8") as fh:
            json.dump(metadata, fh)
        if save_anndata:
            with _temporary(dir_path, ".h5ad") as tmp:
                model.adata.write_h5ad(tmp, **write_kwargs)
                _publish(tmp, adata_path)
        _publish(tmp_weights, files.weights)
        _publish(tmp_metadata, files.metadata)  # last: the save is complete
    if os.path.exists(files.legacy):
        os.remove(files.legacy)


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
    state, metadata = read_saved(dir_path, prefix)
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
        # files of earlier versions (no such key) embed a GMVAE with its most likely cluster
        kwargs.setdefault("gmvae_embedding", metadata.get("gmvae_embedding", "cluster"))
        kwargs.setdefault("input_target_sum", metadata.get("input_target_sum"))  # earlier: raw counts
        kwargs.setdefault("token_norm", "cell")  # earlier versions: each cell token on its own
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
