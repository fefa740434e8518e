"""Registration of AnnData for CellPLM models: fields and the checks that refuse bad input early."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scvi.data import AnnDataManager, fields

from .._constants import MAX_COORDINATE, REGISTRY_KEYS, UNLABELED
from .._exceptions import InputDataError
from ..data._graph import usable_coordinates


class GeneLayerField(fields.LayerField):
    """scvi-tools' count layer, transferable to data with other genes.

    scvi-tools refuses to transfer a setup to data with another number of genes: its models read
    genes by position. A CellPLM model matches genes by identifier when it reads the data (see
    :func:`~scvi_cellplm.data.align_to_vocabulary`), so any genes transfer.
    """

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Register the layer of ``adata_target`` whatever its genes."""
        fields.BaseAnnDataField.transfer_field(self, state_registry, adata_target, **kwargs)
        return self.register_field(adata_target)


MuDataGeneLayerField = fields.MuDataWrapper(GeneLayerField)


class LabelsField(fields.CategoricalObsField):
    """scvi-tools' categorical labels, transferable to data without a labels column.

    With ``allow_missing_labels`` (query data, inference), a missing column is filled with
    ``UNLABELED`` (as scvi-tools' ``LabelsWithUnlabeledObsField`` fills its unlabelled category):
    CellPLM's encoder never reads labels, so their absence must not block a new dataset.
    """

    def transfer_field(self, state_registry: dict, adata_target: AnnData,
                       allow_missing_labels: bool = False, **kwargs) -> dict:
        """Transfer the labels, filling a missing column when allowed."""
        key = self._original_attr_key
        if allow_missing_labels and key is not None and key not in adata_target.obs:
            warnings.warn(f"Missing labels key {key!r}: filled with {UNLABELED!r}.", UserWarning,
                          stacklevel=2)
            adata_target.obs[key] = pd.Categorical([UNLABELED] * adata_target.n_obs)
        return super().transfer_field(state_registry, adata_target, **kwargs)


def anndata_fields(
    adata: AnnData,
    layer: str | None,
    batch_key: str | None,
    sample_key: str | None,
    labels_field,
    spatial_key: str | None = None,
    dataset_key: str | None = None,
) -> list:
    """Validate the inputs and build the registry fields shared by CellPLM models."""
    check_obs_keys(adata, batch_key=batch_key, sample_key=sample_key, dataset_key=dataset_key)
    check_counts(adata, layer)
    anndata_fields = [
        GeneLayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
        fields.CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        fields.CategoricalObsField(REGISTRY_KEYS.SAMPLE_KEY, sample_key or batch_key),
        labels_field,
    ]
    if dataset_key is not None:
        anndata_fields.append(fields.CategoricalObsField(REGISTRY_KEYS.DATASET_KEY, dataset_key))
    if spatial_key is not None:
        check_spatial(adata, spatial_key)
        anndata_fields.append(fields.ObsmField(REGISTRY_KEYS.SPATIAL_KEY, spatial_key))
    return anndata_fields


def looks_like_counts(adata_manager: AnnDataManager, max_rows: int = 20_000) -> bool:
    x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    x = x[: min(max_rows, x.shape[0])]
    values = x.data if sparse.issparse(x) else np.asarray(x)
    return all(_is_integral(v) for v in _value_chunks(values))


VALUE_CHUNK = 1 << 20
"""Values checked at a time by the input checks (bounded float64 temporaries)."""


def _value_chunks(values: np.ndarray):
    values = values.reshape(-1)
    for start in range(0, len(values), VALUE_CHUNK):
        yield values[start : start + VALUE_CHUNK].astype(np.float64, copy=False)


def _is_integral(values: np.ndarray) -> bool:
    return bool(np.allclose(values, np.round(values)))


def check_obs_keys(adata: AnnData, **keys: str | None) -> None:
    for name, key in keys.items():
        if key is None:
            continue
        if key not in adata.obs:
            raise InputDataError(
                f"`{name}={key!r}` is not a column of adata.obs (columns: {list(adata.obs.columns)})."
            )
        n_missing = int(adata.obs[key].isna().sum())
        if n_missing:
            raise InputDataError(
                f"adata.obs[{key!r}] (`{name}`) has {n_missing} missing values; fill them, e.g. "
                f"`adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).fillna('unknown')`."
            )


def check_counts(adata: AnnData, layer: str | None, max_rows: int = 20_000) -> None:
    """Refuse what no count model can use (empty data, NaN/inf, negatives); warn on non-counts.

    Backed data is checked on its first ``max_rows`` rows.
    """
    if adata.is_view:
        raise InputDataError(
            "setup_anndata needs an actual AnnData, not a view: run `adata = adata.copy()` first."
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputDataError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        raise InputDataError(f"`layer={layer!r}` is not in adata.layers ({list(adata.layers)}).")
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise InputDataError(f"{where} is empty (None); pass `layer=` with raw counts.")
    if adata.isbacked or not hasattr(x, "dtype"):
        x = x[: min(max_rows, adata.n_obs)]
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if not np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_:
        raise InputDataError(f"{where} has dtype {values.dtype}; raw counts (numbers) are needed.")
    n_bad, minimum, integral = 0, np.inf, True
    for chunk in _value_chunks(values):  # chunked: no float64 copy of the whole matrix
        n_bad += int((~np.isfinite(chunk)).sum())
        if not n_bad and len(chunk):
            minimum = min(minimum, float(chunk.min()))
            integral = integral and _is_integral(chunk)
    if n_bad:
        raise InputDataError(
            f"{where} contains {n_bad} NaN/inf values; CellPLM needs finite raw counts. "
            "Fix or drop those cells/genes (e.g. `adata = adata[np.isfinite(...)]`) first."
        )
    if minimum < 0:
        raise InputDataError(
            f"{where} contains negative values ({minimum:.3g}): it looks scaled or "
            "centred, not raw counts. Pass the raw counts with `layer='counts'`."
        )
    if not integral:
        warnings.warn(
            f"{where} holds non-integer values: it looks normalised or log-transformed. "
            "CellPLM's negative-binomial model expects raw counts: pass them with `layer=...`.",
            UserWarning,
            stacklevel=3,
        )


def check_spatial(adata: AnnData, spatial_key: str) -> None:
    if spatial_key not in adata.obsm:
        raise InputDataError(
            f"`spatial_key={spatial_key!r}` is not in adata.obsm (keys: {list(adata.obsm.keys())})."
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise InputDataError(
            f"adata.obsm[{spatial_key!r}] must have 2 or 3 columns (x, y[, z]); got shape "
            f"{coords.shape}."
        )
    if not np.issubdtype(coords.dtype, np.number) or np.issubdtype(coords.dtype, np.complexfloating):
        raise InputDataError(f"adata.obsm[{spatial_key!r}] must be real numbers, got {coords.dtype}.")
    missing = ~usable_coordinates(coords)
    if missing.all():
        raise InputDataError(
            f"adata.obsm[{spatial_key!r}] has no usable coordinates (all NaN/inf or above "
            f"{MAX_COORDINATE:g} in absolute value); pass real positions or no `spatial_key`."
        )
    if missing.any():
        warnings.warn(
            f"{int(missing.sum())} cells have NaN/inf or out-of-range (|value| > {MAX_COORDINATE:g}) "
            f"coordinates in adata.obsm[{spatial_key!r}]; they get the learned 'missing position' "
            "encoding and no spatial neighbours.",
            UserWarning,
            stacklevel=3,
        )
