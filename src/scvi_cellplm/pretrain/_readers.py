"""Where a corpus dataset's counts live: one *source* per storage format, one row reader each.

A source reads a dataset's metadata (number of cells, gene ids, a few obs columns) without its
counts, and makes a *row reader*: ``reader.read(rows, n_cols)`` returns the sorted ``rows`` of the
dataset's count matrix as CSR over the dataset's own genes. Readers are picklable and open their
files lazily in each process (DataLoader workers, DDP ranks), so the corpus, the sampler and the
loader are the same code whatever the format. Formats here: backed ``.h5ad`` (h5py), zarr AnnData
stores and annbatch collections (zarr), in-memory AnnData; TileDB-SOMA experiments are in
``_soma.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._exceptions import InputDataError

READ_GAP = 1 << 16
"""Row runs of a file closer than this many stored entries are read in one call."""

ANNBATCH_ENCODING = "annbatch-preshuffled"
_MEMBER = re.compile(r"dataset_(\d+)$")


# ---------------------------------------------------------------------------------- readers
class _StoreRows:
    """Rows of a CSR (or dense) matrix in an ``.h5ad`` file or a zarr AnnData store, opened lazily."""

    def __init__(self, path: str, layer: str | None, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.key = "X" if layer is None else f"layers/{layer}"
        self._pid = None
        self._elem = self._indptr = self._data = self._indices = None

    def __getstate__(self) -> dict:  # file handles never cross processes
        return {"path": self.path, "fmt": self.fmt, "key": self.key, "_pid": None, "_elem": None,
                "_indptr": None, "_data": None, "_indices": None}

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        elem = _open_store(self.path, self.fmt)[self.key]
        self._pid, self._elem, self._indptr = os.getpid(), elem, None
        if hasattr(elem, "keys"):  # a group: a sparse matrix
            kind = elem.attrs.get("encoding-type", "")
            if kind != "csr_matrix":
                raise InputDataError(
                    f"{self.path}: {self.key} is stored as {kind or 'an unknown group'}; streaming reads "
                    "rows, so store it as CSR: `adata.X = scipy.sparse.csr_matrix(adata.X)` and write "
                    "it again."
                )
            self._indptr = np.asarray(elem["indptr"][:], dtype=np.int64)
            self._data, self._indices = elem["data"], elem["indices"]

    def read(self, rows: np.ndarray, n_cols: int) -> sparse.csr_matrix:
        """``rows`` (sorted, unique) as a CSR matrix; an unreadable store is an InputDataError naming it."""
        try:
            self._open()
            if self._indptr is None:  # dense on disk
                dense = self._elem[rows] if self.fmt == "h5ad" else self._elem.oindex[rows]
                return sparse.csr_matrix(np.asarray(dense, dtype=np.float32))
            return _read_csr(self._indptr, self._data, self._indices, rows, n_cols)
        except InputDataError:
            raise
        except (OSError, KeyError, ValueError) as err:
            raise InputDataError(
                f"{self.path}: cannot read its {self.key} (truncated or corrupted?): {err}. Write it "
                "again or leave it out of the corpus."
            ) from err


def _read_csr(indptr, data_arr, indices_arr, rows: np.ndarray, n_cols: int) -> sparse.csr_matrix:
    """Read ``rows`` of an on-disk CSR matrix as a few slices of its ``data`` and ``indices``."""
    starts, stops = indptr[rows], indptr[rows + 1]
    lengths = stops - starts
    # group rows into blocks whose stored entries are close, one read per block
    cut = np.flatnonzero(starts[1:] - stops[:-1] > READ_GAP) + 1
    data, indices = [], []
    for block in np.split(np.arange(len(rows)), cut):
        if not len(block):
            continue
        lo, hi = int(starts[block[0]]), int(stops[block[-1]])
        take = _ranges(starts[block] - lo, lengths[block])
        data.append(np.asarray(data_arr[lo:hi])[take])
        indices.append(np.asarray(indices_arr[lo:hi])[take])
    out_indptr = np.concatenate([[0], np.cumsum(lengths)])
    data = np.concatenate(data) if data else np.zeros(0, np.float32)
    indices = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    return sparse.csr_matrix(
        (data.astype(np.float32, copy=False), indices, out_indptr), shape=(len(rows), n_cols)
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each start and length (vectorised)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets


class _ConcatRows:
    """Rows of several readers stacked in order (the stores of an annbatch collection)."""

    def __init__(self, readers: list, offsets: np.ndarray) -> None:
        self.readers, self.offsets = readers, np.asarray(offsets, dtype=np.int64)

    def read(self, rows: np.ndarray, n_cols: int) -> sparse.csr_matrix:
        """``rows`` (sorted) of the stacked matrix, read store by store."""
        member = np.searchsorted(self.offsets, rows, side="right") - 1
        parts = [self.readers[m].read(rows[member == m] - self.offsets[m], n_cols)
                 for m in np.unique(member)]
        return sparse.vstack(parts, format="csr")


class _MemoryRows:
    """Rows of an in-memory AnnData's ``.X`` (or a layer)."""

    def __init__(self, adata: AnnData, layer: str | None) -> None:
        self.adata, self.layer = adata, layer

    def read(self, rows: np.ndarray, n_cols: int) -> sparse.csr_matrix:
        """``rows`` as a float32 CSR matrix."""
        x = self.adata.X if self.layer is None else self.adata.layers[self.layer]
        return sparse.csr_matrix(x[rows], dtype=np.float32)


def _open_store(path: str, fmt: str):
    if fmt == "h5ad":
        import h5py

        return h5py.File(path, "r")
    import zarr

    return zarr.open_group(path, mode="r")


# ---------------------------------------------------------------------------------- sources
class AnnDataSource:
    """A corpus dataset in an ``.h5ad`` file, a zarr AnnData store, or an annbatch collection.

    Usually made by :class:`~scvi_cellplm.pretrain.Corpus` from a path: ``.h5ad`` files are read
    with h5py, directories (``adata.write_zarr``) with zarr. An annbatch collection (a zarr group of
    ``dataset_0``, ``dataset_1``, ... AnnData stores with one shared gene space) is one dataset whose
    stores are read as one matrix, so a sample's cells form sentences across its stores.

    Parameters
    ----------
    path
        ``.h5ad`` file, zarr store or annbatch collection.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        if not os.path.exists(self.path):
            raise InputDataError(f"No such file or store: {self.path}")
        self.format = "zarr" if os.path.isdir(self.path) else "h5ad"
        self.members = _collection_members(self.path) if self.format == "zarr" else []

    @property
    def default_name(self) -> str:
        """File or store name without its suffix."""
        return Path(self.path).name.removesuffix(".h5ad").removesuffix(".zarr")

    def describe(self) -> dict:
        """JSON-able description for the corpus metadata."""
        fmt = "annbatch" if self.members else self.format
        return {"path": self.path, "format": fmt}

    def _paths(self) -> list[str]:
        return [os.path.join(self.path, m) for m in self.members] or [self.path]

    def meta(self, layer: str | None, gene_id_key: str | None, keys: dict) -> dict:
        """Read the number of cells, gene ids and the ``keys`` obs columns (factorized), not counts."""
        parts = []
        for path in self._paths():
            try:
                parts.append(_store_meta(path, self.format, layer, keys))
            except InputDataError:
                raise
            except (OSError, KeyError, ValueError) as err:
                raise InputDataError(
                    f"{path}: not a readable AnnData {self.format} store (truncated or corrupted?): "
                    f"{err}. Write it again or leave it out of the corpus."
                ) from err
        var = parts[0][0]
        for path, (other, _, _) in zip(self._paths()[1:], parts[1:]):
            if not other.index.equals(var.index):
                raise InputDataError(f"{path}: its genes differ from {self._paths()[0]}'s; an annbatch "
                                     "collection needs one gene space (rebuild it with `var_subset`).")
        columns = {name: None if parts[0][2][name] is None
                   else np.concatenate([np.asarray(p[2][name]) for p in parts]) for name in keys}
        return finish_meta(var, gene_id_key, sum(p[1] for p in parts), columns)

    def reader(self, layer: str | None):
        """Make a lazy, picklable row reader of the counts."""
        readers = [_StoreRows(p, layer, self.format) for p in self._paths()]
        if len(readers) == 1:
            return readers[0]
        sizes = [_store_n_obs(p) for p in self._paths()]
        return _ConcatRows(readers, np.concatenate([[0], np.cumsum(sizes)]))


class MemorySource:
    """A corpus dataset held in memory (an AnnData object)."""

    format = "memory"
    path = None

    def __init__(self, adata: AnnData) -> None:
        self.adata = adata

    default_name = None

    def describe(self) -> dict:
        """JSON-able description for the corpus metadata."""
        return {"path": None, "format": "memory"}

    def meta(self, layer: str | None, gene_id_key: str | None, keys: dict) -> dict:
        """Read the number of cells, gene ids and the ``keys`` obs columns (factorized)."""
        obs = self.adata.obs
        if layer is not None and layer not in self.adata.layers:
            raise InputDataError(f"`layer={layer!r}` is not in the AnnData's layers ({list(self.adata.layers)}).")
        for name, key in keys.items():
            if key is not None and key not in obs:
                raise InputDataError(f"`{name}_key={key!r}` is not a column of obs ({list(obs.columns)}).")
        columns = {name: None if key is None else obs[key] for name, key in keys.items()}
        return finish_meta(self.adata.var, gene_id_key, self.adata.n_obs, columns)

    def reader(self, layer: str | None) -> _MemoryRows:
        """Make a row reader of the in-memory counts."""
        return _MemoryRows(self.adata, layer)


def _collection_members(path: str) -> list[str]:
    """``dataset_i`` stores of an annbatch collection (sorted by ``i``), or ``[]`` for one store."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except (OSError, ValueError, KeyError) as err:
        raise InputDataError(f"{path}: not a zarr store ({err}); pass an .h5ad file, a store written "
                             "by `adata.write_zarr`, or an annbatch collection.") from err
    if "X" in group or "obs" in group:
        return []
    members = sorted((k for k in group.group_keys() if _MEMBER.match(k)), key=lambda k: int(k.split("_")[1]))
    if not members:
        kind = group.attrs.get("encoding-type", "")
        raise InputDataError(f"{path}: neither an AnnData zarr store nor an annbatch collection "
                             f"(encoding {kind or 'none'}, no dataset_0, dataset_1, ... stores).")
    return members


def _store_n_obs(path: str) -> int:
    group = _open_store(path, "zarr")
    obs = group["obs"]
    return int(obs[obs.attrs["_index"]].shape[0])


def _store_meta(path: str, fmt: str, layer: str | None, keys: dict) -> tuple:
    """Return ``(var, n_obs, obs columns)`` of a file or store (reader errors propagate)."""
    from anndata.io import read_elem

    group = _open_store(path, fmt)
    try:
        var = read_elem(group["var"])
        obs_group = group["obs"]
        n_obs = int(obs_group[obs_group.attrs["_index"]].shape[0])
        where = "X" if layer is None else f"layers/{layer}"
        if where not in group:
            raise InputDataError(f"{path}: no {where} in the store.")
        columns = {}
        for name, key in keys.items():
            if key is not None and key not in obs_group:
                raise InputDataError(f"{path}: `{name}_key={key!r}` is not a column of obs ({list(obs_group)}).")
            columns[name] = None if key is None else read_elem(obs_group[key])
    finally:
        if fmt == "h5ad":
            group.close()
    return var, n_obs, columns


def finish_meta(var: pd.DataFrame, gene_id_key: str | None, n_obs: int, columns: dict) -> dict:
    """Return the gene ids of ``var`` and the obs columns as integer codes, checked."""
    if gene_id_key is not None and gene_id_key not in var:
        raise InputDataError(f"`gene_id_key={gene_id_key!r}` is not a column of var ({list(var.columns)}).")
    gene_ids = var.index if gene_id_key is None else var[gene_id_key]
    out = {"n_obs": int(n_obs), "gene_ids": [str(g) for g in gene_ids]}
    for name, col in columns.items():
        out[name] = None if col is None else _factorize(col)
        if col is not None and (out[name][0] < 0).any():
            raise InputDataError(f"The {name} column has missing values; fill them first.")
    return out


def _factorize(column) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (-1 for missing) and the values they stand for, without per-cell strings."""
    codes, uniques = pd.factorize(column, sort=True)
    return codes.astype(np.int32, copy=False), np.asarray(uniques).astype(str)


def as_sources(data, modality: str) -> list:
    """Flatten the inputs to a list of sources, one per dataset."""
    from mudata import MuData

    if isinstance(data, str | os.PathLike | AnnData | MuData) or _is_source(data) or _is_collection(data):
        data = [data]
    out = []
    for item in data:
        if _is_source(item):
            out.append(item)
        elif isinstance(item, str | os.PathLike):
            out.append(AnnDataSource(item))
        elif isinstance(item, MuData):
            if modality not in item.mod:
                raise InputDataError(f"Modality {modality!r} not in the MuData ({list(item.mod)}).")
            out.append(MemorySource(item.mod[modality]))
        elif _is_collection(item):
            out.extend(MemorySource(a) for a in item.adatas)
        elif isinstance(item, AnnData):
            out.append(AnnDataSource(item.filename) if item.isbacked else MemorySource(item))
        else:
            raise InputDataError(f"Cannot read {type(item).__name__} as a corpus dataset: pass paths, "
                                 "AnnData, MuData, an AnnCollection or a SomaSource.")
    return out


def _is_source(item) -> bool:
    return all(hasattr(item, a) for a in ("meta", "reader", "describe"))


def _is_collection(item) -> bool:
    return type(item).__name__ == "AnnCollection" and hasattr(item, "adatas")
