"""CellPLM backbone + classification head, for cell-type annotation by fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from .._constants import MODULE_KEYS, REGISTRY_KEYS
from ._module import CellPLMModule


class CellPLMClassifierModule(BaseModuleClass):
    """Predict labels from CellPLM embeddings; the backbone can be frozen or fine-tuned.

    Parameters
    ----------
    backbone
        A (pretrained) :class:`~scvi_cellplm.module.CellPLMModule`.
    n_labels
        Number of label categories (without the unlabelled one).
    n_head_hidden
        Width of the head's hidden layer.
    dropout
        Dropout of the head.
    freeze_backbone
        Train the head only (the backbone's weights never change).
    unlabeled_code
        Label code of unlabelled cells (excluded from the loss), or -1 for none.
    class_weights
        Weight of each label in the cross-entropy (``None``: all 1). Used in training only, so
        not saved with the weights.
    """

    def __init__(
        self,
        backbone: CellPLMModule,
        n_labels: int,
        *,
        n_head_hidden: int = 128,
        dropout: float = 0.1,
        freeze_backbone: bool = False,
        unlabeled_code: int = -1,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.backbone = backbone
        self.n_labels = n_labels
        self.unlabeled_code = unlabeled_code
        self.freeze_backbone = freeze_backbone
        self.head = nn.Sequential(
            nn.Linear(backbone.n_latent, n_head_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(n_head_hidden, n_labels),
        )
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    @property
    def n_latent(self) -> int:
        return self.backbone.n_latent

    @property
    def positional_encoding(self) -> str:
        return self.backbone.positional_encoding

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone stays deterministic (no dropout)
            self.backbone.eval()
        return self

    def _get_inference_input(self, tensors: dict) -> dict:
        return self.backbone._get_inference_input(tensors)

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {MODULE_KEYS.Z_KEY: inference_outputs[MODULE_KEYS.QZM_KEY]}

    @auto_move_data
    def inference(self, x, sentence, coords=None, input_mask=None, sample=None, gene_index=None) -> dict:
        """Backbone inference (posterior mean used for classification)."""
        return self.backbone.inference(x, sentence, coords, input_mask=input_mask, sample=False,
                                       gene_index=gene_index)

    @auto_move_data
    def generative(self, z: torch.Tensor) -> dict:
        """Class logits from the embedding."""
        return {MODULE_KEYS.LOGITS_KEY: self.head(z)}

    def loss(self, tensors, inference_outputs, generative_outputs, **kwargs) -> LossOutput:
        """Cross-entropy on labelled cells."""
        logits = generative_outputs[MODULE_KEYS.LOGITS_KEY]
        labels = tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long()
        labelled = labels != self.unlabeled_code
        if labelled.any():
            ce = F.cross_entropy(logits[labelled], labels[labelled], weight=self.class_weights)
            accuracy = (logits[labelled].argmax(1) == labels[labelled]).float().mean()
        else:
            ce = logits.sum() * 0.0
            accuracy = torch.tensor(float("nan"))
        zero = torch.zeros(1, device=logits.device)
        return LossOutput(
            loss=ce,
            reconstruction_loss=zero,
            kl_local=zero,
            extra_metrics={"classification_loss": ce.detach(), "accuracy": accuracy},
        )

    @torch.inference_mode()
    def sample(self, *args, **kwargs):
        raise NotImplementedError("The classifier has no generative model to sample from.")
