"""Sentences: the groups of cells that attend to each other.

A sentence is one sample (tissue section, library, ...) or, for samples above the cell budget, a
window of it. Windows are contiguous in the space given (spatial coordinates, or an expression
embedding): recursive median bisection along the widest axis, so neighbours stay together and each
window holds at most ``max_cells`` cells. Never consecutive index order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from .._exceptions import InputDataError

logger = logging.getLogger(__name__)


def bisect_windows(features: np.ndarray, max_cells: int) -> list[np.ndarray]:
    """Split rows of ``features`` into contiguous windows of at most ``max_cells`` rows.

    Returns positions into ``features``; every row appears in exactly one window. Windows are
    balanced (sizes differ by at most one cell at each split).
    """
    if max_cells < 1:
        raise InputDataError(f"`max_cells` must be positive, got {max_cells}.")
    features = np.asarray(features, dtype=np.float64)
    features = np.where(np.isfinite(features), features, np.nanmedian(features, axis=0))
    features = np.nan_to_num(features)
    out: list[np.ndarray] = []
    stack = [np.arange(features.shape[0])]
    while stack:
        idx = stack.pop()
        if len(idx) <= max_cells:
            out.append(np.sort(idx))
            continue
        n_parts = int(np.ceil(len(idx) / max_cells))
        left_parts = n_parts // 2
        sub = features[idx]
        axis = int(np.argmax(sub.max(axis=0) - sub.min(axis=0))) if sub.shape[1] else 0
        order = np.argsort(sub[:, axis], kind="stable") if sub.shape[1] else np.arange(len(idx))
        cut = int(round(len(idx) * left_parts / n_parts))
        stack.extend([idx[order[cut:]], idx[order[:cut]]])
    return out


def make_sentences(
    sample_codes: np.ndarray,
    max_cells: int,
    windower: Callable[[np.ndarray], list[np.ndarray]] | None = None,
    indices: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Group cell ``indices`` into sentences by sample, windowing samples above ``max_cells``.

    Parameters
    ----------
    sample_codes
        Sample code of every cell of the AnnData (length ``n_obs``).
    max_cells
        Cell budget of one sentence.
    windower
        Called with the obs indices of an oversized sample, returns its windows as arrays of
        positions into those indices (e.g. ``lambda m: bisect_windows(features[m], max_cells)``).
        Required only when some sample exceeds ``max_cells``.
    indices
        Cells to use (default: all).

    Returns
    -------
    Sentences as sorted arrays of obs indices, ordered by sample code then window.
    """
    sample_codes = np.asarray(sample_codes).reshape(-1)
    indices = np.arange(len(sample_codes)) if indices is None else np.asarray(indices)
    codes = sample_codes[indices]
    sentences: list[np.ndarray] = []
    for code in np.unique(codes):
        members = np.sort(indices[codes == code])
        if len(members) <= max_cells:
            sentences.append(members)
            continue
        if windower is None:
            raise InputDataError(
                f"A sample has {len(members)} cells, above max_cells_per_batch={max_cells}, "
                "and no way to window it: raise `max_cells_per_batch` or split the sample."
            )
        windows = windower(members)
        logger.info("A sample of %d cells is above the sentence budget of %d cells: embedded in %d "
                    "windows.", len(members), max_cells, len(windows))
        sentences.extend(members[w] for w in windows)
    return sentences


def random_sentences(
    sample_codes: np.ndarray, max_cells: int, indices: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Cut each sample's ``indices`` into random sentences of near-equal size, at most ``max_cells``.

    The training sentences of a model without coordinates: a sample of ``n`` cells becomes
    ``ceil(n / max_cells)`` random subsets, drawn anew with ``rng`` (each epoch), so a cell meets
    different company every epoch and every sentence looks like the sample it comes from (fixed
    windows in expression space would hold only similar cells). Every index is in exactly one
    sentence; sentences come back sorted, in sample order.
    """
    sample_codes = np.asarray(sample_codes).reshape(-1)
    indices = np.asarray(indices)
    codes = sample_codes[indices]
    sentences: list[np.ndarray] = []
    for code in np.unique(codes):
        members = rng.permutation(indices[codes == code])
        n_parts = -(-len(members) // max_cells)
        sentences.extend(np.sort(part) for part in np.array_split(members, n_parts))
    return sentences


def pack_sentences(sentences: list[np.ndarray], max_cells: int) -> list[list[int]]:
    """Pack whole sentences into mini-batches of at most ``max_cells`` cells (first fit, in order).

    Returns, for each mini-batch, the positions of its sentences in ``sentences``.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, sentence in enumerate(sentences):
        n = len(sentence)
        if current and size + n > max_cells:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        batches.append(current)
    return batches
