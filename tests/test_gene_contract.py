"""A foundation model carries across datasets: genes matched by identity, new categories welcome.

A model trained (or loaded) once is applied to AnnData objects whose genes, gene order, batches
and labels differ from its training data's. These tests are the contract a user relies on.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
from conftest import TINY, shared_file
from scipy import sparse

from scvi_cellplm import CellPLM, GeneAlignmentError, InputDataError

EXACT = 1e-6


@pytest.fixture(scope="module")
def model():
    """A tiny CellPLM trained on the bundled pancreas (donor 1, 2,000 genes; symbols)."""
    import scvi_cellplm

    scvi.settings.seed = 0
    adata = scvi_cellplm.datasets.pancreas_demo()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="cell_type")
    model = CellPLM(adata, **TINY)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model


def _copy(adata: ad.AnnData, genes=None, x=None) -> ad.AnnData:
    """A user's AnnData: counts in .X, obs and var as given, nothing registered."""
    genes = adata.var_names if genes is None else genes
    x = adata[:, genes].layers["counts"] if x is None else x
    out = ad.AnnData(sparse.csr_matrix(x), obs=adata.obs[["batch", "cell_type"]].copy(),
                     var=adata.var.loc[genes].copy() if set(genes) <= set(adata.var_names) else None)
    if out.var_names.tolist() != list(genes):
        out.var_names = list(genes)
    return out


def _embed(model, adata, **setup) -> np.ndarray:
    CellPLM.setup_anndata(adata, batch_key="batch", **setup)
    return model.get_latent_representation(adata)


def test_permuted_columns_give_identical_embeddings_and_outputs(model):
    reference = _embed(model, _copy(model.adata))
    order = np.random.default_rng(0).permutation(model.adata.n_vars)
    permuted = _copy(model.adata, model.adata.var_names[order])
    np.testing.assert_allclose(_embed(model, permuted), reference, atol=EXACT, rtol=0)
    # outputs follow the AnnData's own columns
    denoised = model.get_normalized_expression(permuted, indices=np.arange(30), return_numpy=True)
    own = model.get_normalized_expression(indices=np.arange(30), return_numpy=True)
    np.testing.assert_allclose(denoised, own[:, order], rtol=1e-5, atol=1e-7)


def test_extra_genes_are_dropped_and_change_nothing(model):
    reference = _embed(model, _copy(model.adata))
    extra = sparse.random(model.adata.n_obs, 300, density=0.1, format="csr", random_state=0)
    extra.data = np.round(extra.data * 20)
    wide = ad.AnnData(sparse.hstack([model.adata.layers["counts"], extra], format="csr"),
                      obs=model.adata.obs[["batch"]].copy())
    wide.var_names = [*model.adata.var_names, *(f"NOT_A_GENE_{i}" for i in range(300))]
    np.testing.assert_allclose(_embed(model, wide), reference, atol=EXACT, rtol=0)
    alignment = model.gene_alignment(wide)
    assert (alignment.n_matched, alignment.n_input, alignment.vocabulary_share) == (2000, 2300, 1.0)


def test_ensembl_ids_match_a_symbol_vocabulary_offline(model):
    """The same cells with Ensembl ids instead of symbols: matched through the shipped tables."""
    adata = _copy(model.adata)
    ids = model.adata.var["gene_ids"].astype(str).to_numpy()
    adata.var["ensembl"] = np.where(ids == "", adata.var_names, ids)
    alignment_report = None
    CellPLM.setup_anndata(adata, batch_key="batch", gene_id_key="ensembl")
    alignment_report = model.gene_alignment(adata)
    assert alignment_report.n_symbol > 0.8 * adata.n_vars
    matched = alignment_report.index >= 0
    # each matched column sits on the vocabulary row of its own symbol
    assert (np.asarray(model.gene_vocabulary)[alignment_report.index[matched]]
            == adata.var_names[matched]).mean() > 0.99
    z = model.get_latent_representation(adata)
    reference = model.get_latent_representation()
    if matched.all():
        np.testing.assert_allclose(z, reference, atol=EXACT, rtol=0)
    else:  # genes without a unique id are unmeasured: close, not equal
        assert np.corrcoef(z.ravel(), reference.ravel())[0, 1] > 0.99


def test_fewer_genes_are_unmeasured_not_read_as_positional_columns(model):
    """Defined behaviour for a subset: the missing vocabulary genes are unmeasured. For the
    (uncentred) official embedder that equals their counts being zero; the loss ignores them."""
    keep = model.adata.var_names[::2]
    subset = _copy(model.adata, keep)
    zeroed = model.adata.layers["counts"].copy().tolil()
    zeroed[:, 1::2] = 0
    zeroed_full = _copy(model.adata, x=zeroed.tocsr())
    np.testing.assert_allclose(_embed(model, subset), _embed(model, zeroed_full), atol=EXACT, rtol=0)
    alignment = model.gene_alignment(subset)
    assert alignment.n_matched == 1000 and alignment.vocabulary_share == 0.5
    denoised = model.get_normalized_expression(subset, indices=np.arange(5), return_numpy=True)
    assert denoised.shape == (5, 1000) and np.allclose(denoised.sum(1), 1.0, atol=1e-5)


def test_unknown_genes_are_a_named_error_and_gene_less_data_says_so(model):
    nothing = ad.AnnData(sparse.csr_matrix(np.ones((5, 3), dtype=np.float32)),
                         obs=pd.DataFrame({"batch": ["a"] * 5}, index=[f"c{i}" for i in range(5)]))
    nothing.var_names = ["FOO1", "BAR2", "BAZ3"]
    with pytest.raises(GeneAlignmentError, match="FOO1"):
        _embed(model, nothing)
    numbered = nothing.copy()
    numbered.var_names = ["gene_0000", "gene_0001", "gene_0002"]
    with pytest.raises(GeneAlignmentError, match="no identifiers"):
        _embed(model, numbered)


def test_new_batches_and_labels_never_block_inference(model):
    other = _copy(model.adata)
    other.obs["batch"] = "a_new_site"
    other.obs["cell_type"] = "a_new_type"
    z = _embed(model, other, labels_key="cell_type")
    assert np.isfinite(z).all()
    with pytest.raises(InputDataError, match="transform_batch"):
        model.get_normalized_expression(other, indices=np.arange(5))
    known = model.decoder_batch_categories_[0]
    assert model.get_normalized_expression(other, indices=np.arange(5), transform_batch=[known]).shape == (5, 2000)


def test_data_without_the_models_setup_asks_for_its_own(model):
    """The model was set up with ``layer='counts'``; a file with counts in .X must say so."""
    plain = _copy(model.adata)
    with pytest.raises(InputDataError, match="setup_anndata"):
        model.get_latent_representation(plain)


def test_query_with_new_labels_and_new_batches_maps_like_scarches(model):
    query = _copy(model.adata[:400])
    query.obs["batch"] = "query_site"
    query.obs["cell_type"] = query.obs["cell_type"].astype(str)
    query.obs.iloc[:50, query.obs.columns.get_loc("cell_type")] = "t_cell_never_seen"
    query.layers["counts"] = query.X.copy()
    reference_z = model.get_latent_representation()
    q = CellPLM.load_query_data(query, model)
    labels = q.adata_manager.get_state_registry("labels").categorical_mapping
    assert "t_cell_never_seen" in list(labels)
    q.train(max_epochs=1, enable_progress_bar=False)
    assert np.isfinite(q.get_latent_representation()).all()
    # frozen: the reference part of the weights is untouched, so reference embeddings are too
    np.testing.assert_allclose(q.get_latent_representation(model.adata), reference_z, atol=EXACT)
    without_labels = _copy(model.adata[:100]).copy()
    del without_labels.obs["cell_type"]
    without_labels.layers["counts"] = without_labels.X.copy()
    assert np.isfinite(CellPLM.load_query_data(without_labels, model).get_latent_representation()).all()


# ------------------------------------------------------------------ real data with other genes
@pytest.mark.parametrize("name", ["pbmc3k_raw.h5ad", "baron_human_pancreas_4donors.h5ad"])
def test_pancreas_model_embeds_other_datasets_by_gene_identity(model, name):
    """Other files as users have them (raw counts in .X, tens of thousands of genes, other batches):
    embedded by gene identity; restricting the file to the model's genes changes nothing."""
    other = ad.read_h5ad(shared_file(name))
    other.var_names_make_unique()
    if "batch" not in other.obs:
        other.obs["batch"] = "pbmc"
    user = other.copy()
    full = _embed(model, user)
    alignment = model.gene_alignment(user)
    print(f"{name}: {alignment.summary()}")  # the overlap report of the closing note
    assert alignment.n_matched > 0.9 * len(model.gene_vocabulary)
    shared = [g for g in model.gene_vocabulary if g in set(other.var_names)]
    narrow = other[:, shared[::-1]].copy()
    np.testing.assert_allclose(_embed(model, narrow), full, atol=EXACT, rtol=0)
    assert np.isfinite(full).all() and full.shape == (other.n_obs, TINY["n_latent"])
