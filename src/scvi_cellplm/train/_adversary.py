"""Batch adversary: a classifier that learns the batch from the latent, through gradient reversal."""

from __future__ import annotations

import torch
from scvi.module import Classifier
from torch import nn


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient comes back negated (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class BatchAdversary(nn.Module):
    """Predicts each cell's batch from its latent mean; the encoder is trained to defeat it.

    The classifier is scvi-tools' :class:`scvi.module.Classifier` with the configuration of
    :class:`scvi.train.AdversarialTrainingPlan` (two hidden layers of 32) but without batch
    normalisation: a training mini-batch is often one sentence, hence one batch, and batch
    normalisation would remove exactly the batch-wide shift it must detect. Instead of that plan's
    second optimiser and manual optimisation, the gradient reaching the latent is reversed, so
    one AdamW step (with the plan's learning-rate schedule and Lightning's gradient clipping)
    trains the classifier to find the batch and the encoder to hide it. The decoder, which sees
    the batch, then carries the batch effect instead of the latent.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_batch
        Batch categories (at least 2).
    """

    def __init__(self, n_latent: int, n_batch: int) -> None:
        super().__init__()
        self.classifier = Classifier(n_latent, n_hidden=32, n_labels=n_batch, n_layers=2, logits=True,
                                     use_batch_norm=False)

    def forward(self, qzm: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the batch prediction (mean over cells); its gradient to ``qzm`` is reversed."""
        logits = self.classifier(_ReverseGradient.apply(qzm))
        return nn.functional.cross_entropy(logits, batch_index.view(-1).long())
