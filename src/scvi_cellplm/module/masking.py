"""Pretraining corruption: hide genes of a fraction of each sentence's cells, drop whole cells."""

from __future__ import annotations

import torch


def _per_sentence_rank(sentence: torch.Tensor, generator: torch.Generator | None) -> tuple:
    """Random rank of each cell within its sentence, and the sentence sizes per cell."""
    noise = torch.rand(sentence.shape, generator=generator, device=sentence.device)
    order = torch.argsort(sentence.double() + noise.double(), stable=True)
    _, inverse, counts = torch.unique(sentence, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(sentence)
    rank[order] = torch.arange(len(order), device=sentence.device) - starts[inverse[order]]
    return rank, counts[inverse]


def sample_input_mask(
    sentence: torch.Tensor,
    n_genes: int,
    *,
    mask_cell_rate: float = 0.75,
    mask_gene_rate: float = 0.25,
    beta_ratio: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean ``(n_cells, n_genes)`` mask of the entries to hide (and reconstruct).

    In each sentence, ``floor(mask_cell_rate * size)`` cells are chosen; each chosen cell hides a
    fraction of its genes: ``mask_gene_rate`` per entry, or, with ``beta_ratio`` (the official
    pretraining), a per-cell rate drawn from ``Beta(5, 4 / mask_gene_rate - 3)``, capped at 0.9
    (mean ``5 / (2 + 4 / mask_gene_rate)``, 0.28 for the default 0.25).
    """
    n = sentence.shape[0]
    device = sentence.device
    rank, size = _per_sentence_rank(sentence, generator)
    chosen = rank < torch.floor(mask_cell_rate * size.double()).long()
    if beta_ratio:
        beta = torch.distributions.Beta(
            torch.tensor(5.0, device=device), torch.tensor(4.0 / mask_gene_rate - 3.0, device=device)
        )
        # torch.distributions takes no generator: draw from a stream forked and seeded from it
        if generator is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                rate = beta.sample((n,))
        else:
            rate = beta.sample((n,))
        rate = rate.clamp(max=0.9)
    else:
        rate = torch.full((n,), mask_gene_rate, device=device)
    draws = torch.rand((n, n_genes), generator=generator, device=device)
    return (draws <= rate.unsqueeze(1)) & chosen.unsqueeze(1)


def sample_kept_cells(
    sentence: torch.Tensor,
    *,
    drop_cell_rate: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the indices of the cells kept after dropping ``floor(drop_cell_rate * size)`` per sentence.

    Every sentence keeps at least one cell.
    """
    if drop_cell_rate <= 0:
        return torch.arange(sentence.shape[0], device=sentence.device)
    rank, size = _per_sentence_rank(sentence, generator)
    n_keep = torch.clamp(size - torch.floor(drop_cell_rate * size.double()).long(), min=1)
    return torch.nonzero(rank < n_keep).squeeze(1)
