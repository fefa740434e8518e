"""Expression embedder: ``log1p(counts) @ gene_table`` followed by a small MLP."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._chunks import rows_per_chunk
from ._norm import Norm, make_norm


def log1p_matmul(x: torch.Tensor, table: torch.Tensor, low: torch.dtype | None = None) -> torch.Tensor:
    """``log1p(x) @ table`` for dense or sparse (CSR/CSC/COO) ``x`` without densifying it.

    Float32 (also under autocast), except that ``low`` (e.g. ``torch.bfloat16``, for inference
    under autocast) runs the dense products (dense input, densified row chunks of sparse input)
    in that type; the sparse product and the result are float32 either way.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _log1p_matmul(x.float(), table.float(), low)


DENSE_DENSITY = 0.05
"""Above this fraction of non-zeros, sparse input is densified in row chunks for a dense GEMM
(many times faster per FLOP than a sparse product on CPUs)."""
CHUNK_CELLS = 4096
BAG_DENSITY = 0.02
"""Below this fraction of non-zeros a training mini-batch is embedded as bags of its non-zeros;
above it one dense product is cheaper (on one CPU core, 256 cells: a bag costs ~0.1-0.2 us per
non-zero forward and backward, the dense product ~0.005-0.01 us per entry; 45 vs 2 ms at half
non-zeros of 2,000 genes)."""


def denser_than(x: torch.Tensor, fraction: float, rows: int = 64) -> bool:
    """Whether more than ``fraction`` of the entries of dense ``x`` are non-zero.

    Judged on its first ``rows`` rows: a cheap estimate, enough to choose between two computations
    of the same result.
    """
    head = x[:rows]
    return int(head.count_nonzero()) > fraction * head.numel()


def csr_row_chunks(x: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, slice, torch.Tensor]]:
    """Yield row chunks of a CSR tensor.

    Each chunk is ``(start, stop, entries, rows)`` for rows ``start:stop``, where ``entries``
    slices their values/column indices and ``rows`` is each entry's row within the chunk
    (temporaries bounded by one chunk's entries).
    """
    crow = x.crow_indices()
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        entries = slice(int(crow[start]), int(crow[stop]))
        rows = torch.repeat_interleave(
            torch.arange(stop - start, device=x.device), crow[start : stop + 1].diff()
        )
        yield start, stop, entries, rows


def scale_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x`` with row ``i`` multiplied by ``factor[i]``; sparse input stays sparse (CSR).

    Sparse values are scaled in row chunks (:func:`csr_row_chunks`: temporaries bounded by one
    chunk's entries).
    """
    if x.layout == torch.strided:
        return x * factor.view(-1, 1).to(x.dtype)
    x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
    values, factor = x.values().clone(), factor.to(x.values().dtype)
    for start, stop, entries, rows in csr_row_chunks(x, rows_per_chunk(CHUNK_CELLS, x.device)):
        values[entries] *= factor[start:stop][rows]
    return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape, check_invariants=False)


def _log1p_matmul(x: torch.Tensor, table: torch.Tensor, low: torch.dtype | None) -> torch.Tensor:
    compute = table if low is None else table.to(low)
    if x.layout == torch.strided:
        return (torch.log1p(x).to(compute.dtype) @ compute).float()
    if x.layout != torch.sparse_csr:
        x = x.to_sparse_csr()
    n_rows, n_cols = x.shape
    if x.values().numel() < DENSE_DENSITY * max(n_rows * n_cols, 1):
        return torch.sparse.mm(torch.log1p(x), table)
    col, val = x.col_indices(), x.values()
    inplace = not torch.is_grad_enabled()
    out = table.new_empty(n_rows, table.shape[1]) if inplace else None
    chunks = []
    # bounded memory: one dense chunk at a time
    for start, stop, entries, rows in csr_row_chunks(x, rows_per_chunk(CHUNK_CELLS, x.device, n_cols)):
        dense = compute.new_zeros(stop - start, n_cols)
        dense[rows, col[entries]] = torch.log1p(val[entries]).to(compute.dtype)
        if inplace and low is None:
            torch.mm(dense, compute, out=out[start:stop])
        elif inplace:
            out[start:stop] = dense @ compute  # into float32
        else:
            chunks.append((dense @ compute).float())
    if inplace:
        return out
    return torch.cat(chunks) if chunks else table.new_zeros(0, table.shape[1])


class GeneEmbedder(nn.Module):
    """Embed each cell as the log1p-weighted sum of learned gene vectors.

    Parameters
    ----------
    n_genes
        Rows of the gene-embedding table (the model's gene vocabulary).
    n_hidden
        Width of the cell tokens.
    dropout
        Dropout after the projection.
    norm
        Normalisation after the projection; ``None``: none (the caller normalises the tokens).
    """

    def __init__(self, n_genes: int, n_hidden: int, *, dropout: float, norm: Norm | None) -> None:
        super().__init__()
        self.gene_table = nn.Parameter(torch.randn(n_genes, n_hidden) * 0.005)
        self.proj = nn.Linear(n_hidden, n_hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = make_norm(norm, n_hidden) if norm is not None else nn.Identity()

    def table_for(
        self, gene_index: torch.Tensor | None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the gene vectors of the input columns.

        Rows are zero for genes outside the vocabulary and for genes not in ``keep`` (a boolean
        per input column).
        """
        table = self.gene_table if gene_index is None else self.gene_table[gene_index.clamp(min=0)]
        if gene_index is not None:
            keep = gene_index >= 0 if keep is None else keep & (gene_index >= 0)
        if keep is not None:
            table = table * keep.unsqueeze(-1).to(table.dtype)
        return table

    def forward(
        self,
        x: torch.Tensor,
        gene_index: torch.Tensor | None = None,
        positional: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed counts ``(n_cells, n_input)`` as cell tokens ``(n_cells, n_hidden)``.

        This is :meth:`tokens` of :meth:`expression`.
        """
        return self.tokens(self.expression(x, gene_index, keep, center), positional)

    def expression(
        self,
        x: torch.Tensor,
        gene_index: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute ``log1p(x) @ gene table`` ``(n_cells, n_hidden)``, linear in the log expression.

        Only the input columns in ``keep`` (default: all) are read. ``center`` ``(n_input,)``:
        embed ``log1p(x) - center`` (computed as ``log1p(x) @ table - center @ table``, so sparse
        input stays sparse).
        """
        table = self.table_for(gene_index, keep)
        # inference under low-precision autocast: the dense products in that type too (not when
        # centring, where the subtraction would expose its rounding)
        device = x.device.type
        low = None
        if center is None and not torch.is_grad_enabled() and torch.is_autocast_enabled(device):
            low = torch.get_autocast_dtype(device)
        h = log1p_matmul(x, table, low)
        if center is not None:
            with torch.autocast(device, enabled=False):  # float32, as the product above
                h = h - center.to(table.dtype) @ table
        return h

    def expression_of_entries(
        self,
        x: torch.Tensor,
        hide: torch.Tensor | None = None,
        gene_index: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`expression` of dense ``x`` with the ``hide`` entries read as 0, from its non-zeros.

        A weighted bag of gene vectors per cell (:func:`torch.nn.functional.embedding_bag`): the
        cost (and the gradient's) scales with the non-zero entries, not ``cells x genes``; above
        :data:`BAG_DENSITY` non-zeros, the dense product of the masked counts instead. Equal to
        :meth:`expression` of ``x.masked_fill(hide, 0)`` up to float rounding (used in training).
        """
        if denser_than(x, BAG_DENSITY):  # dense cells: one product
            return self.expression(x if hide is None else x.masked_fill(hide, 0.0), gene_index, keep)
        with torch.autocast(x.device.type, enabled=False):
            rows, cols = x.nonzero(as_tuple=True)  # row-major: the bags in order
            if hide is not None:
                shown = ~hide[rows, cols]
                rows, cols = rows[shown], cols[shown]
            counts = torch.bincount(rows, minlength=x.shape[0])
            offsets = counts.cumsum(0) - counts
            table = self.table_for(gene_index, keep).float()
            return F.embedding_bag(cols, table, offsets, mode="sum",
                                   per_sample_weights=torch.log1p(x[rows, cols].float()))

    def tokens(self, h: torch.Tensor, positional: torch.Tensor | None = None) -> torch.Tensor:
        """Turn :meth:`expression` (plus the positional encoding) into cell tokens.

        Projection, ReLU, dropout, norm. Without autograd ``h`` is overwritten.
        """
        if positional is not None:
            h = h + positional
        if torch.is_grad_enabled():
            return self.norm(self.dropout(F.relu(self.proj(h))))
        chunk = rows_per_chunk(CHUNK_CELLS, h.device, h.shape[1])
        for start in range(0, h.shape[0], chunk):  # inference: in place, row chunks
            rows = h[start : start + chunk]
            rows.copy_(self.norm(self.dropout(F.relu(self.proj(rows)))))
        return h
