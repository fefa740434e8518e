"""Weight transfer: build a model like another's and copy its backbone (the one place that does).

Used by query mapping (:meth:`CellPLM.load_query_data <scvi_cellplm.CellPLM.load_query_data>`),
both heads (``from_cellplm_model``), pretrained loading, official checkpoints and
:meth:`load <scvi_cellplm.CellPLM.load>`. Data-specific buffers (which dataset measured which
gene, and the per-dataset column index of models saved before the vocabulary contract) are never
copied: the receiving model computes its own from its data.
"""

from __future__ import annotations

import torch

from .._constants import COVARIATES
from .._exceptions import CheckpointError

DATA_BUFFERS = frozenset({"dataset_gene_mask", "gene_index"})
"""Backbone buffers derived from a model's data, not learned: never transferred."""
HEAD_KEYS = frozenset({"n_head_hidden", "freeze_encoder", "class_balance", "zero_perturbed_genes",
                       "target_sum", "training_perturbations", "label_categories", "head_genes"})
"""Constructor arguments of the heads, not of the backbone."""
_TABLES = {COVARIATES.BATCH: "n_batch_embeddings", COVARIATES.DATASET: "n_dataset_embeddings"}


def backbone_of(module: torch.nn.Module) -> torch.nn.Module:
    """Return the :class:`~scvi_cellplm.module.CellPLMModule` of a model's module (a head's backbone)."""
    return getattr(module, "backbone", module)


def backbone_prefix(module: torch.nn.Module) -> str:
    """State-dict prefix of the backbone within ``module``."""
    return "backbone." if hasattr(module, "backbone") else ""


def table_sizes(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, int]:
    """Rows of the decoder's batch and dataset embedding tables in a (backbone) state dict."""
    sizes = {}
    for cov, kwarg in _TABLES.items():
        key = f"{prefix}decoder.covariates.0.{cov}.embedding.weight"
        if key in state:
            sizes[kwarg] = int(state[key].shape[0])
    return sizes


def backbone_kwargs(model, **overrides) -> dict:
    """Keyword arguments that build ``model``'s backbone again, on any AnnData.

    The gene vocabulary and the decoder's table sizes are the model's (not the new data's), so
    the new module holds exactly the weights of the old one.
    """
    kwargs = {k: v for k, v in model.backbone_kwargs_.items() if k not in HEAD_KEYS}
    kwargs["gene_vocabulary"] = list(model.gene_vocabulary)
    module = model.module
    kwargs.update(table_sizes(module.state_dict(), backbone_prefix(module)))
    return {**kwargs, **overrides}


def copy_backbone(
    state: dict[str, torch.Tensor],
    module: torch.nn.Module,
    *,
    prefix: str | None = None,
    allow_missing: tuple[str, ...] = (),
) -> list[str]:
    """Copy backbone weights ``state`` (backbone keys) into ``module``'s backbone.

    Data buffers are skipped. An embedding table of the target with more rows than the source's
    (new batches of a query) gets the source rows first; its new rows keep their initial values.
    Keys missing from ``state`` are an error unless they start with one of ``allow_missing``
    (parts the source does not have, e.g. a new positional encoding).

    Returns
    -------
    The keys of grown tables.

    Raises
    ------
    ~scvi_cellplm.CheckpointError
        Unexpected, missing or mis-shaped weights, listed.
    """
    prefix = backbone_prefix(module) if prefix is None else prefix
    target = {k[len(prefix):]: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    out, grown, unexpected, shapes = {}, [], [], []
    for key, value in state.items():
        if key in DATA_BUFFERS:
            continue
        if key not in target:
            unexpected.append(key)
        elif target[key].shape == value.shape:
            out[key] = value
        elif key.endswith("embedding.weight") and value.shape[1:] == target[key].shape[1:] \
                and value.shape[0] < target[key].shape[0]:
            table = target[key].clone()
            table[: value.shape[0]] = value
            out[key], grown = table, [*grown, key]
        else:
            shapes.append(f"{key}: {tuple(value.shape)} vs {tuple(target[key].shape)}")
    missing = [k for k in target if k not in out and k not in DATA_BUFFERS
               and not k.startswith(allow_missing)]
    if unexpected or missing or shapes:
        raise CheckpointError(
            f"The weights do not fit the model: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}, {len(shapes)} of another shape "
            f"{shapes[:5]}."
        )
    module.load_state_dict({prefix + k: v for k, v in out.items()}, strict=False)
    return grown


def build_like(cls, adata, kwargs: dict, state: dict[str, torch.Tensor], **head_kwargs):
    """``cls(adata, **kwargs, **head_kwargs)`` with its backbone weights copied from ``state``."""
    model = cls(adata, **kwargs, **head_kwargs)
    copy_backbone(state, model.module)
    return model


def transfer(cls, adata, source, overrides: dict | None = None, **head_kwargs):
    """Build a ``cls`` model on ``adata`` whose backbone starts from ``source``'s (a trained model)."""
    backbone = backbone_of(source.module)
    return build_like(cls, adata, backbone_kwargs(source, **(overrides or {})), backbone.state_dict(),
                      **head_kwargs)
