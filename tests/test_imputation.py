"""Joint training on datasets with different gene panels, and spatial gene imputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY
from scipy import sparse

from scvi_cellplm import CellPLM, InputDataError
from scvi_cellplm.spatial import impute_genes, joint_anndata
from scvi_cellplm.spatial._impute import DATASET_COLUMN, SAMPLE_COLUMN


@pytest.fixture
def panel_and_reference(small_pancreas):
    """A 'spatial' panel (first 100 genes, coordinates) and a reference (all 300 genes)."""
    rng = np.random.default_rng(0)
    cells = rng.permutation(small_pancreas.n_obs)
    spatial = small_pancreas[np.sort(cells[:300])][:, :100].copy()
    spatial.X = spatial.layers["counts"].copy()
    spatial.obsm["spatial"] = rng.random((spatial.n_obs, 2)) * 1000
    reference = small_pancreas[np.sort(cells[300:])].copy()
    reference.X = reference.layers["counts"].copy()
    return spatial, reference


def test_joint_anndata_marks_datasets_and_zero_fills(panel_and_reference):
    spatial, reference = panel_and_reference
    joint = joint_anndata(spatial, reference)
    assert joint.n_obs == spatial.n_obs + reference.n_obs and joint.n_vars == reference.n_vars
    assert set(joint.obs[DATASET_COLUMN]) == {"spatial", "reference"}
    is_ref = (joint.obs[DATASET_COLUMN] == "reference").to_numpy()
    assert np.isnan(joint.obsm["spatial"][is_ref]).all()
    assert np.isfinite(joint.obsm["spatial"][~is_ref]).all()
    panel_only = ~joint.var_names.isin(spatial.var_names)
    assert joint[~is_ref][:, panel_only].X.nnz == 0
    assert spatial.n_vars == 100  # inputs untouched


def test_unmeasured_genes_never_enter_the_loss(panel_and_reference):
    spatial, reference = panel_and_reference
    joint = joint_anndata(spatial, reference)
    CellPLM.setup_anndata(joint, sample_key=SAMPLE_COLUMN, dataset_key=DATASET_COLUMN)
    model = CellPLM(joint, **TINY)
    mask = model.module.dataset_gene_mask
    codes = list(model.adata_manager.get_state_registry("dataset").categorical_mapping)
    sp_code = codes.index("spatial")
    sp_counts = np.asarray(joint[joint.obs[DATASET_COLUMN] == "spatial"].X.sum(0)).ravel()
    measured = joint.var_names.isin(spatial.var_names) & (sp_counts > 0)
    np.testing.assert_array_equal(mask[sp_code].numpy(), measured)
    # loss on spatial cells is the same whatever the model predicts for unmeasured genes
    is_sp = np.flatnonzero(joint.obs[DATASET_COLUMN].to_numpy() == "spatial")
    x = torch.as_tensor(joint.X[is_sp].toarray())
    tensors = {"X": x, "sentence": torch.zeros(len(is_sp), dtype=torch.long),
               "batch": torch.zeros(len(is_sp), 1), "dataset": torch.full((len(is_sp), 1), sp_code)}
    model.module.eval()
    inf, gen = model.module(tensors, compute_loss=False)
    loss_a = model.module.loss(tensors, inf, gen).loss
    noisy = {k: v.clone() for k, v in gen.items() if torch.is_tensor(v)}
    unmeasured = ~mask[sp_code]
    noisy["px_scale"][:, unmeasured] = torch.rand_like(noisy["px_scale"][:, unmeasured]) * 100
    loss_b = model.module.loss(tensors, inf, noisy).loss
    torch.testing.assert_close(loss_a, loss_b)
    # and the embedding reads only genes both datasets measured
    x2 = x.clone()
    x2[:, unmeasured] = 50.0
    torch.testing.assert_close(model.module.inference(x, tensors["sentence"])["qzm"],
                               model.module.inference(x2, tensors["sentence"])["qzm"])


def test_impute_genes_returns_requested_genes_for_spatial_cells(panel_and_reference):
    spatial, reference = panel_and_reference
    genes = list(reference.var_names[100:110])
    result, model = impute_genes(spatial, reference, genes, max_epochs=1, model_kwargs=TINY)
    assert list(result.columns) == genes and list(result.index) == list(spatial.obs_names)
    assert np.isfinite(result.to_numpy()).all() and (result.to_numpy() >= 0).all()
    assert spatial.obsm["cellplm_imputed"].shape == (spatial.n_obs, 10)


def test_gaussian_likelihood_for_non_count_data_and_nb_refused(small_pancreas):
    small_pancreas.layers["lognorm"] = small_pancreas.layers["counts"].log1p()
    with pytest.warns(UserWarning, match="non-integer"):
        CellPLM.setup_anndata(small_pancreas, layer="lognorm", batch_key="batch")
    with pytest.raises(InputDataError, match="gaussian"):
        CellPLM(small_pancreas, **TINY)
    model = CellPLM(small_pancreas, gene_likelihood="gaussian", **TINY)
    model.train(max_epochs=1, enable_progress_bar=False)
    pred = model.get_normalized_expression(return_numpy=True)
    assert pred.shape == small_pancreas.shape and np.isfinite(pred).all()
    assert sparse.issparse(small_pancreas.layers["lognorm"])


def test_quantile_rescale_puts_spatial_genes_on_the_reference_distribution(panel_and_reference):
    spatial, reference = panel_and_reference
    spatial.X = sparse.csr_matrix(spatial.X.toarray() * 3.7 + 0.5)  # another technology's scale
    joint = joint_anndata(spatial, reference, rescale="quantile")
    is_sp = (joint.obs[DATASET_COLUMN] == "spatial").to_numpy()
    gene = joint.var_names.get_loc(spatial.var_names[0])
    sp_values = joint.X[is_sp][:, gene].toarray().ravel()
    ref_values = joint.X[~is_sp][:, gene].toarray().ravel()
    # same distribution as the reference (quantiles), same order as the input (ranks)
    np.testing.assert_allclose(np.quantile(sp_values, [0.1, 0.5, 0.9]),
                               np.quantile(ref_values, [0.1, 0.5, 0.9]), atol=0.05)
    original = spatial.X[:, 0].toarray().ravel()
    assert (np.diff(sp_values[np.argsort(original, kind="stable")]) >= -1e-7).all()
    assert spatial.X.max() > 3  # input untouched
    with pytest.raises(ValueError, match="rescale"):
        joint_anndata(spatial, reference, rescale="zscore")
