"""An on-disk pretraining corpus: many datasets, one Ensembl gene vocabulary, lazy reads.

Only gene ids and a few obs columns are read up front; counts stay on disk and are read per
sentence through one row reader per dataset (``.h5ad`` with h5py, zarr AnnData stores and annbatch
collections with zarr, TileDB-SOMA experiments; see ``_readers.py`` and ``_soma.py``), so memory is
bounded by the mini-batch, not by the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from .._exceptions import InputDataError
from ..io._genes import Species, is_ensembl, strip_version, symbols_to_ensembl
from ._readers import as_sources

logger = logging.getLogger(__name__)

@dataclass
class _Dataset:
    """One dataset of the corpus: its source, its row reader and how its genes map to the vocabulary."""

    name: str
    n_obs: int
    source: object  # a source of _readers.py or _soma.py (metadata, description)
    reader: object  # its row reader: read(rows, n_cols) -> CSR over the dataset's genes
    column_map: np.ndarray  # vocabulary row of each of the dataset's genes, -1 if none

    @property
    def path(self) -> str | None:
        """File, store or URI of the dataset (``None`` in memory)."""
        return self.source.path


class Corpus:
    """Pretraining corpus over many datasets (files, stores, experiments) with different gene panels.

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
        ``.h5ad`` paths (read backed, lazily), zarr AnnData stores (``adata.write_zarr``) and
        annbatch collections (paths of directories, read with zarr), AnnData objects (in memory or
        backed), a :class:`~mudata.MuData` (its ``modality``), an
        :class:`~anndata.experimental.AnnCollection` (each of its AnnData, with its own full gene
        panel), a :class:`~scvi_cellplm.pretrain.SomaSource` (cells of a TileDB-SOMA experiment; see
        :meth:`from_soma`), or a list mixing them. Every entry is one dataset.
    max_cells
        Cell budget of a sentence (use the training mini-batch budget).
    layer
        Layer with raw counts (default ``.X``), the same in every AnnData dataset (a
        :class:`~scvi_cellplm.pretrain.SomaSource` has its own).
    gene_id_key
        Column of ``.var`` with gene ids (default: ``var_names``; a SOMA source has its own).
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
        entries = as_sources(data, modality)
        if not entries:
            raise InputDataError("The corpus is empty: pass .h5ad or zarr paths, AnnData objects or SOMA sources.")
        names = list(names) if names is not None else _default_names(entries)
        if len(names) != len(entries) or len(set(names)) != len(names):
            raise InputDataError(f"Need one unique name per dataset; got {names}.")
        self.max_cells, self.seed, self.layer = int(max_cells), int(seed), layer
        self.keys = {"layer": layer, "gene_id_key": gene_id_key, "batch_key": batch_key,
                     "sample_key": sample_key, "platform_key": platform_key}

        # gene ids and obs columns only: counts stay on disk
        obs_keys = {"batch": batch_key, "sample": sample_key or batch_key, "platform": platform_key}
        metas = [e.meta(layer, gene_id_key, obs_keys) for e in entries]
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
            self.datasets.append(_Dataset(name, meta["n_obs"], entry, entry.reader(layer), column_map))
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
        logger.info(self.summary())

    @classmethod
    def from_soma(
        cls,
        uri: str,
        max_cells: int,
        *,
        obs_value_filter: str | None = None,
        measurement: str = "RNA",
        layer: str = "raw",
        gene_id_key: str = "feature_id",
        name: str | None = None,
        context=None,
        **kwargs,
    ) -> Corpus:
        """Build a corpus from the cells of a TileDB-SOMA experiment (the CELLxGENE Census layout).

        Only ``obs`` (filtered) and ``ms[measurement].var`` are read here; the counts of each
        sentence are read from ``ms[measurement].X[layer]`` when it is trained on. Needs
        ``tiledbsoma`` (``pip install scvi-cellplm[corpus]``).

        Parameters
        ----------
        uri
            URI of the experiment.
        max_cells
            Cell budget of a sentence (use the training mini-batch budget).
        obs_value_filter
            SOMA value filter on ``obs``, e.g. ``"tissue == 'pancreas'"``.
        measurement, layer
            Where the raw counts are: ``ms[measurement].X[layer]`` (Census: ``"RNA"``, ``"raw"``).
        gene_id_key
            Column of ``ms[measurement].var`` with gene ids (Census: ``"feature_id"``).
        name
            Dataset name (default: the experiment's folder name).
        context
            A ``tiledbsoma.SOMATileDBContext`` (e.g. for object-store credentials).
        **kwargs
            Other arguments of :class:`Corpus`: ``batch_key``, ``sample_key`` and ``platform_key``
            name obs columns; ``gene_vocabulary``, ``species``, ``seed``.

        Returns
        -------
        The corpus, one dataset.

        Examples
        --------
        >>> corpus = Corpus.from_soma("census/homo_sapiens", 512, obs_value_filter="tissue == 'pancreas'",
        ...                           sample_key="donor_id", batch_key="dataset_id")
        """
        from ._soma import SomaSource

        source = SomaSource(uri, obs_value_filter=obs_value_filter, measurement=measurement, layer=layer,
                            gene_id_key=gene_id_key, name=name, context=context)
        return cls([source], max_cells, **kwargs)

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
                {"name": d.name, **d.source.describe(), "n_obs": d.n_obs,
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
        return _to_vocabulary(ds.reader.read(rows, len(ds.column_map)), ds.column_map, self.n_genes)


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


def _default_names(entries: list) -> list[str]:
    names = [e.default_name or f"dataset{i}" for i, e in enumerate(entries)]
    if len(set(names)) != len(names):  # same stems in different folders
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


def _ensembl_ids(gene_ids: list[str], species: Species) -> list[str]:
    """Ensembl ids (no version) of the genes; symbols mapped offline; ``""`` where none."""
    out = [strip_version(g) if is_ensembl(g) else "" for g in gene_ids]
    todo = [i for i, g in enumerate(out) if not g and gene_ids[i] not in ("", "nan")]
    if todo:
        for i, g in zip(todo, symbols_to_ensembl([gene_ids[i] for i in todo], species=species)):
            out[i] = g
    return out


def _constant(n_obs: int, value: str) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n_obs, dtype=np.int32), np.array([value])


def _categories(columns: list[tuple], names: list[str], qualify: bool) -> tuple[list[str], list]:
    """Global categories (``dataset/value`` when ``qualify``) and each dataset's codes."""
    labels = [[f"{name}/{u}" if qualify else str(u) for u in uniques] for name, (_, uniques) in zip(names, columns)]
    categories = sorted({label for group in labels for label in group})
    lookup = pd.Index(categories)
    return categories, [lookup.get_indexer(group)[codes] for group, (codes, _) in zip(labels, columns)]
