"""Attention across the cells of a sentence: Flow-Attention (linear cost) or softmax SDPA.

Both take padded sentences ``x`` of shape ``(batch, length, hidden)`` and a boolean ``valid`` mask
``(batch, length)``; padded positions never influence valid ones.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._exceptions import InputDataError

AttentionKind = Literal["flowformer", "sdpa"]


class _Projections(nn.Module):
    def __init__(self, n_hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if n_hidden % n_heads:
            raise InputDataError(f"`n_hidden` ({n_hidden}) must be divisible by `n_heads` ({n_heads}).")
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

    Identical (to float rounding) to the official non-causal ``Flow_Attention`` on a single
    unpadded sentence; here several sentences are processed at once with padding masked out of
    every flow sum. Tokens stay in the ``(batch, length, hidden)`` layout throughout: per-head dot
    products with a per-sentence vector are matrix products with a block-diagonal
    ``(hidden, heads)`` matrix, so no head-major copies or ``q + eps`` temporaries are made.
    """

    eps = 1e-6

    def _head_sums(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Return the ``(b, hidden)`` per-head sums over the sentence ``sum_l t[l, h, :] * w[l, h]``.

        ``t`` is ``(b, l, hidden)``, ``w`` ``(b, l, heads)`` (a reduction, as accurate as the
        official einsum; a matrix product over the length loses digits at 50k cells).
        """
        b, length, hidden = t.shape
        per_head = t.view(b, length, self.n_heads, -1) * w[..., None]
        return per_head.sum(dim=1).reshape(b, hidden)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """``(hidden, heads)`` 0/1 matrix: which head each hidden unit belongs to."""
        hidden = t.shape[-1]
        head = torch.arange(hidden, device=t.device) // (hidden // self.n_heads)
        return F.one_hot(head, self.n_heads).to(t.dtype)

    def _dot(self, t: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """``(b, l, heads)`` per-head ``(t + eps) . (vec + eps)``; ``t`` ``(b, l, hidden)``, ``vec`` ``(b, hidden)``."""
        vec = vec + self.eps
        blocks = self._blocks(t)
        diag = vec[:, :, None] * blocks  # (b, hidden, heads), block-diagonal
        per_head = vec.view(vec.shape[0], self.n_heads, -1).sum(-1)  # (b, heads)
        return t @ diag + self.eps * per_head[:, None, :]

    def _low_dot(self, t: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """:meth:`_dot` as one product in ``t``'s (low-precision) type, returned in float32."""
        return self._dot(t, vec.to(t.dtype)).float()

    def _low_head_sums(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Compute :meth:`_head_sums` as one product ``w^T t`` in ``t``'s (low-precision) type.

        Every head's weights go against every column and each head's own block is kept; the result
        is returned in float32.
        """
        b, _, hidden = t.shape
        full = (w.to(t.dtype).transpose(1, 2) @ t).float()  # (b, heads, hidden)
        own = full.view(b, self.n_heads, self.n_heads, -1).diagonal(dim1=1, dim2=2)  # (b, d, heads)
        return own.transpose(1, 2).reshape(b, hidden)

    def _flows(
        self, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, chunk: int | None = None,
        sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the per-token ``(b, l, heads)`` competition and output scale.

        The scale is ``sink_in * allocation``, from the sigmoid queries and keys (zero at padding).

        ``chunk`` positions at a time (default: all at once). Float32, except at inference
        (``chunk`` given) on low-precision ``q``/``k`` (bf16 autocast): then the per-token dot
        products and per-chunk head sums are products in that type (no float32 copies of
        ``q``/``k``), accumulated over chunks and combined in float32. ``sums``: the float32
        ``(q_sum, k_sum)`` over each sentence, when the caller already has them.
        """
        length = q.shape[1]
        spans = [slice(s, s + (chunk or length)) for s in range(0, length, chunk or max(length, 1))]
        low = chunk is not None and q.dtype != torch.float32
        dot, head_sums = (self._low_dot, self._low_head_sums) if low else (self._dot, self._head_sums)
        with torch.autocast(q.device.type, enabled=False):
            n_keys = valid.sum(dim=1).float()[:, None, None]  # keys per sentence, (b, 1, 1)
            # incoming and outgoing flow
            if sums is not None:
                q_sum, k_sum = sums
            elif q.dtype == torch.float32:
                k_sum, q_sum = k.sum(dim=1), q.sum(dim=1)
            else:  # per chunk: a float32 reduction over a strided low-precision tensor is slow
                k_sum = sum(k[:, s].float().sum(dim=1) for s in spans)
                q_sum = sum(q[:, s].float().sum(dim=1) for s in spans)

            def cast(t: torch.Tensor) -> torch.Tensor:  # made float once per chunk and pass
                return t if low else t.float()

            # conservation refinement
            sink_in, q_in, k_out = [], 0.0, 0.0
            for s in spans:
                qs, ks = cast(q[:, s]), cast(k[:, s])
                sink_in.append(1.0 / dot(qs, k_sum))
                q_in = q_in + head_sums(qs, sink_in[-1])
                k_out = k_out + head_sums(ks, 1.0 / dot(ks, q_sum))  # source_out
            sink_in = torch.cat(sink_in, 1)
            sink = torch.cat([dot(cast(q[:, s]), k_out) for s in spans], 1)
            source = torch.cat([dot(cast(k[:, s]), q_in) for s in spans], 1)
            source = source.clamp(min=-1.0, max=1.0)
            # competition (softmax over the sentence's keys) and allocation
            if not bool(valid.all()):
                source = source.masked_fill(~valid[:, :, None], float("-inf"))
            # softmax along a contiguous dimension (as the official): over a strided one the
            # CPU kernel sums 50k exponentials in another order and loses digits
            competition = torch.softmax(source.transpose(1, 2).contiguous(), dim=-1)
            competition = competition.transpose(1, 2) * n_keys
            return competition, sink_in * torch.sigmoid(sink)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Attend within each padded sentence: ``x`` ``(batch, length, hidden)``, ``valid`` ``(batch, length)``."""
        b, length, hidden = x.shape
        heads = (b, length, self.n_heads, hidden // self.n_heads)
        keep = valid[:, :, None].to(x.dtype)
        q = torch.sigmoid(self.q_proj(x)) * keep
        k = torch.sigmoid(self.k_proj(x)) * keep
        v = self.v_proj(x)
        competition, scale = self._flows(q, k, valid)
        vc = v.view(heads) * competition[..., None]
        kv = k.view(heads).permute(0, 2, 3, 1) @ vc.transpose(1, 2)  # (b, heads, d, d)
        out = (q.view(heads).transpose(1, 2) @ kv).transpose(1, 2) * scale[..., None]
        return self.dropout(self.out_proj(out.reshape(b, length, hidden)))

    def add_to_(
        self, x: torch.Tensor, valid: torch.Tensor, norm: nn.Module, dropout: nn.Module,
        chunk: int, workspace: InferenceWorkspace | None = None,
    ) -> torch.Tensor:
        """Inference (no autograd): ``x += dropout(self(norm(x), valid))`` in place.

        Token-wise work (norm, projections, output) runs ``chunk`` positions at a time, so only
        ``q`` and ``k`` are held at full size (``v`` is made chunk by chunk where it is used):
        no other ``(tokens, hidden)`` temporaries.
        Per-head products are one matrix product per head on strided views (no head-major
        copies; several times faster than a batched product on transposed views in bfloat16).
        """
        ws = InferenceWorkspace() if workspace is None else workspace
        b, length, hidden = x.shape
        n_heads, d = self.n_heads, hidden // self.n_heads
        q, k = ws.qk(x)
        flat = [t.view(-1, hidden) for t in (x, q, k)]  # token-wise: any sentence layout
        # low precision, one sentence: the flows' float32 sums taken while q/k chunks are in cache
        sums = [0.0, 0.0] if q.dtype != torch.float32 and b == 1 else None
        for start in range(0, b * length, chunk):
            rows = slice(start, start + chunk)
            h = ws.cast(norm(flat[0][rows]))
            for i, proj in enumerate((self.q_proj, self.k_proj)):
                ws.linear(proj, h, out=flat[i + 1][rows]).sigmoid_()
                if sums is not None:
                    sums[i] = sums[i] + flat[i + 1][rows].float().sum(dim=0, keepdim=True)
        if not bool(valid.all()):
            keep = valid[:, :, None].to(q.dtype)
            q.mul_(keep)
            k.mul_(keep)
        competition, scale = self._flows(q, k, valid, chunk, sums)
        competition, scale = competition.to(q.dtype), scale.to(q.dtype)
        cols = [slice(i * d, (i + 1) * d) for i in range(n_heads)]
        with torch.autocast(x.device.type, enabled=False):  # types explicit from here (ws.dtype)
            # kv = sum over the sentence of k (x) (v * competition); v made chunk by chunk, never
            # held at full size (the flows above need only q and k)
            kv = torch.zeros(b, n_heads, d, d, dtype=torch.float32, device=x.device)
            part = q.new_empty(d, d)
            for start in range(0, length, chunk):
                rows = slice(start, start + chunk)
                vc = ws.linear(self.v_proj, ws.cast(norm(x[:, rows])))  # ws knows the type
                vc.view(*vc.shape[:2], n_heads, d).mul_(competition[:, rows, :, None])
                for i in range(b):
                    for j, c in enumerate(cols):
                        kv[i, j] += torch.mm(k[i, rows, c].t(), vc[i, :, c], out=part)
            kv = kv.to(q.dtype)
            out = q.new_empty(b, min(chunk, length), hidden)
            for start in range(0, length, chunk):
                rows = slice(start, start + chunk)
                o = out[:, : q[:, rows].shape[1]]
                for i in range(b):
                    for j, c in enumerate(cols):
                        torch.mm(q[i, rows, c], kv[i, j], out=o[i, :, c])
                o.view(*o.shape[:2], n_heads, d).mul_(scale[:, rows, :, None])
                x[:, rows] += dropout(self.dropout(ws.linear(self.out_proj, o)))
        return x


class InferenceWorkspace:
    """What the blocks of one inference call share.

    These are the ``q``/``k`` buffers (fresh large allocations cost a page fault per 4 KiB on first
    touch) and, under autocast, the weights cast once to the autocast type (autocast would cast them
    again for every chunk).
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.weights: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.autocast = False  # set by the first block: autocast was on when it ran
        self.low: torch.dtype | None = None

    def dtype(self, x: torch.Tensor) -> torch.dtype:
        """Return the autocast type when autocast is (or was, for this call) on, else ``x``'s type."""
        if torch.is_autocast_enabled(x.device.type):
            self.autocast, self.low = True, torch.get_autocast_dtype(x.device.type)
        return self.low if self.autocast else x.dtype

    def release(self) -> None:
        """Free the buffers (before the caller allocates other full-size tensors)."""
        self.buffers = []

    def cast(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` in the compute type (a no-op without autocast)."""
        return h.to(self.dtype(h))

    def qk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Two buffers shaped as ``x`` in the compute type, reused while the shape holds."""
        dtype = self.dtype(x)
        if not self.buffers or self.buffers[0].shape != x.shape or self.buffers[0].dtype != dtype:
            self.buffers = []  # free before allocating
            self.buffers = [x.new_empty(x.shape, dtype=dtype) for _ in range(2)]
        return self.buffers

    def linear(self, layer: nn.Linear, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``layer(h)`` (written into ``out`` when given) as one GEMM with the bias."""
        dtype = self.dtype(h)
        if dtype != layer.weight.dtype:
            if layer not in self.weights:
                bias = None if layer.bias is None else layer.bias.to(dtype)
                self.weights[layer] = (layer.weight.to(dtype).t(), bias)
            weight, bias = self.weights[layer]
        else:
            weight, bias = layer.weight.t(), layer.bias
        with torch.autocast(h.device.type, enabled=False):
            h2 = h.to(dtype).reshape(-1, h.shape[-1])
            shape = (*h.shape[:-1], weight.shape[1])
            if out is not None and out.is_contiguous() and out.dtype == dtype:
                target = out.view(-1, weight.shape[1])
                if bias is None:
                    torch.mm(h2, weight, out=target)
                else:
                    torch.addmm(bias, h2, weight, out=target)
                return out
            res = (h2 @ weight if bias is None else torch.addmm(bias, h2, weight)).view(shape)
            return res if out is None else out.copy_(res)


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
    raise InputDataError(f"`attention` must be 'flowformer' or 'sdpa', got {kind!r}.")
