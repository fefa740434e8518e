"""CellPLMModule: the pure-torch CellPLM network (no AnnData in here)."""

from __future__ import annotations

from typing import Literal

import torch
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch.distributions import Normal

from .._constants import MODULE_KEYS, REGISTRY_KEYS
from .._exceptions import InputDataError
from ._chunks import rows_per_chunk
from ._loss import DECODER_HIDDEN_KEY, gaussian_nll, nb_nll, nb_recon_terms
from ._norm import Norm, SampleNorm, TokenNorm
from .attention import AttentionKind
from .decoder import NBDecoder
from .embedder import GeneEmbedder, csr_row_chunks, scale_rows
from .encoder import CellEncoder
from .latent import GMVAEEmbedding, LatentDistribution, make_latent
from .neighbourhood import NeighbourhoodAttention
from .positional import PositionalEncoding, PositionalEncodingKind

LATENT_CHUNK = 4096
"""Cells per chunk of the latent layer and of library sums at inference."""


class CellPLMModule(BaseModuleClass):
    """CellPLM: cells of one sentence are the tokens of a transformer.

    Data flow: counts ``(n_cells, n_input)`` → :class:`~.embedder.GeneEmbedder` (+ positional
    encoding of coordinates) → :class:`~.encoder.CellEncoder` (attention within each sentence) →
    latent (VAE or GMVAE) → :class:`~.decoder.NBDecoder` over the gene vocabulary.

    The module holds no data-specific state: which vocabulary row each input column is comes
    with every call (``gene_index``, from the data loader's gene alignment; ``None`` when the
    input columns are the vocabulary), so one module reads any dataset's genes.

    Parameters
    ----------
    n_genes
        Size of the gene vocabulary (rows of the gene table, outputs of the decoder).
    n_batch, n_dataset
        Categories of the decoder's batch and dataset embeddings (0 = none).
    n_hidden, n_layers, n_heads
        Width, depth and heads of the transformer.
    n_latent
        Dimension of the cell embedding.
    n_decoder_layers
        Decoder layers, counting the output head (at least 2).
    n_decoder_hidden
        Width of the decoder's hidden layers (default ``n_hidden``).
    n_clusters
        Mixture components of the GMVAE prior.
    latent_distribution
        ``"gmvae"`` (paper) or ``"vae"``.
    gmvae_embedding
        The GMVAE's embedding: ``"mean"`` over its mixture or ``"cluster"`` (official checkpoints);
        see :class:`~.latent.GMVAELatent`.
    attention
        ``"flowformer"`` (linear cost, paper) or ``"sdpa"`` (softmax attention).
    positional_encoding
        ``"sinusoidal"``, ``"learned"`` or ``"none"``; needs coordinates unless ``"none"``.
    n_spatial_dims
        Columns of the coordinates (2 or 3).
    norm
        Normalisation of embedder and decoder (``"groupnorm"`` in the official checkpoints).
    dropout
        Dropout everywhere.
    kl_free_bits
        Free bits: each latent loss term is floored at this value (the official ``lamda``).
    gmvae_gaussian_weight, gmvae_categorical_weight
        Weights of the GMVAE's Gaussian and categorical terms.
    masked_recon_weight
        Weight of the reconstruction of the hidden entries (the denoising term) next to the
        reconstruction of all genes of the masked cells.
    gene_likelihood
        ``"nb"`` for raw counts (paper pretraining) or ``"gaussian"`` (squared error) for
        normalised, non-count values such as in-situ measurements.
    dataset_gene_mask
        ``(n_dataset, n_genes)`` booleans: which vocabulary genes each dataset measured. The embedder reads
        only genes measured by every dataset (so all cells are embedded from the same panel);
        unmeasured genes never enter the loss (they are not zeros) and are what imputation
        predicts.
    embed_shared_genes
        With ``dataset_gene_mask``: ``True`` (default) embeds every cell from the genes measured by
        all datasets; ``False`` embeds each cell from all its genes (its unmeasured genes must be
        zero), as pretraining on a corpus of datasets with different (even disjoint) panels needs.
    n_spatial_neighbors
        With coordinates: each cell's expression embedding (``log1p(x) @ gene table``, before
        the token MLP) becomes a learned weighted average of its own and its
        ``n_spatial_neighbors`` nearest cells' (within its sentence), in a
        :class:`~scvi_cellplm.module.NeighbourhoodAttention` layer: local tissue context that
        sentence-wide linear attention cannot single out. ``0`` (default, the official
        architecture): no such layer.
    input_center
        ``(n_genes,)`` centre of ``log1p(x)`` per vocabulary gene (e.g. its mean over the training
        cells), or ``None`` (the official embedder: no centring). When given, cells are embedded from
        ``log1p(x) - input_center`` and masked entries carry the centre (no deviation) instead of
        a zero. Needed to train from scratch on dense data (MERFISH, in-situ values, deep
        counts): uncentred, every gene is present in every cell, so each cell's token is one
        common vector plus a small cell-specific part, the gene table's gradients all point the
        same way and training collapses the tokens (and the latent) onto one point; masking
        to zero then dominates what is left. Saved with the model (a buffer).
    input_target_sum
        Scale each cell's counts, over the genes the embedder reads (its vocabulary genes; the
        genes every dataset measured with ``embed_shared_genes``), to this total before ``log1p``, as
        scanpy's ``normalize_total``, so the embedder reads relative expression; the decoder still
        uses the observed library. ``None`` (default; the official embedder): raw counts.
    token_norm
        ``"cell"`` (default; the official architecture): each cell token normalised on its own
        (``norm``), and a LayerNorm after the transformer. ``"sample"``: each token feature
        standardised over the cells of the token's sentence (:class:`SampleNorm`, then ReLU), no
        LayerNorm after the transformer.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        n_batch: int = 0,
        n_dataset: int = 0,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_latent: int = 32,
        n_decoder_layers: int = 2,
        n_decoder_hidden: int | None = None,
        n_clusters: int = 16,
        latent_distribution: LatentDistribution = "gmvae",
        gmvae_embedding: GMVAEEmbedding = "mean",
        attention: AttentionKind = "flowformer",
        positional_encoding: PositionalEncodingKind = "none",
        n_spatial_dims: int = 2,
        norm: Norm = "layernorm",
        dropout: float = 0.1,
        kl_free_bits: float = 0.5,
        gmvae_gaussian_weight: float = 1.0,
        gmvae_categorical_weight: float = 1.0,
        masked_recon_weight: float = 1.0,
        gene_likelihood: Literal["nb", "gaussian"] = "nb",
        dataset_gene_mask: torch.Tensor | None = None,
        embed_shared_genes: bool = True,
        input_center: torch.Tensor | None = None,
        n_spatial_neighbors: int = 0,
        input_target_sum: float | None = None,
        token_norm: TokenNorm = "cell",
    ) -> None:
        super().__init__()
        if gene_likelihood not in ("nb", "gaussian"):
            raise InputDataError(f"`gene_likelihood` must be 'nb' or 'gaussian', got {gene_likelihood!r}.")
        self.gene_likelihood = gene_likelihood
        if dataset_gene_mask is not None:
            dataset_gene_mask = torch.as_tensor(dataset_gene_mask, dtype=torch.bool)
            if dataset_gene_mask.ndim != 2 or dataset_gene_mask.shape[1] != n_genes:
                raise InputDataError("`dataset_gene_mask` must be (n_dataset, n_genes).")
        self.register_buffer("dataset_gene_mask", dataset_gene_mask)
        self.embed_shared_genes = embed_shared_genes
        if input_center is not None:
            input_center = torch.as_tensor(input_center, dtype=torch.float32)
            if input_center.shape != (n_genes,) or not torch.isfinite(input_center).all():
                raise InputDataError("`input_center` must hold one finite value per vocabulary gene.")
            if dataset_gene_mask is not None and not embed_shared_genes:
                raise InputDataError(
                    "`input_center` needs `embed_shared_genes=True` with `dataset_gene_mask` "
                    "(genes a dataset did not measure would read as below the centre)."
                )
        self.register_buffer("input_center", input_center)
        if input_target_sum is not None and not input_target_sum > 0:
            raise InputDataError(f"`input_target_sum` must be positive or None, got {input_target_sum}.")
        self.input_target_sum = input_target_sum
        self.n_genes = n_genes
        self.n_batch = n_batch
        self.n_latent = n_latent
        self.latent_distribution = latent_distribution
        self.positional_encoding = positional_encoding
        self.kl_free_bits = kl_free_bits
        self.gmvae_gaussian_weight = gmvae_gaussian_weight
        self.gmvae_categorical_weight = gmvae_categorical_weight
        self.masked_recon_weight = masked_recon_weight
        # training loss over the measured genes, zeros in closed form (_loss.py); False: dense
        self.sparse_loss = True

        if token_norm not in ("cell", "sample"):
            raise InputDataError(f"`token_norm` must be 'cell' or 'sample', got {token_norm!r}.")
        self.embedder = GeneEmbedder(n_genes, n_hidden, dropout=dropout,
                                     norm=norm if token_norm == "cell" else None)
        self.sample_norm = SampleNorm(n_hidden) if token_norm == "sample" else None
        self.pos_encoder = (
            None
            if positional_encoding == "none"
            else PositionalEncoding(n_hidden, n_dims=n_spatial_dims, kind=positional_encoding)
        )
        self.neighbourhood = (
            NeighbourhoodAttention(n_hidden, n_spatial_neighbors)
            if n_spatial_neighbors
            else None
        )
        self.encoder = CellEncoder(n_hidden, n_layers, n_heads, attention=attention, dropout=dropout,
                                   final_norm=token_norm == "cell")
        self.latent = make_latent(latent_distribution, n_hidden, n_latent, n_clusters, gmvae_embedding)
        self.decoder = NBDecoder(
            n_latent,
            n_decoder_hidden or n_hidden,
            n_genes,
            n_layers=n_decoder_layers,
            dropout=dropout,
            norm=norm,
            n_batch=n_batch,
            n_dataset=n_dataset,
            likelihood=gene_likelihood,
        )

    # ---------------------------------------------------------------- inputs
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {
            MODULE_KEYS.X_KEY: tensors[REGISTRY_KEYS.X_KEY],
            MODULE_KEYS.SENTENCE_KEY: tensors[MODULE_KEYS.SENTENCE_KEY],
            MODULE_KEYS.COORDS_KEY: tensors.get(REGISTRY_KEYS.SPATIAL_KEY),
            MODULE_KEYS.GENE_INDEX_KEY: tensors.get(MODULE_KEYS.GENE_INDEX_KEY),
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {
            MODULE_KEYS.Z_KEY: inference_outputs[MODULE_KEYS.Z_KEY],
            MODULE_KEYS.LIBRARY_KEY: inference_outputs[MODULE_KEYS.LIBRARY_KEY],
            MODULE_KEYS.BATCH_INDEX_KEY: tensors.get(REGISTRY_KEYS.BATCH_KEY),
            MODULE_KEYS.DATASET_INDEX_KEY: tensors.get(REGISTRY_KEYS.DATASET_KEY),
            MODULE_KEYS.GENE_INDEX_KEY: tensors.get(MODULE_KEYS.GENE_INDEX_KEY),
        }

    def measured_genes(
        self, n_cells: int, n_input: int, dataset_index: torch.Tensor | None,
        gene_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(n_cells, n_input)`` booleans: input genes measured for each cell and in the vocabulary."""
        device = self.embedder.gene_table.device
        valid = torch.ones(n_cells, n_input, dtype=torch.bool, device=device)
        if gene_index is not None:
            valid = valid & (gene_index >= 0)
        if self.dataset_gene_mask is not None and dataset_index is not None:
            valid = valid & self._input_panel(gene_index)[dataset_index.view(-1).long()]
        return valid

    # ---------------------------------------------------------------- pieces
    def _input_panel(self, gene_index: torch.Tensor | None) -> torch.Tensor:
        """``dataset_gene_mask`` on the input columns ``(n_dataset, n_input)``."""
        mask = self.dataset_gene_mask
        return mask if gene_index is None else mask[:, gene_index.clamp(min=0)] & (gene_index >= 0)

    def input_column_center(self, gene_index: torch.Tensor | None) -> torch.Tensor | None:
        """``input_center`` of each input column (0 for columns outside the vocabulary)."""
        if self.input_center is None or gene_index is None:
            return self.input_center
        return self.input_center[gene_index.clamp(min=0)] * (gene_index >= 0)

    def embed(
        self,
        x: torch.Tensor,
        sentence: torch.Tensor,
        coords: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        token_offset: torch.Tensor | None = None,
        gene_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Contextualised cell tokens ``(n_cells, n_hidden)`` (before the latent layer).

        ``token_offset`` ``(n_cells, n_hidden)`` is added to the cell tokens before attention (e.g.
        a perturbation embedding, see :class:`~scvi_cellplm.module.CellPLMPerturbationModule`).
        ``gene_index`` gives the vocabulary row of each input column (-1: not in the vocabulary,
        ignored); ``None``: the columns are the vocabulary.
        """
        shared = None
        if self.dataset_gene_mask is not None and self.embed_shared_genes:  # genes all datasets measured
            shared = self._input_panel(gene_index).all(dim=0)
        if self.input_target_sum is not None:  # relative expression: each cell scaled to one total
            keep = shared if shared is not None else None if gene_index is None else gene_index >= 0
            x = scale_rows(x, self.input_target_sum / _row_sum(x, keep).clamp(min=1.0))
        center = self.input_column_center(gene_index)
        # training on dense counts: embed from the shown non-zeros (same sums, a fraction of the work)
        bag = self.sparse_loss and center is None and torch.is_grad_enabled() and x.layout == torch.strided
        if input_mask is not None and not bag:
            if center is None:
                x = dense(x).masked_fill(input_mask, 0.0)
            else:  # a hidden entry reads as the centre: no deviation, rather than "not expressed"
                x = torch.where(input_mask, torch.expm1(center).to(x.dtype), dense(x))
        positional = None
        if coords is None and (self.pos_encoder is not None or self.neighbourhood is not None):
            what = (f"positional_encoding={self.positional_encoding!r}" if self.pos_encoder is not None
                    else "n_spatial_neighbors")
            raise InputDataError(
                f"{what} needs coordinates: register them with `setup_anndata(..., spatial_key=...)`."
            )
        if self.pos_encoder is not None:
            positional = self.pos_encoder(coords, sentence)
        if bag:
            h = self.embedder.expression_of_entries(x, input_mask, gene_index, keep=shared)
        else:
            h = self.embedder.expression(x, gene_index, keep=shared, center=center)
        if self.neighbourhood is not None:  # mixed in the linear expression space
            h = self.neighbourhood(h, coords, sentence)
        h = self.embedder.tokens(h, positional)
        if self.sample_norm is not None:
            h = self.sample_norm(h, sentence)
        if token_offset is not None:
            h = h + token_offset
        return self.encoder(h, sentence)

    def _latent(self, h: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        """Apply the latent layer.

        Without autograd, in row chunks written into preallocated outputs (bounded temporaries at
        50k-cell sentences); scalar terms are cell-weighted means.
        """
        chunk = rows_per_chunk(LATENT_CHUNK, h.device, h.shape[1])
        if torch.is_grad_enabled() or h.shape[0] <= chunk:
            return self.latent(h, sample=sample)
        out: dict[str, torch.Tensor] = {}
        for start in range(0, h.shape[0], chunk):
            part = self.latent(h[start : start + chunk], sample=sample)
            n = part["qzm"].shape[0]
            for key, value in part.items():
                if value.dim() == 0:  # a mean over the chunk's cells
                    out[key] = out.get(key, 0.0) + value * (n / h.shape[0])
                    continue
                if key not in out:
                    out[key] = value.new_empty(h.shape[0], *value.shape[1:])
                out[key][start : start + n] = value
        return out

    # ---------------------------------------------------------------- scvi-tools API
    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        sentence: torch.Tensor,
        coords: torch.Tensor | None = None,
        input_mask: torch.Tensor | None = None,
        sample: bool | None = None,
        gene_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode cells; ``sample`` defaults to ``self.training`` (eval is deterministic).

        ``gene_index`` ``(n_input,)``: vocabulary row of each input column, -1 for columns outside
        the vocabulary (ignored); ``None`` when the columns are the vocabulary.
        """
        sample = self.training if sample is None else sample
        sentence = sentence.view(-1).long()
        h = self.embed(x, sentence, coords, input_mask, gene_index=gene_index)
        out = self._latent(h, sample)
        library = _row_sum(x, None if gene_index is None else gene_index >= 0)
        outputs = {
            MODULE_KEYS.HIDDEN_KEY: h,
            MODULE_KEYS.Z_KEY: out["z"],
            MODULE_KEYS.QZM_KEY: out["qzm"],
            MODULE_KEYS.QZ_KEY: Normal(out["qzm"], out["qzv"].sqrt(), validate_args=False),
            MODULE_KEYS.LIBRARY_KEY: library,
            MODULE_KEYS.LATENT_LOSS_KEY: self._latent_loss(out),
        }
        if "cluster_probs" in out:
            outputs[MODULE_KEYS.CLUSTER_PROBS_KEY] = out["cluster_probs"]
        return outputs

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        dataset_index: torch.Tensor | None = None,
        decode_dataset_index: torch.Tensor | None = None,
        gene_index: torch.Tensor | None = None,
    ) -> dict:
        """Likelihood parameters over the input genes (the vocabulary when ``gene_index`` is None).

        ``dataset_index`` (the cells' own datasets) sets which genes their library covers;
        ``decode_dataset_index`` (default: the same) is the dataset the decoder speaks for.
        Input columns outside the vocabulary (``gene_index`` -1) are predicted as 0.
        """
        decode = dataset_index if decode_dataset_index is None else decode_dataset_index
        if self.sparse_loss and self.gene_likelihood == "nb" and self.training and torch.is_grad_enabled():
            # a training step: the loss evaluates the output layer on the genes it needs
            return {DECODER_HIDDEN_KEY: self.decoder.hidden(z, batch_index, decode)}
        mean, theta = self.decoder(z, batch_index, decode)
        if gene_index is not None:
            keep = gene_index >= 0
            mean = mean[:, gene_index.clamp(min=0)] * keep
            theta = theta[gene_index.clamp(min=0)]
        if self.gene_likelihood == "gaussian":
            return {
                MODULE_KEYS.PX_SCALE_KEY: mean,
                MODULE_KEYS.PX_THETA_KEY: theta,
                MODULE_KEYS.PX_KEY: Normal(mean, theta.rsqrt().expand_as(mean), validate_args=False),
            }
        scale = mean / mean.sum(dim=1, keepdim=True)
        if self.dataset_gene_mask is not None and dataset_index is not None:
            measured = self.measured_genes(z.shape[0], scale.shape[1], dataset_index, gene_index)
            rate = scale / (scale * measured).sum(1, keepdim=True).clamp(min=1e-12) * library.view(-1, 1)
        else:
            rate = scale * library.view(-1, 1)
        return {
            MODULE_KEYS.PX_SCALE_KEY: scale,
            MODULE_KEYS.PX_THETA_KEY: theta,
            MODULE_KEYS.PX_RATE_KEY: rate,
            MODULE_KEYS.PX_KEY: NegativeBinomial(mu=rate.clamp(min=1e-8), theta=theta, validate_args=False),
        }

    def _latent_loss(self, out: dict) -> dict[str, torch.Tensor]:
        floor = self.kl_free_bits
        if self.latent_distribution == "gmvae":
            return {
                "kl_gaussian": self.gmvae_gaussian_weight * out["kl_gaussian"].clamp(min=floor),
                "kl_categorical": self.gmvae_categorical_weight
                * out["kl_categorical"].clamp(min=floor),
            }
        return {"kl_gaussian": out["kl"].clamp(min=floor)}

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        input_mask: torch.Tensor | None = None,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Masked negative-binomial reconstruction plus the (weighted, floored) latent loss.

        Reconstruction covers every gene of the cells that had entries hidden (all cells when
        ``input_mask`` is None), plus ``masked_recon_weight`` × the hidden entries alone with the
        library rescaled to them. Genes outside the vocabulary never count.
        """
        x = dense(tensors[REGISTRY_KEYS.X_KEY])
        gene_index = tensors.get(MODULE_KEYS.GENE_INDEX_KEY)
        valid = self.measured_genes(x.shape[0], x.shape[1], tensors.get(REGISTRY_KEYS.DATASET_KEY),
                                    gene_index)
        if DECODER_HIDDEN_KEY in generative_outputs:  # the same terms, over the genes that matter
            terms = nb_recon_terms(x, generative_outputs[DECODER_HIDDEN_KEY], self.decoder, valid,
                                   input_mask, gene_index, self.masked_recon_weight)
            return self._loss_output(terms, inference_outputs, kl_weight)
        scale = generative_outputs[MODULE_KEYS.PX_SCALE_KEY]
        theta = generative_outputs[MODULE_KEYS.PX_THETA_KEY]
        if input_mask is None:
            cells = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        else:
            cells = (input_mask & valid).any(dim=1)
        nll = gaussian_nll if self.gene_likelihood == "gaussian" else nb_nll
        x_c, scale_c, valid_c = x[cells], scale[cells], valid[cells]
        recon = nll(x_c, scale_c, theta, valid_c)
        terms = {"recon_cells": recon}
        if input_mask is not None and self.masked_recon_weight > 0:
            hidden = input_mask[cells] & valid_c
            terms["recon_masked"] = self.masked_recon_weight * nll(x_c, scale_c, theta, hidden)
        return self._loss_output(terms, inference_outputs, kl_weight)

    def _loss_output(self, terms: dict, inference_outputs: dict, kl_weight: float) -> LossOutput:
        recon = sum(terms.values())
        latent = inference_outputs[MODULE_KEYS.LATENT_LOSS_KEY]
        kl = sum(latent.values())
        total = recon + kl_weight * kl
        return LossOutput(
            loss=total,
            reconstruction_loss=recon.expand(1),
            kl_local=kl.expand(1),
            extra_metrics={**terms, **latent},
        )

    @torch.inference_mode()
    def sample(self, tensors: dict, n_samples: int = 1) -> torch.Tensor:
        """Draw counts from the generative model given the cells in ``tensors``."""
        _, gen = self.forward(tensors, compute_loss=False)
        return gen[MODULE_KEYS.PX_KEY].sample((n_samples,)).squeeze(0)


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a strided (dense) tensor."""
    return x if x.layout == torch.strided else x.to_dense()


def _row_sum(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Per-cell sum over the ``keep`` columns, without densifying sparse ``x``."""
    if x.layout == torch.strided:
        return (x if keep is None else x[:, keep]).sum(dim=1)
    x = x if x.layout == torch.sparse_csr else x.to_sparse_csr()
    col, values = x.col_indices(), x.values()
    total = values.new_zeros(x.shape[0])
    for start, stop, entries, rows in csr_row_chunks(x, rows_per_chunk(LATENT_CHUNK, x.device)):
        part = values[entries] if keep is None else values[entries] * keep[col[entries]].to(values.dtype)
        total[start:stop].index_add_(0, rows, part)
    return total
