"""Checks of untrusted metadata (official configs, saved model files).

Every check raises one :class:`~scvi_cellplm.CheckpointError` naming the field and the value, so a
tampered or malformed file is refused before any tensor is built from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .._exceptions import CheckpointError

MAX_WIDTH = 65_536
"""Largest width a file may declare (hidden, latent, decoder sizes; clusters)."""
MAX_DEPTH = 1_024
"""Largest number of layers or attention heads a file may declare."""
MAX_CATEGORIES = 1_000_000
"""Largest number of batch or dataset embeddings (and of genes) a file may declare."""


def _where(where: str, field: str) -> str:
    return f"{where}: field {field!r}"


def check_mapping(value, field: str, where: str) -> dict:
    """Return ``value`` if it is a JSON object (a dict with string keys), else raise."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CheckpointError(f"{_where(where, field)} must be a mapping, got {type(value).__name__}.")
    return value


def check_int(value, field: str, low: int, high: int, where: str, *, optional: bool = False) -> int | None:
    """Return ``value`` if it is an integer in ``[low, high]`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(
            f"{_where(where, field)} must be an integer in [{low}, {high}], got {value!r:.60}."
        )
    return value


def check_float(
    value, field: str, low: float, high: float, where: str, *, high_open: bool = False, optional: bool = False
) -> float | None:
    """Return ``value`` as a float if it is a finite number in ``[low, high]`` (``[low, high)``).

    ``None`` is returned as is when ``optional``.
    """
    if value is None and optional:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or not low <= value <= high or (high_open and value == high):
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise CheckpointError(f"{_where(where, field)} must be a number in {interval}, got {value!r:.60}.")
    return float(value)


def check_bool(value, field: str, where: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise CheckpointError(f"{_where(where, field)} must be true or false, got {value!r:.60}.")
    return value


def check_str(value, field: str, where: str, *, optional: bool = False) -> str | None:
    """Return ``value`` if it is a string (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{_where(where, field)} must be a string, got {type(value).__name__}.")
    return value


def check_names(
    value, field: str, where: str, *, unique: bool = True, non_empty: bool = True,
    max_len: int = MAX_CATEGORIES,
) -> list[str]:
    """Return ``value`` if it is a list of non-empty (and with ``unique``, distinct) strings."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise CheckpointError(f"{_where(where, field)} must be a list of strings, got {type(value).__name__}.")
    if non_empty and not len(value):
        raise CheckpointError(f"{_where(where, field)} is empty.")
    if len(value) > max_len:
        raise CheckpointError(f"{_where(where, field)} has {len(value)} entries (at most {max_len}).")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise CheckpointError(f"{_where(where, field)} must hold non-empty strings; found {bad[0]!r:.60}.")
    if unique and len(set(value)) != len(value):
        seen: set[str] = set()
        duplicated = list(dict.fromkeys(v for v in value if v in seen or seen.add(v)))
        raise CheckpointError(f"{_where(where, field)} has duplicates: {duplicated[:5]}.")
    return list(value)
