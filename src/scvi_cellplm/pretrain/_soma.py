"""A corpus dataset in a TileDB-SOMA experiment (the CELLxGENE Census layout), streamed per sentence.

Only ``obs`` columns (filtered with ``obs_value_filter``) and ``ms[measurement].var`` are read up
front; the counts of a sentence are read from ``ms[measurement].X[layer]`` by their ``soma_joinid``
coordinates, so the matrix is never materialised.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import sparse

from .._exceptions import InputDataError
from ._readers import finish_meta

INSTALL = "TileDB-SOMA sources need the tiledbsoma package: `pip install scvi-cellplm[corpus]`."


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as err:
        raise ImportError(INSTALL) from err
    return tiledbsoma


class SomaSource:
    """A corpus dataset read from a TileDB-SOMA experiment.

    The experiment's cells (those ``obs_value_filter`` selects) are one dataset of the corpus, with
    the measurement's genes as its panel. Pass it to :class:`~scvi_cellplm.pretrain.Corpus` (alone
    or among files), or use :meth:`Corpus.from_soma <scvi_cellplm.pretrain.Corpus.from_soma>`.
    ``batch_key``, ``sample_key`` and ``platform_key`` of the corpus name columns of ``obs``.

    Parameters
    ----------
    uri
        URI of the experiment (a local folder, or ``s3://...`` with a TileDB context configured).
    obs_value_filter
        A SOMA value filter on ``obs``, e.g. ``"tissue == 'pancreas' and is_primary_data == True"``.
    measurement
        Measurement with the counts (Census: ``"RNA"``).
    layer
        Layer of ``ms[measurement].X`` with raw counts (Census: ``"raw"``).
    gene_id_key
        Column of ``ms[measurement].var`` with gene ids (Census: ``"feature_id"``, Ensembl ids).
    name
        Dataset name (default: the experiment's folder name).
    context
        A ``tiledbsoma.SOMATileDBContext`` (e.g. for object-store credentials).
    """

    format = "soma"

    def __init__(self, uri: str | os.PathLike, *, obs_value_filter: str | None = None, measurement: str = "RNA",
                 layer: str = "raw", gene_id_key: str = "feature_id", name: str | None = None,
                 context=None) -> None:
        _tiledbsoma()
        uri = str(uri)
        # local folders as absolute paths: TileDB resolves relative ones against a cached folder
        self.uri = uri if "://" in uri else os.path.abspath(uri)
        self.obs_value_filter = obs_value_filter
        self.measurement, self.layer, self.gene_id_key = measurement, layer, gene_id_key
        self.name, self.context = name or uri.rstrip("/").rsplit("/", 1)[-1], context
        self._joinids: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def path(self) -> str:
        """URI of the experiment."""
        return self.uri

    @property
    def default_name(self) -> str:
        """The ``name`` given, else the experiment's folder name."""
        return self.name

    def describe(self) -> dict:
        """JSON-able description for the corpus metadata."""
        return {"path": self.uri, "format": "soma", "obs_value_filter": self.obs_value_filter,
                "measurement": self.measurement, "layer": self.layer}

    def _open(self):
        soma = _tiledbsoma()
        try:
            return soma.Experiment.open(self.uri, context=self.context)
        except (soma.DoesNotExistError, soma.SOMAError) as err:
            raise InputDataError(f"{self.uri}: not a TileDB-SOMA experiment ({err}); pass the URI of "
                                 "one (e.g. written by `tiledbsoma.io.from_anndata`).") from err

    def meta(self, layer, gene_id_key, keys: dict) -> dict:
        """Read the cells the filter selects, gene ids and the ``keys`` obs columns, not counts.

        ``layer`` and ``gene_id_key`` of the corpus are not used: the source has its own.
        """
        soma = _tiledbsoma()
        with self._open() as exp:
            ms = _member(exp.ms, self.measurement, "measurement", self.uri)
            _member(ms.X, self.layer, "layer", f"{self.uri} ms[{self.measurement!r}].X")
            var_columns = ms.var.schema.names
            if self.gene_id_key not in var_columns:
                raise InputDataError(f"`gene_id_key={self.gene_id_key!r}` is not a column of "
                                     f"ms[{self.measurement!r}].var ({var_columns}): pass the one with gene ids.")
            var = ms.var.read(column_names=["soma_joinid", self.gene_id_key]).concat().to_pandas()
            obs_columns = exp.obs.schema.names
            wanted = []
            for kind, key in keys.items():
                if key is not None and key not in obs_columns:
                    raise InputDataError(f"`{kind}_key={key!r}` is not a column of {self.uri} obs: pass one of "
                                         f"{obs_columns}.")
                if key is not None and key not in wanted:
                    wanted.append(key)
            try:
                obs = exp.obs.read(column_names=["soma_joinid", *wanted],
                                   value_filter=self.obs_value_filter).concat().to_pandas()
            except (soma.SOMAError, ValueError) as err:
                raise InputDataError(f"`obs_value_filter={self.obs_value_filter!r}` cannot filter "
                                     f"{self.uri} obs: {err}. Fix the expression (columns: {obs_columns}).") from err
        if not len(obs):
            raise InputDataError(f"`obs_value_filter={self.obs_value_filter!r}` selects no cell of {self.uri}: "
                                 "loosen it.")
        obs = obs.sort_values("soma_joinid", kind="stable")
        var = var.sort_values("soma_joinid", kind="stable").set_index("soma_joinid")
        self._joinids = (obs["soma_joinid"].to_numpy(np.int64), var.index.to_numpy(np.int64))
        columns = {kind: None if key is None else obs[key].to_numpy() for kind, key in keys.items()}
        return finish_meta(var, self.gene_id_key, len(obs), columns)

    def reader(self, layer=None) -> _SomaRows:
        """Make a lazy, picklable row reader of the selected cells' counts."""
        if self._joinids is None:
            raise InputDataError("Read the source's metadata first (`Corpus` does).")
        return _SomaRows(self, *self._joinids)


class _SomaRows:
    """Rows (positions among the selected cells) of a SOMA ``X`` layer, opened lazily per process."""

    def __init__(self, source: SomaSource, obs_joinids: np.ndarray, var_joinids: np.ndarray) -> None:
        self.source, self.obs_joinids = source, obs_joinids
        self.var_position = np.full(int(var_joinids.max()) + 1, -1, dtype=np.int64)
        self.var_position[var_joinids] = np.arange(len(var_joinids))
        self._pid, self._exp, self._x = None, None, None

    def __getstate__(self) -> dict:  # TileDB handles never cross processes
        return {**self.__dict__, "_pid": None, "_exp": None, "_x": None}

    def read(self, rows: np.ndarray, n_cols: int) -> sparse.csr_matrix:
        """``rows`` (sorted positions among the selected cells) as a float32 CSR matrix."""
        if self._pid != os.getpid():
            self._exp = self.source._open()
            self._x = self._exp.ms[self.source.measurement].X[self.source.layer]
            self._pid = os.getpid()
        ids = self.obs_joinids[rows]
        table = self._x.read(coords=(ids,)).tables().concat()
        r = np.searchsorted(ids, table["soma_dim_0"].to_numpy())
        c = self.var_position[table["soma_dim_1"].to_numpy()]
        data = table["soma_data"].to_numpy().astype(np.float32, copy=False)
        return sparse.csr_matrix((data, (r, c)), shape=(len(rows), n_cols))


def _member(collection, key: str, what: str, where: str):
    if key not in collection:
        raise InputDataError(f"`{what}={key!r}` is not in {where}: pass one of {list(collection.keys())}.")
    return collection[key]
