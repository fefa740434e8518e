"""Latent layers: a Gaussian VAE and a Gaussian-mixture VAE (GMVAE) with a learned prior.

Both are deterministic in evaluation (the posterior mean; for the GMVAE, the mean over its
mixture components, or the mean of the most likely component as in official checkpoints), unlike
the official code whose GMVAE draws a Gumbel sample even in ``eval()``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._exceptions import InputDataError

LatentDistribution = Literal["gmvae", "vae"]
GMVAEEmbedding = Literal["mean", "cluster"]


def _log_normal(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    var = var + 1e-8
    return -0.5 * torch.sum(math.log(2.0 * math.pi) + torch.log(var) + (x - mu) ** 2 / var, dim=-1)


class VAELatent(nn.Module):
    """Diagonal Gaussian posterior with a standard normal prior."""

    def __init__(self, n_hidden: int, n_latent: int) -> None:
        super().__init__()
        self.mean = nn.Linear(n_hidden, n_latent)
        self.log_var = nn.Linear(n_hidden, n_latent)

    def forward(self, h: torch.Tensor, *, sample: bool) -> dict[str, torch.Tensor]:
        """``z`` (a posterior sample if ``sample``, else the mean), ``qzm``, ``qzv`` and the KL term ``kl``."""
        mu = self.mean(h)
        var = self.log_var(h).clamp(-5.0, 5.0).exp() + 1e-4
        z = mu + var.sqrt() * torch.randn_like(mu) if sample else mu
        kl = -0.5 * (1 + var.log() - mu**2 - var).sum(dim=1)
        return {"z": z, "qzm": mu, "qzv": var, "kl": kl.mean()}


class GMVAELatent(nn.Module):
    """Gaussian-mixture VAE: ``q(y|h)`` over clusters, ``q(z|h,y)``, learned prior ``p(z|y)``.

    Parameters
    ----------
    n_hidden
        Width of the encoder output.
    n_latent
        Dimension of ``z``.
    n_clusters
        Mixture components.
    n_cluster_hidden
        Width of the hidden layer of ``q(z|h,y)`` (512 in the official checkpoints).
    embedding
        The deterministic embedding (evaluation): ``"mean"``, the posterior mean of ``z``,
        ``sum_y q(y|h) E[z|h,y]``, which moves smoothly as a cell's cluster probabilities change;
        or ``"cluster"``, ``E[z|h,y]`` of the most likely cluster ``y`` (official checkpoints: the
        parity guarantee), which jumps where two clusters are about equally likely.
    """

    def __init__(
        self, n_hidden: int, n_latent: int, n_clusters: int, n_cluster_hidden: int = 512,
        embedding: GMVAEEmbedding = "mean",
    ) -> None:
        super().__init__()
        if embedding not in ("mean", "cluster"):
            raise InputDataError(f"`gmvae_embedding` must be 'mean' or 'cluster', got {embedding!r}.")
        self.embedding = embedding
        self.n_clusters = n_clusters
        self.cluster_logits = nn.Linear(n_hidden, n_clusters)
        self.hidden = nn.Linear(n_hidden + n_clusters, n_cluster_hidden)
        self.mean = nn.Linear(n_cluster_hidden, n_latent)
        self.var = nn.Linear(n_cluster_hidden, n_latent)
        self.prior_mean = nn.Linear(n_clusters, n_latent)
        self.prior_var = nn.Linear(n_clusters, n_latent)

    def forward(
        self, h: torch.Tensor, *, sample: bool, temperature: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """``z``, ``qzm``, ``qzv``, ``cluster_probs`` and the KL terms ``kl_gaussian``, ``kl_categorical``.

        With ``sample``, a relaxed (Gumbel-softmax) cluster at ``temperature`` and a posterior sample;
        else the most likely cluster for the loss terms, and ``z = qzm`` by the ``embedding`` rule.
        """
        logits = self.cluster_logits(h)
        probs = F.softmax(logits, dim=-1)
        means = variances = None
        if sample:  # relaxed (Gumbel-softmax) cluster sample, as in training of the paper model
            gumbel = -torch.log(-torch.log(torch.rand_like(logits) + 1e-20) + 1e-20)
            y = F.softmax((logits + gumbel) / temperature, dim=-1)
        else:  # deterministic: the most likely cluster
            y = F.one_hot(logits.argmax(dim=-1), self.n_clusters).to(h.dtype)
        if not sample and self.embedding == "mean":  # every component in one pass; argmax's is among them
            means, variances = self._components(h)
            mu, var = means[y.bool()], variances[y.bool()]
        else:
            hidden = F.relu(self.hidden(torch.cat([h, y], dim=1)))
            mu, var = self.mean(hidden), F.softplus(self.var(hidden))
        z = mu + torch.sqrt(var + 1e-10) * torch.randn_like(mu) if sample else mu
        prior_mu, prior_var = self.prior_mean(y), F.softplus(self.prior_var(y))
        gaussian = (_log_normal(z, mu, var) - _log_normal(z, prior_mu, prior_var)).mean()
        categorical = (probs * F.log_softmax(logits, dim=-1)).sum(-1).mean() + math.log(
            self.n_clusters
        )
        if means is not None:  # the posterior mean and variance over the mixture
            p = probs.unsqueeze(-1)
            z = mu = (p * means).sum(1)
            var = ((p * (variances + means**2)).sum(1) - mu**2).clamp(min=0.0)
        return {
            "z": z,
            "qzm": mu,
            "qzv": var,
            "cluster_probs": probs,
            "kl_gaussian": gaussian,
            "kl_categorical": categorical,
        }

    def _components(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(z|h,y)`` for every component ``y`` at once: ``(cells, clusters, n_latent)``."""
        n_in = h.shape[1]
        weight = self.hidden.weight  # (hidden, n_hidden + n_clusters): [h, one-hot y] inputs
        shared = F.linear(h, weight[:, :n_in], self.hidden.bias)
        hidden = F.relu(shared.unsqueeze(1) + weight[:, n_in:].T.unsqueeze(0))  # (cells, clusters, hidden)
        return self.mean(hidden), F.softplus(self.var(hidden))


def make_latent(
    kind: LatentDistribution, n_hidden: int, n_latent: int, n_clusters: int,
    gmvae_embedding: GMVAEEmbedding = "mean",
) -> nn.Module:
    """Latent layer called ``kind``."""
    if kind == "gmvae":
        return GMVAELatent(n_hidden, n_latent, n_clusters, embedding=gmvae_embedding)
    if kind == "vae":
        return VAELatent(n_hidden, n_latent)
    raise InputDataError(f"`latent_distribution` must be 'gmvae' or 'vae', got {kind!r}.")
