"""Normalisation layers shared by the embedder and decoder."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .._exceptions import InputDataError

Norm = Literal["layernorm", "groupnorm"]
N_GROUPS = 4
"""Groups of :class:`torch.nn.GroupNorm`, as in the official CellPLM checkpoints."""


def make_norm(norm: Norm, n_features: int) -> nn.Module:
    """Return the normalisation layer called ``norm`` over ``n_features`` features."""
    if norm == "layernorm":
        return nn.LayerNorm(n_features)
    if norm == "groupnorm":
        return nn.GroupNorm(N_GROUPS, n_features)
    raise InputDataError(f"`norm` must be 'layernorm' or 'groupnorm', got {norm!r}.")
