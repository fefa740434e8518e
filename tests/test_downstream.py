"""Downstream APIs: annotation by fine-tuning, query mapping, denoising evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY

from scvi_cellplm import CellPLM, CellPLMAnnotator, InputDataError
from scvi_cellplm.evaluation import denoising_errors, hold_out_counts


@pytest.fixture
def reference(small_pancreas):
    """Model trained on two libraries; the third is held out as query."""
    ref = small_pancreas[small_pancreas.obs["batch"] != "human1_lib3"].copy()
    CellPLM.setup_anndata(ref, layer="counts", batch_key="batch")
    model = CellPLM(ref, **TINY)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model


def test_annotator_predicts_training_categories(trained_small, small_pancreas):
    adata = small_pancreas
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    query = (adata.obs["batch"] == "human1_lib3").to_numpy()
    adata.obs.loc[query, "label"] = "Unknown"
    ann = CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="label")
    ann.train(max_epochs=3, enable_progress_bar=False)
    pred = ann.predict()
    assert len(pred) == adata.n_obs
    assert set(pred.categories) == set(adata.obs.loc[~query, "label"])
    soft = ann.predict(soft=True)
    assert isinstance(soft, pd.DataFrame) and list(soft.columns) == list(pred.categories)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1, atol=1e-5)
    assert "Unknown" not in soft.columns
    adata.obs["cellplm_prediction"] = ann.predict()
    assert adata.obs["cellplm_prediction"].dtype == "category"


def test_frozen_encoder_keeps_backbone_weights(trained_small, small_pancreas):
    ann = CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="cell_type", freeze_encoder=True)
    before = {k: v.clone() for k, v in ann.module.backbone.state_dict().items()}
    head_before = [p.clone() for p in ann.module.head.parameters()]
    ann.train(max_epochs=2, enable_progress_bar=False)
    for k, v in ann.module.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, ann.module.head.parameters()))
    np.testing.assert_allclose(ann.get_latent_representation(),
                               trained_small.get_latent_representation(), atol=1e-5)


def test_annotator_save_load_and_query_without_labels(trained_small, small_pancreas, tmp_path):
    ann = CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="cell_type")
    ann.train(max_epochs=1, enable_progress_bar=False)
    pred = ann.predict()
    ann.save(tmp_path / "ann")
    query = small_pancreas.copy()
    del query.obs["cell_type"]
    loaded = CellPLMAnnotator.load(tmp_path / "ann", adata=query)
    np.testing.assert_array_equal(np.asarray(loaded.predict()), np.asarray(pred))


def test_annotator_loss_weighs_rare_labels_up_by_default(trained_small, small_pancreas):
    """Default class_balance=0.5: weight (n / (K n_k)) ** 0.5 per label; 0 is the plain cross-entropy."""
    ann = CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="cell_type")
    counts = small_pancreas.obs["cell_type"].value_counts().reindex(ann.label_categories_).to_numpy()
    want = (counts.sum() / (len(counts) * counts)) ** 0.5
    np.testing.assert_allclose(ann.module.class_weights.numpy(), want, rtol=1e-6)
    rare, common = counts.argmin(), counts.argmax()
    assert ann.module.class_weights[rare] > ann.module.class_weights[common]
    assert "class_weights" not in ann.module.state_dict()  # training only: not in the saved weights
    plain = CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="cell_type", class_balance=0)
    assert plain.module.class_weights is None
    with pytest.raises(InputDataError, match="class_balance"):
        CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="cell_type", class_balance=-1)


def test_annotator_needs_labels(trained_small, small_pancreas):
    with pytest.raises(InputDataError, match="absent"):
        CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="absent")


def test_query_mapping_does_not_change_reference_weights(reference, small_pancreas):
    query = small_pancreas[small_pancreas.obs["batch"] == "human1_lib3"].copy()
    query.obs["batch"] = query.obs["batch"].cat.rename_categories({"human1_lib3": "new_lib"})
    ref_state = {k: v.clone() for k, v in reference.module.state_dict().items()}
    model = CellPLM.load_query_data(query, reference)
    assert model.summary_stats.n_batch == 3
    z_before = model.get_latent_representation()
    model.train(max_epochs=2, enable_progress_bar=False)
    state = model.module.state_dict()
    for k, v in ref_state.items():
        if k.endswith("batch.embedding.weight"):
            torch.testing.assert_close(state[k][: v.shape[0]], v, rtol=0, atol=0)
        else:
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    new_rows = [state[k][ref_state[k].shape[0]:] for k in ref_state if k.endswith("batch.embedding.weight")]
    assert new_rows and all(r.shape[0] == 1 for r in new_rows)
    np.testing.assert_allclose(model.get_latent_representation(), z_before, atol=1e-6)
    assert model.get_normalized_expression(return_numpy=True).shape == query.shape


def test_query_mapping_trains_the_new_batch_rows(reference, small_pancreas):
    query = small_pancreas[small_pancreas.obs["batch"] == "human1_lib3"].copy()
    model = CellPLM.load_query_data(query, reference)
    key = next(k for k in model.module.state_dict() if k.endswith("batch.embedding.weight"))
    before = model.module.state_dict()[key][-1].clone()
    model.train(max_epochs=3, enable_progress_bar=False)
    assert not torch.equal(model.module.state_dict()[key][-1], before)


def test_hold_out_counts_and_denoising_errors(small_pancreas, trained_small):
    corrupted, held = hold_out_counts(small_pancreas, layer="counts", fraction=0.1, seed=0)
    nnz = small_pancreas.layers["counts"].nnz
    assert abs(len(held.values) - 0.1 * nnz) < 0.02 * nnz
    assert corrupted.layers["counts"].nnz == nnz - len(held.values)
    assert (small_pancreas.layers["counts"] != small_pancreas.layers["counts"]).nnz == 0
    assert np.all(held.values > 0)
    perfect = small_pancreas.layers["counts"].toarray()
    assert denoising_errors(perfect, held) == {"rmse": 0.0, "mae": 0.0}
    pred = trained_small.get_normalized_expression(corrupted, library_size="latent", return_numpy=True)
    errors = denoising_errors(pred, held)
    assert errors["rmse"] > 0 and errors["mae"] <= errors["rmse"]


def test_annotator_predicts_new_data_without_labels_column(trained_small, small_pancreas):
    ann = CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="cell_type")
    ann.train(max_epochs=1, enable_progress_bar=False)
    query = small_pancreas[small_pancreas.obs["batch"] == "human1_lib3"].copy()
    expected = np.asarray(ann.predict(indices=np.flatnonzero(small_pancreas.obs["batch"] == "human1_lib3")))
    del query.obs["cell_type"]
    with pytest.warns(UserWarning, match="Missing labels key"):
        pred = ann.predict(query)
    assert len(pred) == query.n_obs
    np.testing.assert_array_equal(np.asarray(pred), expected)


def test_query_with_unseen_label_categories_is_predicted_with_a_warning(trained_small, small_pancreas):
    ann = CellPLMAnnotator.from_cellplm_model(trained_small, labels_key="cell_type")
    ann.train(max_epochs=1, enable_progress_bar=False)
    query = small_pancreas[small_pancreas.obs["batch"] == "human1_lib3"].copy()
    expected = np.asarray(ann.predict(query))
    labels = query.obs["cell_type"].astype(str).to_numpy()
    labels[:5] = "a_type_never_seen"
    query.obs["cell_type"] = pd.Categorical(labels)
    with pytest.warns(UserWarning, match="a_type_never_seen"):
        pred = ann.predict(query)
    np.testing.assert_array_equal(np.asarray(pred), expected)
    assert "a_type_never_seen" not in pred.categories
