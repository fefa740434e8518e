"""Negative-binomial MLP decoder with per-layer batch (and dataset) embeddings."""

from __future__ import annotations

import torch
from torch import nn

from .._constants import COVARIATES
from .._exceptions import InputDataError
from ._norm import Norm, make_norm


class CovariateEmbedding(nn.Module):
    """``norm(prelu(embedding(index)))``, added to a decoder layer's output."""

    def __init__(self, n_categories: int, n_hidden: int, norm: Norm) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_categories, n_hidden)
        self.act = nn.PReLU()
        self.norm = make_norm(norm, n_hidden)

    def forward(self, index: torch.Tensor | None) -> torch.Tensor:
        """Embed category codes ``index``; ``None``: the sum over all categories' vectors."""
        if index is None:
            # no category given: the official convention, the sum over all categories' vectors
            return self.norm(self.act(self.embedding.weight.detach().sum(0, keepdim=True)))
        return self.norm(self.act(self.embedding(index.long().view(-1))))


class DecoderLayer(nn.Module):
    """``norm(dropout(prelu(linear(x))))``, one hidden layer of :class:`NBDecoder`."""

    def __init__(self, n_in: int, n_out: int, dropout: float, norm: Norm) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.act = nn.PReLU()
        self.dropout = nn.Dropout(dropout)
        self.norm = make_norm(norm, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` ``(n_cells, n_in)``."""
        return self.norm(self.dropout(self.act(self.linear(x))))


class NBDecoder(nn.Module):
    """Map ``z`` to negative-binomial means (unnormalised) and gene-wise inverse dispersions.

    Parameters
    ----------
    n_latent
        Dimension of ``z``.
    n_hidden
        Width of the hidden layers.
    n_genes
        Output genes (the model's vocabulary).
    n_layers
        Layers counting the output head, at least 2 (as the official ``nbmlp`` decoder).
    dropout, norm
        Regularisation of the hidden layers.
    n_batch, n_dataset
        Categories of the batch / dataset covariates (0 = none).
    n_head_hidden
        Width of the head's hidden layer (128 in the official checkpoints).
    likelihood
        ``"nb"``: positive means (``exp``, clamped as the official decoder); ``"gaussian"``:
        unconstrained predictions of (normalised) expression.
    """

    def __init__(
        self,
        n_latent: int,
        n_hidden: int,
        n_genes: int,
        *,
        n_layers: int = 2,
        dropout: float = 0.1,
        norm: Norm = "layernorm",
        n_batch: int = 0,
        n_dataset: int = 0,
        n_head_hidden: int = 128,
        likelihood: str = "nb",
    ) -> None:
        super().__init__()
        self.likelihood = likelihood
        if n_layers < 2:
            raise InputDataError(f"`n_decoder_layers` must be at least 2, got {n_layers}.")
        dims = [n_latent] + [n_hidden] * (n_layers - 1)
        self.layers = nn.ModuleList(
            DecoderLayer(a, b, dropout, norm) for a, b in zip(dims[:-1], dims[1:])
        )
        self.covariates = nn.ModuleList()
        if n_batch or n_dataset:
            for _ in self.layers:
                cov = nn.ModuleDict()
                if n_batch:
                    cov[COVARIATES.BATCH] = CovariateEmbedding(n_batch, n_hidden, norm)
                if n_dataset:
                    cov[COVARIATES.DATASET] = CovariateEmbedding(n_dataset, n_hidden, norm)
                self.covariates.append(cov)
        self.head = nn.Linear(n_hidden, n_head_hidden)
        self.mean = nn.Linear(n_head_hidden, n_genes)
        self.log_theta = nn.Parameter(torch.randn(n_genes))

    def forward(
        self,
        z: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        dataset_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the unnormalised means ``(n, n_genes)`` and inverse dispersions ``(n_genes,)``."""
        return self.means(self.hidden(z, batch_index, dataset_index)), self.theta()

    def hidden(
        self,
        z: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        dataset_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the input of the output layer ``(n, n_head_hidden)`` (after the head's ReLU)."""
        x = z
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if len(self.covariates):
                cov = self.covariates[i]
                if COVARIATES.BATCH in cov:
                    x = x + cov[COVARIATES.BATCH](batch_index)
                if COVARIATES.DATASET in cov:
                    x = x + cov[COVARIATES.DATASET](dataset_index)
        return torch.relu(self.head(x))

    def means(
        self, hidden: torch.Tensor, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Unnormalised means of :meth:`hidden` for the genes ``rows`` (default: all genes).

        Only the output layer's rows ``rows`` are computed (the cost of a training loss over a
        subset of the vocabulary). ``dtype``: compute the output's activation in that type (e.g.
        float32 after a bfloat16 product under autocast).
        """
        if rows is None:
            out = self.mean(hidden)
        else:
            out = nn.functional.linear(hidden, self.mean.weight[rows], self.mean.bias[rows])
        if dtype is not None:
            out = out.to(dtype)
        return out if self.likelihood == "gaussian" else torch.exp(out).clamp(min=1e-5, max=1e6)

    def theta(self) -> torch.Tensor:
        """Gene-wise inverse dispersions ``(n_genes,)``."""
        return torch.exp(self.log_theta).clamp(min=1e-4, max=1e4)
