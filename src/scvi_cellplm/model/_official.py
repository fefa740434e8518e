"""Official CellPLM checkpoints: build a model from an official pair, write one back."""

from __future__ import annotations

import logging

from anndata import AnnData

from ..io._official import (
    CONFIG_SUFFIX,
    WEIGHTS_SUFFIX,
    config_to_kwargs,
    official_to_ours,
    read_official_config,
    read_official_weights,
    to_official,
)
from ._transfer import copy_backbone

logger = logging.getLogger(__name__)


class OfficialCheckpointMixin:
    """``from_official`` / ``to_official`` (the official JSON config is translated in ``io``)."""

    @classmethod
    def from_official(cls, prefix: str, adata: AnnData, **kwargs):
        """Load an official CellPLM checkpoint pair ``PREFIX.config.json`` + ``PREFIX.best.ckpt``.

        The official configuration is translated into keyword arguments of this class, and every
        official weight is mapped, with its shape checked, onto the new model. Weights are read with
        ``torch.load(weights_only=True)``. Embeddings equal the official package's to 1e-5.

        Parameters
        ----------
        prefix
            Path prefix of the pair, e.g. ``"ckpt/20231027_85M"``.
        adata
            AnnData registered with :meth:`setup_anndata` (raw counts). Its genes (Ensembl ids, or
            symbols mapped offline) are aligned to the checkpoint's gene vocabulary.
        **kwargs
            Replace translated keyword arguments, e.g. ``positional_encoding="sinusoidal"`` (a
            new, untrained encoding to fine-tune) or ``max_cells_per_batch``. By default a sample
            of up to ``OFFICIAL_SENTENCE_CELLS`` (100,000) cells is one sentence, as in the
            official ``predict``; larger samples are windowed (logged).

        Returns
        -------
        The loaded model, marked as trained.

        Raises
        ------
        ~scvi_cellplm.CheckpointError
            Missing, unreadable, unsafe or mismatching files, or an unsupported configuration.
        """
        config = read_official_config(prefix + CONFIG_SUFFIX)
        kwargs = {**config_to_kwargs(config), **kwargs}
        state = read_official_weights(prefix + WEIGHTS_SUFFIX)
        model = cls(adata, **kwargs)
        copy_backbone(official_to_ours(state, model.module), model.module,
                      allow_missing=("pos_encoder.", "neighbourhood."))  # new, untrained parts
        model.module.eval()
        model.is_trained_ = True
        model.official_config = {k: v for k, v in config.items() if k != "gene_list"}
        logger.info("Loaded official checkpoint %s (%s).", prefix, config.get("name", "unnamed"))
        return model

    def to_official(self, prefix: str) -> None:
        """Write this model as an official checkpoint pair ``PREFIX.config.json`` + ``PREFIX.best.ckpt``.

        The official package loads the pair and computes the same embeddings. Only models with
        ``attention="flowformer"`` and ``positional_encoding="none"`` can be written (the official
        format has no other choice); others raise :class:`~scvi_cellplm.CheckpointError`.

        Parameters
        ----------
        prefix
            Path prefix of the two files (missing folders are created).
        """
        to_official(self, prefix)
