"""CellPLM backbone + perturbation head: post-perturbation expression from control cells."""

from __future__ import annotations

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from .._constants import DATA_KEYS, MODULE_KEYS, REGISTRY_KEYS
from .._exceptions import InputDataError
from ._module import CellPLMModule, dense


class CellPLMPerturbationModule(BaseModuleClass):
    """Predict log-normalised post-perturbation expression of control cells.

    The perturbed genes of each cell (a multi-hot vector over the input genes) enter twice:
    their input counts are set to zero (a knock-out, as the encoder sees it; optional), and
    their *perturbation embedding* is added to the cell token before attention, so the cells
    of a sentence see each other perturbed. The embedding of gene ``g`` is a learned vector
    plus a learned projection of the backbone's gene vector of ``g`` (which gives genes never
    perturbed in training an embedding related to their expression role). A head maps the
    contextualised token and the perturbation embedding to ``log1p`` normalised expression.

    The head's output layer starts at zero and its bias at ``baseline`` (the mean log-normalised
    control profile), so an untrained head predicts "no change" and training improves on it.

    Parameters
    ----------
    backbone
        A (pretrained) :class:`~scvi_cellplm.module.CellPLMModule`.
    n_input
        Genes of the head: the columns of its input counts, perturbations and predictions.
    gene_index
        ``(n_input,)`` vocabulary row of each of those genes (-1: not in the vocabulary);
        ``None``: they are the backbone's vocabulary.
    n_head_hidden
        Hidden width of the head.
    dropout
        Dropout of the head.
    zero_perturbed_genes
        Set the input counts of the perturbed genes to zero.
    baseline
        ``(n_input,)`` initial output bias (default zeros).
    """

    def __init__(
        self,
        backbone: CellPLMModule,
        n_input: int | None = None,
        *,
        gene_index: torch.Tensor | None = None,
        n_head_hidden: int = 256,
        dropout: float = 0.1,
        zero_perturbed_genes: bool = True,
        baseline: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.zero_perturbed_genes = zero_perturbed_genes
        n_input = backbone.n_genes if n_input is None else n_input
        if gene_index is not None:
            gene_index = torch.as_tensor(gene_index, dtype=torch.long)
            if gene_index.shape != (n_input,) or int(gene_index.max()) >= backbone.n_genes:
                raise InputDataError("`gene_index` must hold one vocabulary row (or -1) per head gene.")
        self.register_buffer("gene_index", gene_index)
        n_hidden = backbone.embedder.gene_table.shape[1]
        self.perturbation_table = nn.Parameter(torch.zeros(n_input, n_hidden))
        # normalised gene vectors, so the projection starts at the scale of the cell tokens
        self.gene_projection = nn.Sequential(nn.LayerNorm(n_hidden), nn.Linear(n_hidden, n_hidden, bias=False))
        self.head = nn.Sequential(
            nn.Linear(2 * n_hidden, n_head_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(n_head_hidden, n_input),
        )
        nn.init.zeros_(self.head[-1].weight)
        with torch.no_grad():
            self.head[-1].bias.copy_(torch.zeros(n_input) if baseline is None else torch.as_tensor(baseline))

    @property
    def n_latent(self) -> int:
        return self.backbone.n_latent

    @property
    def positional_encoding(self) -> str:
        return self.backbone.positional_encoding

    def perturbation_vectors(self) -> torch.Tensor:
        """``(n_input, n_hidden)``: the embedding of perturbing each input gene."""
        genes = self.backbone.embedder.table_for(self.gene_index)
        return self.perturbation_table + self.gene_projection(genes)

    def _get_inference_input(self, tensors: dict) -> dict:
        return {
            MODULE_KEYS.X_KEY: tensors[REGISTRY_KEYS.X_KEY],
            MODULE_KEYS.SENTENCE_KEY: tensors[DATA_KEYS.SENTENCE_KEY],
            MODULE_KEYS.PERTURBATION_KEY: tensors[DATA_KEYS.PERTURBATION_KEY],
            MODULE_KEYS.COORDS_KEY: tensors.get(REGISTRY_KEYS.SPATIAL_KEY),
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {
            MODULE_KEYS.HIDDEN_KEY: inference_outputs[MODULE_KEYS.HIDDEN_KEY],
            MODULE_KEYS.PERTURBATION_EMBEDDING_KEY: inference_outputs[MODULE_KEYS.PERTURBATION_EMBEDDING_KEY],
        }

    @auto_move_data
    def inference(self, x, sentence, perturbation, coords=None, input_mask=None) -> dict:
        """Contextualised tokens of the perturbed control cells.

        ``perturbation`` is ``(n_cells, n_input)``: 1 for each gene perturbed in that cell.
        """
        perturbation = dense(perturbation).to(self.perturbation_table.dtype)
        x = dense(x)
        if self.zero_perturbed_genes:
            x = x * (perturbation <= 0)
        offset = perturbation @ self.perturbation_vectors()
        h = self.backbone.embed(x, sentence.view(-1).long(), coords, input_mask, token_offset=offset,
                                gene_index=self.gene_index)
        return {MODULE_KEYS.HIDDEN_KEY: h, MODULE_KEYS.PERTURBATION_EMBEDDING_KEY: offset}

    @auto_move_data
    def generative(self, h: torch.Tensor, perturbation_embedding: torch.Tensor) -> dict:
        """Predicted ``log1p`` normalised expression ``(n_cells, n_input)``."""
        return {MODULE_KEYS.PREDICTION_KEY: self.head(torch.cat([h, perturbation_embedding], dim=-1))}

    def loss(self, tensors, inference_outputs, generative_outputs, **kwargs) -> LossOutput:
        """Mean squared error to the post-perturbation expression (mean over genes and cells)."""
        prediction = generative_outputs[MODULE_KEYS.PREDICTION_KEY]
        target = dense(tensors[DATA_KEYS.TARGET_KEY]).to(prediction.dtype)
        mse = ((prediction - target) ** 2).mean()
        zero = torch.zeros(1, device=prediction.device)
        return LossOutput(loss=mse, reconstruction_loss=mse.expand(1), kl_local=zero,
                          extra_metrics={"mse": mse.detach()})

    @torch.inference_mode()
    def sample(self, *args, **kwargs):
        raise NotImplementedError("The perturbation head predicts means; it has no sampler.")
