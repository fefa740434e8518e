"""Offline gene-id mapping and vocabulary alignment."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import shared_file

from scvi_cellplm import CellPLM, GeneAlignmentError
from scvi_cellplm.io import align_genes, gene_table, symbols_to_ensembl


def test_human_symbols_map_to_the_ids_of_the_shipped_table(pancreas):
    """Bundled pancreas: symbols → Ensembl agree with the ids shipped in ``var['gene_ids']``."""
    ids = pancreas.var["gene_ids"].astype(str).to_numpy()
    mapped = np.asarray(symbols_to_ensembl(pancreas.var_names, species="human"))
    both = (ids != "") & (mapped != "")
    assert both.sum() > 0.8 * pancreas.n_vars
    assert (mapped[both] == ids[both]).mean() > 0.99


def test_align_symbols_and_versioned_ids_to_an_ensembl_vocabulary(pancreas):
    vocab = [i for i in pancreas.var["gene_ids"].astype(str) if i][:500][::-1]
    genes = list(pancreas.var_names[:50]) + [vocab[0] + ".7"]
    alignment = align_genes(genes, vocab + ["ENSG00000000003"], species="human")
    assert alignment.n_symbol > 0
    assert alignment.index[-1] == -1 or vocab[alignment.index[-1]] == vocab[0]
    for gene, row in zip(genes[:50], alignment.index[:50]):
        if row >= 0:
            assert symbols_to_ensembl([gene], "human")[0] == (vocab + ["ENSG00000000003"])[row]


def test_mouse_symbols_align_on_real_mouse_data():
    mouse = ad.read_h5ad(shared_file("mouse_10k_subset.h5ad"))
    vocab = mouse.var["gene_ids"].astype(str).tolist()
    alignment = align_genes(list(mouse.var_names), vocab, species="mouse")
    assert alignment.n_matched > 0.9 * mouse.n_vars
    matched = alignment.index >= 0
    assert (np.asarray(vocab)[alignment.index[matched]] == np.asarray(vocab)[matched]).mean() > 0.95


def test_mouse_table_ships_with_the_package():
    table = gene_table("mouse").head(300)
    table = table[~table["symbol"].duplicated(keep=False)]
    alignment = align_genes(table["symbol"].tolist(), table["gene_id"].tolist()[::-1], species="mouse")
    assert alignment.n_matched >= 0.9 * len(table)


def test_zero_overlap_is_an_error_naming_genes():
    with pytest.raises(GeneAlignmentError, match="FOO1"):
        align_genes(["FOO1", "BAR2"], ["ENSG00000000003", "ENSG00000000005"])


def test_low_overlap_warns_with_the_numbers(pancreas):
    """Data that measures under half of the vocabulary warns, with the share; extra genes of the
    data are dropped without a warning (a model's vocabulary is usually a subset of a dataset's)."""
    ids = [i for i in pancreas.var["gene_ids"].astype(str) if i]
    with pytest.warns(UserWarning, match=r"10 of the model's 100 vocabulary genes measured \(10\.0%\)"):
        align_genes(ids[:10], ids[:100])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alignment = align_genes(ids, ids[:10])
    assert alignment.n_matched == 10 and alignment.vocabulary_share == 1.0


def test_ids_that_are_not_gene_identifiers_say_so():
    with pytest.raises(GeneAlignmentError, match="no identifiers"):
        align_genes([str(i) for i in range(50)], ["ENSG00000000003", "ENSG00000000005"])


def test_duplicate_gene_ids_are_an_error(small_pancreas):
    small_pancreas.var["ids"] = "same"
    CellPLM.setup_anndata(small_pancreas, layer="counts", gene_id_key="ids")
    with pytest.raises(GeneAlignmentError, match="unique"):
        CellPLM(small_pancreas)
