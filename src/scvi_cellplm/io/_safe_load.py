"""Loading torch files without executing pickled code."""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from .._exceptions import CheckpointError


def safe_torch_load(path: str, what: str = "checkpoint", mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what went wrong.

    Raises :class:`~scvi_cellplm.CheckpointError` when the file is missing, truncated or
    corrupted, or holds pickled objects other than tensors and plain data (refused: loading them
    would execute code).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"No {what} at {path}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refusing to load {path}: it holds pickled Python objects other than tensors "
            f"(loading would execute code). Details: {err}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path} is truncated or corrupted and cannot be read: {err}") from err
