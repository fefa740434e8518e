"""Training reconstruction loss over the genes that matter: the measured genes of the cells.

:meth:`CellPLMModule.loss <scvi_cellplm.module.CellPLMModule.loss>` reconstructs, for every cell
with hidden entries, all its measured genes (``recon_cells``) and its hidden entries alone
(``recon_masked``), each under a negative binomial whose means are renormalised over those entries
and matched to their observed library. Computed naively this costs several passes of
``lgamma``/``digamma`` over ``cells x vocabulary`` entries, most of them unmeasured genes or zeros.
:func:`nb_recon_terms` computes the same sums (equal up to float rounding):

- only over the columns some cell measured (the decoder's output layer is evaluated for those rows
  of its weight only);
- a zero count's negative log-likelihood is ``theta * (log(theta + mu) - log(theta))``: one
  ``log`` per entry; ``lgamma`` (and its ``digamma`` backward) only at the non-zero entries,
  gathered.

The training step's generative pass hands the loss the decoder's hidden layer
(:data:`DECODER_HIDDEN_KEY`) instead of the dense means when :attr:`CellPLMModule.sparse_loss` is
on (the default) and the module is training with autograd; inference is untouched.
"""

from __future__ import annotations

import torch

DECODER_HIDDEN_KEY = "px_hidden"
"""Generative output (training only): the input of the decoder's output layer, for the loss."""

EPS = 1e-8
"""The ``eps`` of :func:`scvi.distributions._negative_binomial.log_nb_positive`."""


def nb_recon_terms(
    x: torch.Tensor,
    hidden: torch.Tensor,
    decoder,
    valid: torch.Tensor,
    input_mask: torch.Tensor | None,
    gene_index: torch.Tensor | None,
    masked_weight: float,
) -> dict[str, torch.Tensor]:
    """Reconstruction terms of :meth:`CellPLMModule.loss` from the decoder's hidden layer.

    Parameters
    ----------
    x
        Counts ``(n_cells, n_input)`` (dense).
    hidden
        :meth:`NBDecoder.hidden <scvi_cellplm.module.decoder.NBDecoder.hidden>` of the cells.
    decoder
        The :class:`~scvi_cellplm.module.decoder.NBDecoder`.
    valid
        ``(n_cells, n_input)``: measured input genes in the vocabulary.
    input_mask
        ``(n_cells, n_input)`` hidden entries, or ``None`` (every cell, no masked term).
    gene_index
        Vocabulary row of each input column (-1: none), or ``None`` (the columns are the vocabulary).
    masked_weight
        Weight of ``recon_masked``.

    Returns
    -------
    ``{"recon_cells": ..., "recon_masked": ...}`` (the second only with ``input_mask`` and a positive
    weight): means over the reconstructed cells of the summed negative log-likelihoods.
    """
    if input_mask is None:
        cells = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    else:
        cells = (input_mask & valid).any(dim=1)
    n = int(cells.sum())
    with_masked = input_mask is not None and masked_weight > 0
    if n == 0:
        zero = x.new_zeros(())
        return {"recon_cells": zero, **({"recon_masked": zero} if with_masked else {})}
    all_cells = n == x.shape[0]
    x_c = x if all_cells else x[cells]
    valid_c = valid if all_cells else valid[cells]
    mask_c = None if input_mask is None else (input_mask if all_cells else input_mask[cells])
    columns = valid_c.any(dim=0)
    if bool(columns.all()):
        rows = None if gene_index is None else gene_index
    else:  # only the genes some cell measured
        keep = columns.nonzero().squeeze(1)
        x_c, valid_c = x_c[:, keep], valid_c[:, keep]
        mask_c = None if mask_c is None else mask_c[:, keep]
        rows = keep if gene_index is None else gene_index[keep]
    h = hidden if all_cells else hidden[cells]
    mean = decoder.means(h, rows)
    theta = decoder.theta()
    theta = theta if rows is None else theta[rows]
    terms = {"recon_cells": _nb_nll_sum(x_c, mean, theta, valid_c) / n}
    if with_masked:
        terms["recon_masked"] = masked_weight * _nb_nll_sum(x_c, mean, theta, mask_c & valid_c) / n
    return terms


def _nb_nll_sum(
    x: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, entries: torch.Tensor
) -> torch.Tensor:
    """Sum over ``entries`` of the NB negative log-likelihood, means renormalised over them.

    As :func:`scvi_cellplm.module._module._nb_nll` (times the number of cells), with
    ``-log NB(x) = theta * (log(theta + mu) - log(theta)) + [x != 0] * (x * (log(theta + mu) -
    log(mu)) - lgamma(x + theta) + lgamma(theta) + lgamma(x + 1))``.
    """
    weight = entries.to(mean.dtype)
    lib = (x * weight).sum(dim=1, keepdim=True)
    kept = mean * weight
    mu = (kept * (lib / kept.sum(dim=1, keepdim=True).clamp(min=1e-12))).clamp(min=1e-8)
    log_theta_mu = torch.log(theta + mu + EPS)
    # every entry: theta * (log(theta + mu) - log(theta)); weight 0 off the entries
    total = (weight * log_theta_mu).sum(dim=0) @ theta - weight.sum(dim=0) @ (theta * torch.log(theta + EPS))
    rows, cols = ((x != 0) & entries).nonzero(as_tuple=True)
    if rows.numel():
        xv, th = x[rows, cols], theta[cols]
        ltm = log_theta_mu[rows, cols]
        total = total + (
            xv * (ltm - torch.log(mu[rows, cols] + EPS))
            - torch.lgamma(xv + th) + torch.lgamma(th) + torch.lgamma(xv + 1)
        ).sum()
    return total
