"""An on-disk pretraining corpus: many AnnData files, one Ensembl gene vocabulary, lazy reads.

Only gene ids and a few obs columns are read up front; counts stay on disk and are read per
sentence from backed ``.h5ad`` files (row ranges of the CSR arrays, with h5py), so memory is bounded
by the mini-batch, not by the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._exceptions import InputDataError
from ..io._genes import Species, is_ensembl, strip_version, symbols_to_ensembl

logger = logging.getLogger(__name__)

READ_GAP = 1 << 16
"""Row runs of a file closer than this many stored entries are read in one h5py call."""


@dataclass
class _Dataset:
    """One AnnData of the corpus: where its counts are and how its genes map to the vocabulary."""

    name: str
    n_obs: int
    path: str | None  # backed .h5ad, read lazily per process
    adata: AnnData | None  # in-memory AnnData
    layer: str | None
    column_map: np.ndarray  # vocabulary row of each of the file's genes, -1 if none


class _H5Rows:
    """Rows of a CSR (or dense) matrix stored in an ``.h5ad`` file, opened lazily per process."""

    def __init__(self, path: str, layer: str | None) -> None:
        self.path, self.key = path, "X" if layer is None else f"layers/{layer}"
        self._pid, self._file, self._indptr = None, None, None

    def __getstate__(self) -> dict:  # h5py handles never cross processes
        return {"path": self.path, "key": self.key, "_pid": None, "_file": None, "_indptr": None}

    def _open(self):
        if self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            elem = self._file[self.key]
            if isinstance(elem, h5py.Group):
                kind = elem.attrs.get("encoding-type", "")
                if kind != "csr_matrix":
                    raise InputDataError(
                        f"{self.path}: {self.key} is stored as {kind or 'an unknown group'}; streaming "
                        "reads rows, so store it as CSR: `adata.X = scipy.sparse.csr_matrix(adata.X)` "
                        "and write the file again."
                    )
                self._indptr = elem["indptr"][:].astype(np.int64)
        return self._file[self.key]

    def read(self, rows: np.ndarray, n_cols: int) -> sparse.csr_matrix:
        """``rows`` (sorted, unique) as a CSR matrix; an unreadable file is an InputDataError naming it."""
        try:
            return self._read(rows, n_cols)
        except (OSError, KeyError) as err:
            raise InputDataError(
                f"{self.path}: cannot read its {self.key} (truncated or corrupted file?): {err}. "
                "Write the file again or leave it out of the corpus."
            ) from err

    def _read(self, rows: np.ndarray, n_cols: int) -> sparse.csr_matrix:
        elem = self._open()
        if self._indptr is None:  # dense on disk
            return sparse.csr_matrix(np.asarray(elem[rows], dtype=np.float32))
        indptr = self._indptr
        starts, stops = indptr[rows], indptr[rows + 1]
        lengths = stops - starts
        # group rows into blocks whose stored entries are close, one h5py read per block
        cut = np.flatnonzero(starts[1:] - stops[:-1] > READ_GAP) + 1
        data, indices = [], []
        for block in np.split(np.arange(len(rows)), cut):
            if not len(block):
                continue
            lo, hi = int(starts[block[0]]), int(stops[block[-1]])
            d = elem["data"][lo:hi]
            i = elem["indices"][lo:hi]
            take = _ranges(starts[block] - lo, lengths[block])
            data.append(d[take])
            indices.append(i[take])
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


class Corpus:
    """Pretraining corpus over many AnnData files with different gene panels.

    Genes are unified into one vocabulary by Ensembl id (versions stripped; symbols mapped offline
    to Ensembl; genes with no Ensembl id are left out). Each dataset (file) records which
    vocabulary genes it measured, so its unmeasured genes are masked out of the loss instead of
    being read as zeros. Batch and platform categories are registered across the corpus (batch
    names are qualified by their dataset). Cells are grouped into *sentences*: the cells of one
    sample, or, for samples above ``max_cells``, random windows of at most ``max_cells`` cells of
    it (a seeded partition, fixed for the corpus).

    Parameters
    ----------
    data
        ``.h5ad`` paths (read backed, lazily), AnnData objects (in memory or backed), a
        :class:`~mudata.MuData` (its ``modality``), an :class:`~anndata.experimental.AnnCollection`
        (each of its AnnData, with its own full gene panel), or a list mixing them. Every entry is one
        dataset.
    max_cells
        Cell budget of a sentence (use the training mini-batch budget).
    layer
        Layer with raw counts (default ``.X``), the same in every dataset.
    gene_id_key
        Column of ``.var`` with gene ids (default: ``var_names``).
    batch_key
        Column of ``.obs`` with the batch of each cell (default: one batch per dataset).
    sample_key
        Column of ``.obs`` with the sample of each cell (a sentence's cells come from one sample;
        default: ``batch_key``, else the whole dataset).
    platform_key
        Column of ``.obs`` with the platform (technology) of each cell; categories are registered
        and returned with every mini-batch (the network does not use them).
    gene_vocabulary
        A fixed vocabulary (e.g. an official checkpoint's gene list); genes outside it are dropped.
        Default: the sorted union of the datasets' Ensembl ids.
    species
        Species of the offline symbol → Ensembl tables (``"human"``, ``"mouse"``, ``"auto"``).
    names
        Dataset names (default: file stems, or ``dataset{i}``).
    modality
        Modality of MuData inputs.
    seed
        Seed of the windows of large samples.

    Attributes
    ----------
    vocabulary
        Ensembl ids of the gene vocabulary.
    gene_mask
        ``(n_datasets, n_genes)`` booleans: vocabulary genes each dataset measured.
    dataset_names, batch_categories, platform_categories
        Registered categories (codes are positions in these lists).
    """

    def __init__(
        self,
        data,
        max_cells: int,
        *,
        layer: str | None = None,
        gene_id_key: str | None = None,
        batch_key: str | None = None,
        sample_key: str | None = None,
        platform_key: str | None = None,
        gene_vocabulary: Sequence[str] | None = None,
        species: Species = "auto",
        names: Sequence[str] | None = None,
        modality: str = "rna",
        seed: int = 0,
    ) -> None:
        if max_cells < 1:
            raise InputDataError(f"`max_cells` must be positive, got {max_cells}.")
        entries = _expand(data, modality)
        if not entries:
            raise InputDataError("The corpus is empty: pass .h5ad paths or AnnData objects.")
        names = list(names) if names is not None else _default_names(entries)
        if len(names) != len(entries) or len(set(names)) != len(names):
            raise InputDataError(f"Need one unique name per dataset; got {names}.")
        self.max_cells, self.seed, self.layer = int(max_cells), int(seed), layer
        self.keys = {"layer": layer, "gene_id_key": gene_id_key, "batch_key": batch_key,
                     "sample_key": sample_key, "platform_key": platform_key}

        # gene ids and obs columns only: counts stay on disk
        metas = [_read_meta(e, layer, gene_id_key, batch_key, sample_key or batch_key, platform_key)
                 for e in entries]
        ids = [_ensembl_ids(m["gene_ids"], species) for m in metas]
        if gene_vocabulary is None:
            self.vocabulary = sorted({g for gene_ids in ids for g in gene_ids if g})
        else:
            self.vocabulary = [strip_version(str(g)) for g in gene_vocabulary]
        if not self.vocabulary:
            raise InputDataError("No gene has an Ensembl id: pass `gene_id_key=` with Ensembl ids.")
        position = {g: i for i, g in reversed(list(enumerate(self.vocabulary)))}
        self.gene_mask = np.zeros((len(entries), len(self.vocabulary)), dtype=bool)
        self.datasets: list[_Dataset] = []
        for d, (entry, meta, gene_ids, name) in enumerate(zip(entries, metas, ids, names)):
            column_map = np.array([position.get(g, -1) if g else -1 for g in gene_ids], dtype=np.int64)
            _, first = np.unique(column_map, return_index=True)  # a duplicated id keeps its first column
            duplicate = np.ones(len(column_map), dtype=bool)
            duplicate[first] = False
            column_map[duplicate] = -1
            self.gene_mask[d, column_map[column_map >= 0]] = True
            n_kept = int((column_map >= 0).sum())
            logger.info("Corpus dataset %s: %d cells, %d of %d genes in the vocabulary.",
                        name, meta["n_obs"], n_kept, len(column_map))
            if n_kept == 0:
                raise InputDataError(f"Dataset {name!r} has no gene in the vocabulary.")
            path = entry if isinstance(entry, str) else None
            self.datasets.append(_Dataset(name, meta["n_obs"], path,
                                          None if path else entry, layer, column_map))
        self.dataset_names = list(names)
        self.offsets = np.concatenate([[0], np.cumsum([m["n_obs"] for m in metas])]).astype(np.int64)

        # categories registered across the corpus
        self.batch_categories, batch_codes = _categories(
            [m["batch"] if m["batch"] is not None else _constant(m["n_obs"], "0") for m in metas],
            names, qualify=True,
        )
        self.platform_categories, platform_codes = _categories(
            [m["platform"] if m["platform"] is not None else _constant(m["n_obs"], "unknown")
             for m in metas],
            names, qualify=False,
        )
        self.batch_codes = np.concatenate(batch_codes).astype(np.int32)
        self.platform_codes = np.concatenate(platform_codes).astype(np.int32)

        # sentences: (dataset, sorted rows), kept as flat arrays
        sent_dataset, sent_rows = [], []
        for d, meta in enumerate(metas):
            codes = (meta["sample"] or _constant(meta["n_obs"], "0"))[0]
            order = np.argsort(codes, kind="stable")
            bounds = np.flatnonzero(np.diff(codes[order])) + 1
            for s, members in enumerate(np.split(order, bounds)):
                for window in _windows(members, self.max_cells, (self.seed, d, s)):
                    sent_dataset.append(d)
                    sent_rows.append(window)
        self.sentence_dataset = np.asarray(sent_dataset, dtype=np.int32)
        self.sentence_sizes = np.asarray([len(r) for r in sent_rows], dtype=np.int64)
        self.sentence_starts = np.concatenate([[0], np.cumsum(self.sentence_sizes)]).astype(np.int64)
        self.sentence_rows = np.concatenate(sent_rows).astype(np.int64)
        self._readers: dict[int, _H5Rows] = {}
        logger.info(self.summary())

    # ------------------------------------------------------------------ properties
    @property
    def n_cells(self) -> int:
        """Number of cells in the corpus."""
        return int(self.offsets[-1])

    @property
    def n_genes(self) -> int:
        """Size of the gene vocabulary."""
        return len(self.vocabulary)

    @property
    def n_sentences(self) -> int:
        """Number of sentences."""
        return len(self.sentence_sizes)

    def summary(self) -> str:
        """One line describing the corpus."""
        return (
            f"Corpus: {self.n_cells:,} cells in {len(self.datasets)} datasets, {self.n_genes:,}-gene "
            f"vocabulary, {len(self.batch_categories)} batches, {len(self.platform_categories)} "
            f"platforms, {self.n_sentences:,} sentences of at most {self.max_cells} cells."
        )

    def fingerprint(self) -> str:
        """Return a hash of what training depends on (vocabulary, datasets, panels, sentences)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.vocabulary, self.dataset_names, self.batch_categories]).encode())
        for array in (self.gene_mask, self.offsets, self.sentence_dataset, self.sentence_sizes,
                      self.sentence_rows):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]

    def metadata(self) -> dict:
        """JSON-able description: vocabulary, datasets (files, panels), batches, platforms."""
        return {
            "n_cells": self.n_cells,
            "vocabulary": list(self.vocabulary),
            "datasets": [
                {"name": d.name, "path": d.path, "n_obs": d.n_obs,
                 "n_genes_measured": int(self.gene_mask[i].sum())}
                for i, d in enumerate(self.datasets)
            ],
            "batch_categories": list(self.batch_categories),
            "platform_categories": list(self.platform_categories),
            "max_cells": self.max_cells,
            "seed": self.seed,
            "keys": dict(self.keys),
            "fingerprint": self.fingerprint(),
        }

    # ------------------------------------------------------------------ reading
    def sentence(self, i: int) -> tuple[int, np.ndarray]:
        """Dataset and (sorted) rows of sentence ``i``."""
        lo, hi = self.sentence_starts[i], self.sentence_starts[i + 1]
        return int(self.sentence_dataset[i]), self.sentence_rows[lo:hi]

    def read(self, dataset: int, rows: np.ndarray) -> sparse.csr_matrix:
        """Read the counts of ``rows`` (sorted) of ``dataset`` over the vocabulary (CSR, float32).

        The dataset's genes outside the vocabulary are dropped; vocabulary genes it did not
        measure are absent (zero), see :attr:`gene_mask`.
        """
        ds = self.datasets[dataset]
        n_file = len(ds.column_map)
        if ds.path is not None:
            reader = self._readers.get(dataset)
            if reader is None:
                reader = self._readers[dataset] = _H5Rows(ds.path, ds.layer)
            x = reader.read(rows, n_file)
        else:
            x = ds.adata.X if ds.layer is None else ds.adata.layers[ds.layer]
            x = sparse.csr_matrix(x[rows], dtype=np.float32)
        return _to_vocabulary(x, ds.column_map, self.n_genes)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state


def _to_vocabulary(x: sparse.csr_matrix, column_map: np.ndarray, n_genes: int) -> sparse.csr_matrix:
    """Re-index the columns of ``x`` into the vocabulary, dropping unmapped columns."""
    x = sparse.csr_matrix(x)
    cols = column_map[x.indices]
    keep = cols >= 0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=x.shape[0]))])
    out = sparse.csr_matrix((x.data[keep].astype(np.float32, copy=False), cols[keep], indptr),
                            shape=(x.shape[0], n_genes))
    out.sum_duplicates()  # sorted columns; duplicated entries summed (scipy's meaning)
    return out


def _windows(members: np.ndarray, max_cells: int, key: tuple[int, ...]) -> list[np.ndarray]:
    """Return a sample's cells as one sentence, or a seeded balanced partition into windows."""
    if len(members) <= max_cells:
        return [np.sort(members)]
    n_windows = -(-len(members) // max_cells)
    shuffled = np.random.default_rng(list(key)).permutation(members)
    return [np.sort(w) for w in np.array_split(shuffled, n_windows)]


def _expand(data, modality: str) -> list:
    """Flatten the inputs to a list of ``.h5ad`` paths and AnnData objects."""
    from mudata import MuData

    if isinstance(data, str | os.PathLike | AnnData | MuData) or _is_collection(data):
        data = [data]
    out = []
    for item in data:
        if isinstance(item, str | os.PathLike):
            path = str(item)
            if not os.path.exists(path):
                raise InputDataError(f"No such file: {path}")
            out.append(path)
        elif isinstance(item, MuData):
            if modality not in item.mod:
                raise InputDataError(f"Modality {modality!r} not in the MuData ({list(item.mod)}).")
            out.append(item.mod[modality])
        elif _is_collection(item):
            out.extend(item.adatas)
        elif isinstance(item, AnnData):
            out.append(str(item.filename) if item.isbacked else item)
        else:
            raise InputDataError(f"Cannot read {type(item).__name__} as a corpus dataset.")
    return out


def _is_collection(item) -> bool:
    return type(item).__name__ == "AnnCollection" and hasattr(item, "adatas")


def _default_names(entries: list) -> list[str]:
    names = [Path(e).name.removesuffix(".h5ad") if isinstance(e, str) else f"dataset{i}"
             for i, e in enumerate(entries)]
    if len(set(names)) != len(names):  # same stems in different folders
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


def _read_meta(entry, layer, gene_id_key, batch_key, sample_key, platform_key) -> dict:
    """Read the number of cells, gene ids and the requested obs columns, without reading counts."""
    keys = {"batch": batch_key, "sample": sample_key, "platform": platform_key}
    if isinstance(entry, AnnData):
        var, obs, n_obs = entry.var, entry.obs, entry.n_obs
        if layer is not None and layer not in entry.layers:
            raise InputDataError(f"`layer={layer!r}` is not in the AnnData's layers ({list(entry.layers)}).")
        columns = {}
        for name, key in keys.items():
            if key is not None and key not in obs:
                raise InputDataError(f"`{name}_key={key!r}` is not a column of obs ({list(obs.columns)}).")
            columns[name] = None if key is None else _factorize(obs[key])
    else:
        try:
            var, obs_columns, n_obs = _read_file_meta(entry, layer, keys)
        except (OSError, KeyError) as err:
            raise InputDataError(
                f"{entry}: not a readable .h5ad file (truncated or corrupted?): {err}. Write the "
                "file again or leave it out of the corpus."
            ) from err
        columns = {name: None if col is None else _factorize(col) for name, col in obs_columns.items()}
    if gene_id_key is not None and gene_id_key not in var:
        raise InputDataError(f"`gene_id_key={gene_id_key!r}` is not a column of var ({list(var.columns)}).")
    gene_ids = var.index if gene_id_key is None else var[gene_id_key]
    for name, col in columns.items():
        if col is not None and (col[0] < 0).any():
            raise InputDataError(f"The {name} column has missing values; fill them first.")
    return {"n_obs": n_obs, "gene_ids": [str(g) for g in gene_ids], **columns}


def _read_file_meta(path: str, layer, keys: dict) -> tuple:
    """Return ``(var, obs columns, n_obs)`` of an ``.h5ad`` file (h5py errors propagate)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        var = read_elem(f["var"])
        obs_group = f["obs"]
        n_obs = int(obs_group[obs_group.attrs["_index"]].shape[0])
        where = "X" if layer is None else f"layers/{layer}"
        if where not in f:
            raise InputDataError(f"{path}: no {where} in the file.")
        columns = {}
        for name, key in keys.items():
            if key is not None and key not in obs_group:
                raise InputDataError(f"{path}: `{name}_key={key!r}` is not a column of obs ({list(obs_group)}).")
            columns[name] = None if key is None else read_elem(obs_group[key])
    return var, columns, n_obs


def _ensembl_ids(gene_ids: list[str], species: Species) -> list[str]:
    """Ensembl ids (no version) of the genes; symbols mapped offline; ``""`` where none."""
    out = [strip_version(g) if is_ensembl(g) else "" for g in gene_ids]
    todo = [i for i, g in enumerate(out) if not g and gene_ids[i] not in ("", "nan")]
    if todo:
        for i, g in zip(todo, symbols_to_ensembl([gene_ids[i] for i in todo], species=species)):
            out[i] = g
    return out


def _factorize(column) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (-1 for missing) and the values they stand for, without per-cell strings."""
    codes, uniques = pd.factorize(column, sort=True)
    return codes.astype(np.int32, copy=False), np.asarray(uniques).astype(str)


def _constant(n_obs: int, value: str) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n_obs, dtype=np.int32), np.array([value])


def _categories(columns: list[tuple], names: list[str], qualify: bool) -> tuple[list[str], list]:
    """Global categories (``dataset/value`` when ``qualify``) and each dataset's codes."""
    labels = [[f"{name}/{u}" if qualify else str(u) for u in uniques] for name, (_, uniques) in zip(names, columns)]
    categories = sorted({label for group in labels for label in group})
    lookup = pd.Index(categories)
    return categories, [lookup.get_indexer(group)[codes] for group, (codes, _) in zip(labels, columns)]
