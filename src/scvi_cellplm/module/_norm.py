"""Normalisation layers shared by the embedder and decoder."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .._exceptions import InputDataError
from ._chunks import rows_per_chunk

Norm = Literal["layernorm", "groupnorm"]
CHUNK_CELLS = 4096
"""Cells per chunk of :class:`SampleNorm` at inference."""
N_GROUPS = 4
"""Groups of :class:`torch.nn.GroupNorm`, as in the official CellPLM checkpoints."""


def make_norm(norm: Norm, n_features: int) -> nn.Module:
    """Return the normalisation layer called ``norm`` over ``n_features`` features."""
    if norm == "layernorm":
        return nn.LayerNorm(n_features)
    if norm == "groupnorm":
        return nn.GroupNorm(N_GROUPS, n_features)
    raise InputDataError(f"`norm` must be 'layernorm' or 'groupnorm', got {norm!r}.")


TokenNorm = Literal["cell", "sample"]


class SampleNorm(nn.Module):
    """Standardise each token feature over the cells of its sentence, then scale, shift and ReLU.

    The cells of one sentence come from one sample, so each sample's tokens are centred and scaled
    feature by feature (a BatchNorm whose statistics are those of the token's own sample, in
    training and at inference alike): what all cells of a sample share, such as its batch's shift,
    is taken out before the transformer, while differences between its cells are kept, including
    a cell's overall level against the others (which a per-cell LayerNorm removes). A sample above
    the sentence budget is windowed (in expression or in space), and each window is standardised
    over its own cells. A sentence's statistics are shrunk towards population statistics (running
    averages over training) as if they held ``prior_cells`` more cells, so sentences of a few
    cells, down to one, stay defined.

    Parameters
    ----------
    n_features
        Width of the tokens.
    prior_cells
        Weight, in cells, of the population statistics in each sentence's statistics.
    momentum
        Update rate of the running population statistics in training.
    eps
        Added to the variance.
    """

    def __init__(self, n_features: int, prior_cells: float = 16.0, momentum: float = 0.01,
                 eps: float = 1e-3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_features))
        self.bias = nn.Parameter(torch.zeros(n_features))
        self.register_buffer("running_mean", torch.zeros(n_features))
        self.register_buffer("running_var", torch.ones(n_features))
        self.prior_cells, self.momentum, self.eps = prior_cells, momentum, eps

    def statistics(self, h: torch.Tensor, sentence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shrunk mean and variance ``(n_sentences, n_features)`` and each cell's sentence."""
        _, inverse, counts = torch.unique(sentence.view(-1), return_inverse=True, return_counts=True)
        # sums over thousands of cells in float64 (results hold to float32 rounding), over row
        # chunks so the float64 temporaries stay bounded at large sentences
        step = rows_per_chunk(CHUNK_CELLS, h.device, h.shape[1])
        chunks = [slice(start, start + step) for start in range(0, h.shape[0], step)]
        running_mean, running_var = self.running_mean.double(), self.running_var.double()
        total = counts.double().unsqueeze(1) + self.prior_cells
        sums = torch.zeros(len(counts), h.shape[1], dtype=torch.float64, device=h.device)
        for rows in chunks:
            sums = sums.index_add(0, inverse[rows], h[rows].double())
        mean = (sums + self.prior_cells * running_mean) / total
        spread = torch.zeros_like(sums)
        for rows in chunks:
            spread = spread.index_add(0, inverse[rows], (h[rows].double() - mean[inverse[rows]]).square())
        var = (spread + self.prior_cells * (running_var + (mean - running_mean).square())) / total
        if self.training and self.weight.requires_grad:  # frozen (a query model): statistics too
            with torch.no_grad():  # population: the cells' mean, the mean within-sentence variance
                self.running_mean.lerp_((sums.sum(0) / h.shape[0]).float(), self.momentum)
                self.running_var.lerp_((spread.sum(0) / h.shape[0]).float(), self.momentum)
        return mean.float(), var.float(), inverse

    def forward(self, h: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Normalised tokens ``(n_cells, n_features)``; without autograd ``h`` is overwritten."""
        if h.shape[0] == 0:
            return h
        mean, var, inverse = self.statistics(h, sentence)
        scale = self.weight / torch.sqrt(var + self.eps)  # (n_sentences, n_features)
        if torch.is_grad_enabled():
            return torch.relu((h - mean[inverse]) * scale[inverse] + self.bias)
        chunk = rows_per_chunk(CHUNK_CELLS, h.device, h.shape[1])
        for start in range(0, h.shape[0], chunk):  # inference: in place, row chunks
            rows, which = h[start : start + chunk], inverse[start : start + chunk]
            rows.sub_(mean[which]).mul_(scale[which]).add_(self.bias).relu_()
        return h
