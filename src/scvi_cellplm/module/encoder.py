"""The cell-token transformer: pre-norm blocks attending across the cells of each sentence."""

from __future__ import annotations

import torch
from torch import nn

from ._chunks import rows_per_chunk
from .attention import AttentionKind, FlowAttention, InferenceWorkspace, make_attention

CHUNK_TOKENS = 2048
"""Tokens per chunk of the token-wise work (norms, projections, feed-forward) at inference."""


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + ff(norm2(x))``."""

    def __init__(self, n_hidden: int, n_heads: int, *, attention: AttentionKind, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_hidden)
        self.attn = make_attention(attention, n_hidden, n_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(n_hidden)
        self.ff = nn.Sequential(
            nn.Linear(n_hidden, 2 * n_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * n_hidden, n_hidden),
            nn.Dropout(dropout),
        )

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, workspace: InferenceWorkspace | None = None
    ) -> torch.Tensor:
        """``workspace``: buffers and cast weights shared by the blocks of one inference call."""
        if torch.is_grad_enabled():
            x = x + self.dropout(self.attn(self.norm1(x), valid))
            return x + self.ff(self.norm2(x))
        # inference: in place, token-wise work in chunks (bounded temporaries, cache-friendly)
        chunk = rows_per_chunk(CHUNK_TOKENS, x.device, 2 * x.shape[-1])
        if isinstance(self.attn, FlowAttention):
            self.attn.add_to_(x, valid, self.norm1, self.dropout, chunk, workspace)
        else:
            x += self.dropout(self.attn(self.norm1(x), valid))
        ws = InferenceWorkspace() if workspace is None else workspace
        up, act, drop, down, drop_out = self.ff
        flat = x.view(-1, x.shape[-1])
        for start in range(0, flat.shape[0], chunk):
            rows = flat[start : start + chunk]
            rows += drop_out(ws.linear(down, drop(act(ws.linear(up, self.norm2(rows))))))
        return x


def pad_sentences(h: torch.Tensor, sentence: torch.Tensor):
    """Pack cells ``(n, d)`` into padded sentences ``(b, length, d)``.

    Returns the padded tensor, the validity mask and the ``(row, position)`` of each cell, so
    ``padded[row, position]`` gives back ``h``.
    """
    _, inverse, counts = torch.unique(sentence, return_inverse=True, return_counts=True)
    if len(counts) == 1:  # one sentence: a view, no copy
        valid = torch.ones(1, h.shape[0], dtype=torch.bool, device=h.device)
        return h.unsqueeze(0), valid, (inverse, torch.arange(h.shape[0], device=h.device))
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(inverse)
    position[order] = torch.arange(len(order), device=h.device) - starts[inverse[order]]
    padded = h.new_zeros(len(counts), int(counts.max()), h.shape[-1])
    padded[inverse, position] = h
    valid = torch.zeros(padded.shape[:2], dtype=torch.bool, device=h.device)
    valid[inverse, position] = True
    return padded, valid, (inverse, position)


class CellEncoder(nn.Module):
    """Stack of :class:`Block` followed by a LayerNorm (the official pre-latent norm; ``final_norm``)."""

    def __init__(
        self, n_hidden: int, n_layers: int, n_heads: int, *, attention: AttentionKind, dropout: float,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(n_hidden, n_heads, attention=attention, dropout=dropout) for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(n_hidden) if final_norm else nn.Identity()

    def forward(self, h: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Contextualised tokens ``(n_cells, n_hidden)``; cells attend only within their sentence.

        Without autograd (inference) the blocks work in place: ``h`` is overwritten.
        """
        if h.shape[0] == 0:
            return self.final_norm(h)
        x, valid, where = pad_sentences(h, sentence)
        workspace = InferenceWorkspace()  # used at inference only
        for block in self.blocks:
            x = block(x, valid, workspace)
        workspace.release()
        out = x[0] if x.shape[0] == 1 else x[where]
        if torch.is_grad_enabled() or isinstance(self.final_norm, nn.Identity):
            return self.final_norm(out)
        chunk = rows_per_chunk(CHUNK_TOKENS, out.device, out.shape[-1])
        for start in range(0, out.shape[0], chunk):  # inference: in place
            rows = out[start : start + chunk]
            rows.copy_(self.final_norm(rows))
        return out
