"""How long to train by default: an optimisation budget in steps, from the data size."""

from __future__ import annotations

import math

CELL_PASSES_PER_CELL = 400
"""Passes over each cell of a small dataset (scvi-tools' epoch heuristic: 400 epochs up to 20k cells)."""
MAX_CELL_PASSES = 8_000_000
"""Cap on cells processed by default (scvi-tools: 400 epochs x 20,000 cells, then fewer epochs)."""
MIN_STEPS = 1_000
"""Fewest optimisation steps by default: tiny datasets still get a full learning-rate schedule."""
MAX_STEPS = 20_000
"""Most optimisation steps by default."""


def get_max_steps_heuristic(n_cells: int, cells_per_step: int) -> int:
    """Default number of optimisation steps for ``n_cells`` training cells.

    scvi-tools counts epochs (``get_max_epochs_heuristic``: 400 up to 20,000 cells, then
    ``400 * 20000 / n``), which for a model whose mini-batch is a sentence of thousands of cells
    means few steps: a 4,000-cell sample is one step per epoch. This heuristic keeps scvi-tools'
    amount of data seen (``min(400 n, 8e6)`` cell passes) and converts it into steps of
    ``cells_per_step`` cells, clipped to [1,000, 20,000] steps.

    Parameters
    ----------
    n_cells
        Training cells.
    cells_per_step
        Cells in one mini-batch (the training sentence budget).

    Returns
    -------
    The number of optimisation steps.
    """
    passes = min(CELL_PASSES_PER_CELL * max(int(n_cells), 1), MAX_CELL_PASSES)
    steps = math.ceil(passes / max(min(int(cells_per_step), max(int(n_cells), 1)), 1))
    return int(min(max(steps, MIN_STEPS), MAX_STEPS))
