"""Neighbourhood attention: each cell reads itself and its nearest cells in the tissue.

The sentence-wide transformer sees positions only through the positional encoding, and linear
(Flowformer) attention cannot single out the few cells next to a cell. This layer gives the
model that local context directly: each cell's expression embedding is averaged, with learned
weights, with those of its ``k`` nearest cells (by coordinates, within its own sentence), as in
a graph attention layer over the spatial k-nearest-neighbour graph
(``squidpy.gr.spatial_neighbors(coord_type="generic", n_neighs=k)`` restricted to the sentence;
computed here on the batch's tensors, because the module sees no AnnData and torch has no
nearest-neighbour search). Cells without coordinates keep their embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._exceptions import InputDataError
from .positional import unusable_positions

KNN_CHUNK = 1024
"""Query cells per chunk of the neighbour search and of the attention at inference."""


def sentence_knn(
    coords: torch.Tensor, sentence: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the ``k`` nearest other cells of each cell within its sentence.

    Parameters
    ----------
    coords
        ``(n_cells, n_dims)`` coordinates; rows without a usable position (NaN, ±inf or
        overflowing, see :func:`~.positional.unusable_positions`) have no neighbours (and are
        nobody's).
    sentence
        ``(n_cells,)`` sentence of each cell; neighbours never cross sentences.
    k
        Neighbours per cell.

    Returns
    -------
    ``(index, valid)``, both ``(n_cells, k)``: row indices of the neighbours, nearest first, and
    whether each slot holds a real neighbour (a cell with fewer than ``k`` others has padding).
    Exact search, ``O(n^2)`` distances over the batch in row chunks of at most ``2^24`` distances
    (batches are windows of at most ``max_cells_per_batch`` cells).
    """
    n = coords.shape[0]
    index = torch.zeros(n, k, dtype=torch.long, device=coords.device)
    valid = torch.zeros(n, k, dtype=torch.bool, device=coords.device)
    if n < 2 or k == 0:  # no other cell to be a neighbour
        return index, valid
    points = coords.double()
    missing = unusable_positions(points)
    points = points.masked_fill(missing.unsqueeze(1), 0.0)
    width = min(k, n - 1)  # >= 1 here
    step = max(1, min(KNN_CHUNK, (1 << 24) // n))  # bounded (rows, n) distance matrices
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        dist = torch.cdist(points[rows], points)
        apart = (sentence[rows, None] != sentence[None, :]) | missing[None, :] | missing[rows, None]
        dist = dist.masked_fill(apart, float("inf"))
        own = torch.arange(rows.start, rows.stop, device=coords.device)
        dist[own - start, own] = float("inf")
        best, where = torch.topk(dist, width, dim=1, largest=False)  # sorted, nearest first
        index[rows, :width] = where
        valid[rows, :width] = torch.isfinite(best)
    return index, valid


class NeighbourhoodAttention(nn.Module):
    """Each cell's vector becomes a weighted average of its own and its nearest cells' vectors.

    Weights are a softmax over the cell itself and its ``n_neighbors`` nearest cells of scores
    from learned query/key projections plus a learned bias per neighbour rank (self, nearest,
    second nearest, ...). The update is convex (no value or output projection): applied to the
    linear expression embedding
    (:meth:`GeneEmbedder.expression <scvi_cellplm.module.GeneEmbedder.expression>`), a spatial
    cell's vector stays the embedding of a log-expression profile (a local average), comparable with
    those of cells without positions (a dissociated reference, whose cells keep their own), which
    is what imputation from a reference needs. Initially a cell keeps about half of its own.
    """

    def __init__(self, n_hidden: int, n_neighbors: int, n_key: int = 32) -> None:
        super().__init__()
        if n_neighbors < 1:
            raise InputDataError(f"`n_neighbors` must be positive, got {n_neighbors}.")
        self.n_neighbors = n_neighbors
        self.norm = nn.LayerNorm(n_hidden)
        self.query = nn.Linear(n_hidden, n_key)
        self.key = nn.Linear(n_hidden, n_key)
        bias = torch.zeros(n_neighbors + 1)
        bias[0] = math.log(n_neighbors)  # self weighs as much as all neighbours together
        self.rank_bias = nn.Parameter(bias)

    def forward(self, h: torch.Tensor, coords: torch.Tensor | None, sentence: torch.Tensor) -> torch.Tensor:
        """Vectors ``(n_cells, n_hidden)`` mixed with their neighbourhoods (a new tensor)."""
        if coords is None:
            return h
        return self.mix(h, *self.weights(h, coords, sentence))

    def weights(
        self, h: torch.Tensor, coords: torch.Tensor, sentence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(index, weights)``, both ``(n_cells, k + 1)``.

        These are each cell's neighbourhood (itself first) and the mixing weights (rows sum to 1;
        0 at padding).
        """
        index, valid = sentence_knn(coords, sentence, self.n_neighbors)
        own = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
        index = torch.cat([own, index], dim=1)
        valid = torch.cat([torch.ones_like(own, dtype=torch.bool), valid], dim=1)
        normed = self.norm(h)
        q, k = self.query(normed), self.key(normed)
        scores = torch.cat([
            (q[rows].unsqueeze(1) * k[index[rows]]).sum(-1)
            for rows in (slice(s, s + KNN_CHUNK) for s in range(0, h.shape[0], KNN_CHUNK))
        ]) if h.shape[0] else q.new_zeros(0, index.shape[1])
        scores = scores / q.shape[-1] ** 0.5 + self.rank_bias
        return index, torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)

    @staticmethod
    def mix(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_j weights[i, j] * values[index[i, j]]`` for each cell ``i`` (a new tensor)."""
        if torch.is_grad_enabled():
            return (weights.unsqueeze(-1) * values[index]).sum(1)
        out = torch.empty_like(values)  # inference: neighbour gathers in bounded chunks
        for start in range(0, values.shape[0], KNN_CHUNK):
            rows = slice(start, start + KNN_CHUNK)
            out[rows] = (weights[rows].unsqueeze(-1) * values[index[rows]]).sum(1)
        return out
