"""The ``model.pt`` format that ``save`` wrote before safetensors, for tests of its loading.

:func:`save_legacy` is a frozen copy of ``model/_saving.py::save_model`` (and its ``_encode``) as
they were at commit ``1415d93``, the last before the safetensors format (#23): one ``torch.save``
of ``{"model_state_dict": state dict, "metadata": JSON string}``. Do not update it with the
package: it stands for files users already have. (``tests/data/old_release/`` holds files of an
even older release, with less metadata.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

LEGACY_FORMAT = "scvi-cellplm/1"


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


def legacy_metadata(model) -> dict:
    """The metadata dict of the legacy format, as ``save_model`` built it."""
    return {
        "format": LEGACY_FORMAT,
        "class": type(model).__name__,
        "init_params_": _encode(model.init_params_),
        "registry_": _encode(model.adata_manager.registry),
        "is_trained_": bool(model.is_trained_),
        "var_names": [str(v) for v in model._registered_var().index],
        "gene_vocabulary": list(model.gene_vocabulary),
        "decoder_batch_categories": list(model.decoder_batch_categories_),
    }


def save_legacy(model, dir_path, prefix: str = "", save_anndata: bool = False) -> str:
    """Write ``model`` into ``dir_path`` as the legacy ``{prefix}model.pt``; returns its path."""
    os.makedirs(dir_path, exist_ok=True)
    if save_anndata:
        model.adata.write_h5ad(os.path.join(dir_path, f"{prefix}adata.h5ad"))
    path = os.path.join(dir_path, f"{prefix}model.pt")
    payload = {"model_state_dict": model.module.state_dict(), "metadata": json.dumps(legacy_metadata(model))}
    torch.save(payload, path)
    return path
