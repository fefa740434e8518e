"""Attention across the cells of a sentence: Flow-Attention (linear cost) or softmax SDPA.

Both take padded sentences ``x`` of shape ``(batch, length, hidden)`` and a boolean ``valid`` mask
``(batch, length)``; padded positions never influence valid ones.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionKind = Literal["flowformer", "sdpa"]


class _Projections(nn.Module):
    def __init__(self, n_hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(f"`n_hidden` ({n_hidden}) must be divisible by `n_heads` ({n_heads}).")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(n_hidden, n_hidden)
        self.k_proj = nn.Linear(n_hidden, n_hidden)
        self.v_proj = nn.Linear(n_hidden, n_hidden)
        self.out_proj = nn.Linear(n_hidden, n_hidden)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, length, _ = t.shape
        return t.view(b, length, self.n_heads, -1).transpose(1, 2)  # (b, heads, length, d_head)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = t.shape
        return self.dropout(self.out_proj(t.transpose(1, 2).reshape(b, length, -1)))


class FlowAttention(_Projections):
    """Flow-Attention (Wu et al., 2022), the linear-cost attention of CellPLM.

    Identical to the official non-causal ``Flow_Attention`` on a single unpadded sentence; here
    several sentences are processed at once with padding masked out of every flow sum.
    """

    eps = 1e-6

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Attend within each padded sentence: ``x`` ``(batch, length, hidden)``, ``valid`` ``(batch, length)``."""
        eps = self.eps
        keep = valid[:, None, :, None].to(x.dtype)  # (b, 1, l, 1)
        q = torch.sigmoid(self._heads(self.q_proj(x))) * keep
        k = torch.sigmoid(self._heads(self.k_proj(x))) * keep
        v = self._heads(self.v_proj(x))
        length = valid.sum(dim=1).to(x.dtype)[:, None, None]  # keys per sentence, (b, 1, 1)
        # incoming and outgoing flow
        sink_in = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(dim=2) + eps)
        source_out = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(dim=2) + eps)
        # conservation refinement
        sink = torch.einsum("bhld,bhd->bhl", q + eps, (k * source_out[..., None]).sum(dim=2) + eps)
        source = torch.einsum("bhld,bhd->bhl", k + eps, (q * sink_in[..., None]).sum(dim=2) + eps)
        source = source.clamp(min=-1.0, max=1.0)
        # competition (softmax over the sentence's keys) and allocation
        allocation = torch.sigmoid(sink)
        source = source.masked_fill(~valid[:, None, :], float("-inf"))
        competition = torch.softmax(source, dim=-1) * length
        kv = torch.einsum("bhld,bhlm->bhdm", k, v * competition[..., None])
        out = torch.einsum("bhld,bhdm->bhlm", q * sink_in[..., None], kv) * allocation[..., None]
        return self._merge(out)


class SoftmaxAttention(_Projections):
    """Standard multi-head attention through :func:`torch.nn.functional.scaled_dot_product_attention`."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Attend within each padded sentence: ``x`` ``(batch, length, hidden)``, ``valid`` ``(batch, length)``."""
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = valid[:, None, None, :]  # keys to attend to
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0
        )
        return self._merge(out)


def make_attention(kind: AttentionKind, n_hidden: int, n_heads: int, dropout: float) -> nn.Module:
    """Attention layer called ``kind``."""
    if kind == "flowformer":
        return FlowAttention(n_hidden, n_heads, dropout)
    if kind == "sdpa":
        return SoftmaxAttention(n_hidden, n_heads, dropout)
    raise ValueError(f"`attention` must be 'flowformer' or 'sdpa', got {kind!r}.")
