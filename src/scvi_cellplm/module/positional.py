"""Positional encodings of spatial coordinates (2-D or 3-D), normalised per sentence."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .._constants import MAX_COORDINATE
from .._exceptions import InputDataError

PositionalEncodingKind = Literal["sinusoidal", "learned", "none"]


def unusable_positions(coords: torch.Tensor) -> torch.Tensor:
    """Return ``(n_cells,)`` booleans: cells without a usable position.

    A cell has none when any of its coordinates is NaN, ±inf or above ``MAX_COORDINATE`` (1e30) in
    absolute value (values whose differences or squares would overflow).
    """
    return ~(torch.isfinite(coords) & (coords.abs() <= MAX_COORDINATE)).all(dim=1)


def normalize_coordinates(coords: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
    """Map each sentence's coordinates into ``[0, 1]``, keeping the aspect ratio.

    Subtracts the per-sentence minimum and divides by the largest per-sentence extent, so the
    result is invariant to translation and isotropic scaling (pixels or microns give the same).
    Cells without a usable position (:func:`unusable_positions`) get NaN and do not count in their
    sentence's extent; compute in float64 (the differences of float32 values may overflow).
    """
    coords = coords.masked_fill(unusable_positions(coords).unsqueeze(-1), math.nan)
    n_sentences = int(sentence.max()) + 1 if sentence.numel() else 0
    index = sentence.unsqueeze(-1).expand_as(coords)
    lo = torch.full((n_sentences, coords.shape[1]), math.inf, dtype=coords.dtype, device=coords.device)
    hi = torch.full_like(lo, -math.inf)
    finite = torch.nan_to_num(coords, nan=math.inf)
    lo = lo.scatter_reduce(0, index, finite, reduce="amin")
    hi = hi.scatter_reduce(0, index, torch.nan_to_num(coords, nan=-math.inf), reduce="amax")
    extent = (hi - lo).amax(dim=1).clamp(min=1e-12)
    return (coords - lo[sentence]) / extent[sentence].unsqueeze(-1)


class PositionalEncoding(nn.Module):
    """Encode normalised coordinates into a token-sized vector.

    ``"sinusoidal"`` expands each axis into sin/cos features at geometric frequencies and projects
    them linearly; ``"learned"`` is an MLP on the coordinates. Cells without coordinates (NaN) get a
    learned "missing" vector, as do cells with infinite or overflowing coordinates
    (:func:`unusable_positions`).
    """

    def __init__(
        self,
        n_hidden: int,
        *,
        n_dims: int = 2,
        kind: Literal["sinusoidal", "learned"] = "sinusoidal",
        n_frequencies: int = 8,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.n_dims = n_dims
        if kind == "sinusoidal":
            freqs = math.pi * (2.0 ** torch.arange(n_frequencies, dtype=torch.float32))
            self.register_buffer("frequencies", freqs, persistent=False)
            self.proj = nn.Linear(2 * n_frequencies * n_dims, n_hidden)
        elif kind == "learned":
            self.proj = nn.Sequential(
                nn.Linear(n_dims, n_hidden), nn.GELU(), nn.Linear(n_hidden, n_hidden)
            )
        else:
            raise InputDataError(f"`kind` must be 'sinusoidal' or 'learned', got {kind!r}.")
        self.missing = nn.Parameter(torch.randn(n_hidden) * 0.01)

    def forward(self, coords: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Positional vectors ``(n_cells, n_hidden)`` for raw coordinates ``(n_cells, n_dims)``."""
        missing = unusable_positions(coords).unsqueeze(1)  # (n, 1)
        unit = normalize_coordinates(coords.double(), sentence).to(self.missing.dtype)
        unit = torch.nan_to_num(unit, nan=0.0)
        if self.kind == "sinusoidal":
            angles = unit.unsqueeze(-1) * self.frequencies  # (n, dims, freqs)
            feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
        else:
            feats = unit
        return torch.where(missing, self.missing, self.proj(feats))
