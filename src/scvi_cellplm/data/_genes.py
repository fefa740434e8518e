"""The gene-vocabulary contract at the data boundary: registered gene ids, matched by identity.

A model's genes are its vocabulary (Ensembl ids where known, symbols otherwise). Any AnnData's
columns are matched to it by identifier through :func:`~scvi_cellplm.io.align_genes` (offline
symbol ↔ Ensembl tables), never by position: vocabulary genes the data lacks are unmeasured (they
enter neither the embedding nor the loss), extra genes are dropped.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from mudata import MuData

from ..io._genes import GeneAlignment, align_genes

logger = logging.getLogger(__name__)


def registered_var(adata_manager) -> pd.DataFrame:
    """Return the ``var`` of the registered counts (the RNA modality of a MuData)."""
    adata = adata_manager.adata
    if isinstance(adata, MuData):
        mod = adata_manager.registry["setup_args"]["modalities"]["rna_layer"]
        return adata[mod].var
    return adata.var


def registered_gene_ids(adata_manager) -> list[str]:
    """Gene ids of the registered columns: ``var[gene_id_key]``, else ``var_names``."""
    var = registered_var(adata_manager)
    key = adata_manager.registry["setup_args"].get("gene_id_key")
    ids = var.index if key is None else var[key]
    return [str(g) for g in ids]


def align_to_vocabulary(adata_manager, vocabulary: list[str]) -> GeneAlignment:
    """Match the registered columns of ``adata_manager`` to ``vocabulary`` by identifier.

    Identical ids in the same order give the identity alignment (``index`` is ``None``-free but
    :attr:`GeneAlignment.is_identity` is true). The overlap is logged, with a warning when the
    data measures little of the vocabulary and a :class:`~scvi_cellplm.GeneAlignmentError` when
    nothing matches (see :func:`~scvi_cellplm.io.align_genes`).
    """
    ids = registered_gene_ids(adata_manager)
    if ids == list(vocabulary):
        return GeneAlignment(index=np.arange(len(ids)), n_direct=len(ids), n_symbol=0,
                             n_vocabulary=len(ids))
    return align_genes(ids, vocabulary)
