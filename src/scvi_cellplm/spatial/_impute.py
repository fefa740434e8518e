"""Spatial gene imputation with an scRNA-seq reference, through one joint CellPLM.

A workflow above the model: it builds, trains and queries one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._constants import COLUMNS
from .._exceptions import GeneAlignmentError, InputDataError
from ..model import CellPLM
from ..model._setup import check_obs_keys, check_spatial

logger = logging.getLogger(__name__)

DATASET_COLUMN = COLUMNS.DATASET
SAMPLE_COLUMN = COLUMNS.SAMPLE


def joint_anndata(
    spatial: AnnData,
    reference: AnnData,
    *,
    layer: str | None = None,
    spatial_key: str = "spatial",
    sample_key: str | None = None,
    reference_sample_key: str | None = None,
    rescale: Literal["none", "percentile", "quantile"] | bool = "none",
) -> AnnData:
    """Concatenate a spatial panel and a reference over the union of their genes.

    Unmeasured genes are zeros, ``obs['_cellplm_dataset']`` says which dataset each cell comes
    from (so the model masks unmeasured genes out of its loss), ``obs['_cellplm_sample']`` gives
    the sentences (spatial samples by ``sample_key``; the reference by ``reference_sample_key``),
    and reference cells have NaN coordinates. The inputs are not modified.

    ``rescale`` is for normalised, non-count values measured on different scales (e.g. in-situ
    intensities next to log-normalised scRNA-seq): ``"percentile"`` divides each gene by its 99th
    percentile within each dataset; ``"quantile"`` does that for the reference and then maps each
    spatial gene the reference also measured onto the reference's distribution of that gene
    (quantile normalisation), so the two datasets' inputs are comparable and the model embeds them
    into one latent space. ``"none"`` (counts) keeps the values.
    """
    if rescale is True:
        rescale = "percentile"
    if rescale is False:
        rescale = "none"
    if rescale not in ("none", "percentile", "quantile"):
        raise InputDataError(f"`rescale` must be 'none', 'percentile' or 'quantile', got {rescale!r}.")
    check_spatial(spatial, spatial_key)  # the user's coordinates: named key, shape, usable values
    check_obs_keys(spatial, sample_key=sample_key)
    check_obs_keys(reference, reference_sample_key=reference_sample_key)
    for name, adata in (("spatial", spatial), ("reference", reference)):
        if layer is not None and layer not in adata.layers:
            raise InputDataError(f"`layer={layer!r}` is not a layer of the {name} data ({list(adata.layers)}).")

    def _values(adata) -> sparse.csr_matrix:
        x = sparse.csr_matrix(adata.X if layer is None else adata.layers[layer], dtype=np.float32)
        return _percentile_scaled(x) if rescale != "none" else x

    ref_x = _values(reference)
    sp_x = _values(spatial)
    if rescale == "quantile":
        sp_x = _quantile_matched(sp_x, spatial.var_names, ref_x, reference.var_names)

    def _part(adata, x, name, key, coords):
        part = AnnData(x, obs=pd.DataFrame(index=adata.obs_names),
                       var=pd.DataFrame(index=adata.var_names))
        part.obs[DATASET_COLUMN] = name
        part.obs[SAMPLE_COLUMN] = (
            name if key is None else name + ":" + adata.obs[key].astype(str).to_numpy()
        )
        part.obsm[spatial_key] = coords
        return part

    coords = np.asarray(spatial.obsm[spatial_key], dtype=np.float64)
    sp = _part(spatial, sp_x, "spatial", sample_key, coords)
    ref = _part(reference, ref_x, "reference", reference_sample_key,
                np.full((reference.n_obs, coords.shape[1]), np.nan))
    joint = ad.concat([sp, ref], join="outer", fill_value=0, index_unique="-", keys=["spatial", "reference"])
    joint.obs[DATASET_COLUMN] = pd.Categorical(joint.obs[DATASET_COLUMN])
    joint.obs[SAMPLE_COLUMN] = pd.Categorical(joint.obs[SAMPLE_COLUMN])
    joint.X = sparse.csr_matrix(joint.X)
    return joint


def _percentile_scaled(x: sparse.csr_matrix) -> sparse.csr_matrix:
    """Each gene divided by its 99th percentile (its maximum when that is 0)."""
    dense = x.toarray()
    top = np.percentile(dense, 99, axis=0)
    top = np.where(top > 0, top, dense.max(axis=0))
    return sparse.csr_matrix(dense / np.where(top > 0, top, 1.0))


def _quantile_matched(x: sparse.csr_matrix, genes, ref: sparse.csr_matrix, ref_genes) -> sparse.csr_matrix:
    """Map each column of ``x`` onto the distribution of the same gene in ``ref`` (by rank)."""
    from scipy.stats import rankdata

    dense = x.toarray()
    ref_pos = pd.Index(ref_genes).get_indexer(genes)
    n = dense.shape[0]
    for j in np.flatnonzero(ref_pos >= 0):
        target = np.sort(ref[:, ref_pos[j]].toarray().ravel())
        quantile = (rankdata(dense[:, j]) - 0.5) / n  # ties share their mean rank
        dense[:, j] = np.interp(quantile, (np.arange(len(target)) + 0.5) / len(target), target)
    return sparse.csr_matrix(dense)


def impute_genes(
    spatial: AnnData,
    reference: AnnData,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    spatial_key: str = "spatial",
    sample_key: str | None = None,
    reference_sample_key: str | None = None,
    gene_likelihood: Literal["nb", "gaussian"] = "nb",
    positional_encoding: Literal["sinusoidal", "learned", "none"] = "none",
    n_spatial_neighbors: int = 8,
    max_epochs: int = 100,
    key_added: str | None = "cellplm_imputed",
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
):
    """Predict genes a spatial panel did not measure, from a reference of the same tissue.

    Trains one CellPLM on the spatial cells (with their positions) and the reference cells
    (without) together; unmeasured genes are masked out of the loss, never treated as zeros.

    Parameters
    ----------
    spatial
        Spatial data (gene panel) with coordinates in ``obsm[spatial_key]``.
    reference
        scRNA-seq (or other dissociated) data of the same tissue with more genes.
    genes
        Genes to predict (default: reference genes not in the panel).
    layer
        Layer of both inputs holding the values (default ``.X``).
    spatial_key, sample_key, reference_sample_key
        Coordinates key; obs keys of the spatial samples (sections/FOVs) and reference samples.
    gene_likelihood
        ``"nb"`` for raw counts, ``"gaussian"`` for normalised values.
    positional_encoding
        Encoding of the spatial coordinates. Default ``"none"``: on both benchmark datasets an
        encoding that only the spatial cells carry lowered the imputation.
    n_spatial_neighbors
        Neighbourhood layer (see :class:`~scvi_cellplm.CellPLM`): each spatial cell's expression
        embedding is averaged, with learned weights, with its ``k`` nearest cells'; reference
        cells keep their own. The default (8) was the best CellPLM setting on the Drosophila
        in-situ benchmark and level with ``0`` on MERFISH (a cell line, where position adds
        nothing to a cell's own panel); ``0``: no such layer (no use of positions at all with
        ``"none"`` above).
    max_epochs
        Training epochs.
    key_added
        Also store the result in ``spatial.obsm[key_added]`` (``None``: do not).
    model_kwargs, train_kwargs
        Passed to :class:`~scvi_cellplm.CellPLM` and its ``train``, over the defaults measured
        in ``benchmarks/spatial_imputation.py``: a plain VAE latent, sentences of at most 500
        cells, centred input (``center_input=True``: dense panels collapse without it), KL weight
        0.01 and, with a positional encoding, coordinates hidden from half of the training
        sentences (``drop_position_rate=0.5``) so spatial and reference cells share one latent
        space.

    Returns
    -------
    The imputed values (DataFrame: spatial cells x genes) and the trained model. For the
    Gaussian likelihood, values are on the reference's scale (each gene in units of its 99th
    percentile in the reference), since the spatial values are quantile-matched to it.
    """
    if genes is None:
        genes = [g for g in reference.var_names if g not in set(spatial.var_names)]
    missing = [g for g in genes if g not in set(reference.var_names) | set(spatial.var_names)]
    if missing:
        raise GeneAlignmentError(
            f"Genes in neither dataset: {missing[:5]}; pass `genes=` measured by the reference or the "
            "spatial data."
        )
    joint = joint_anndata(spatial, reference, layer=layer, spatial_key=spatial_key,
                          sample_key=sample_key, reference_sample_key=reference_sample_key,
                          rescale="quantile" if gene_likelihood == "gaussian" else "none")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cells have NaN/inf")
        warnings.filterwarnings("ignore", message=".*non-integer values.*")
        CellPLM.setup_anndata(joint, sample_key=SAMPLE_COLUMN, dataset_key=DATASET_COLUMN,
                              spatial_key=spatial_key)
    # centred input: panels are dense (every gene in every cell), where the uncentred embedding
    # collapses all cells onto one token and the imputation onto the mean profile
    # every gene of the panel and the reference stays in the vocabulary (no n_top_genes selection):
    # the genes to impute are read from the reference
    model_kwargs = {"latent_distribution": "vae", "max_cells_per_batch": 500, "center_input": True,
                    "n_top_genes": None, **(model_kwargs or {})}
    model = CellPLM(joint, gene_likelihood=gene_likelihood, positional_encoding=positional_encoding,
                    n_spatial_neighbors=n_spatial_neighbors, **model_kwargs)
    train_kwargs = {"enable_progress_bar": False, **(train_kwargs or {})}
    train_kwargs["plan_kwargs"] = {
        "max_kl_weight": 0.01,
        "drop_position_rate": 0.0 if positional_encoding == "none" else 0.5,
        **train_kwargs.get("plan_kwargs", {}),
    }
    # imputation was validated on the model's own windows (benchmarks/spatial_imputation.py)
    train_kwargs = {"max_cells_per_batch": model.max_cells_per_batch, "train_sentences": "windows",
                    **train_kwargs}
    model.train(max_epochs=max_epochs, **train_kwargs)
    is_spatial = np.flatnonzero(joint.obs[DATASET_COLUMN].to_numpy() == "spatial")
    # decode as the reference: the dataset whose decoder learned the genes the panel lacks
    result = model.impute(joint, genes=list(genes), indices=is_spatial, transform_dataset="reference")
    result.index = spatial.obs_names
    if key_added is not None:
        spatial.obsm[key_added] = result
    return result, model
