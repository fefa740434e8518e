"""Models saved by the previous release load with the current code and give the same outputs.

The files in ``tests/data/old_release/`` were written by commit ``ea07887`` (before the gene
vocabulary contract: the module held a ``gene_index`` buffer, ``dataset_gene_mask`` was in column
space, the annotator had no ``label_categories`` argument, and the metadata stored neither the
gene vocabulary nor the decoder's batch categories), together with the outputs that release
computed (``expected.npz``). ``tests/data/make_old_release_models.py`` says how they were made.

The last section loads ``model.pt`` files as ``save`` wrote them just before the safetensors
format (#23), made by ``tests/legacy_format.py`` from current models.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
from conftest import TINY
from legacy_format import save_legacy

from scvi_cellplm import CellPLM, CellPLMAnnotator, CheckpointError

OLD = Path(__file__).parent / "data" / "old_release"
ATOL = 1e-5


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(OLD / name / "expected.npz") as data:
        return dict(data)


def saved_adata(name: str) -> anndata.AnnData:
    return anndata.read_h5ad(OLD / name / "adata.h5ad")


def permuted_columns(adata: anndata.AnnData) -> anndata.AnnData:
    """``adata`` with its genes (columns) in another order."""
    order = np.random.default_rng(1).permutation(adata.n_vars)
    assert (order != np.arange(adata.n_vars)).any()
    return adata[:, order].copy()


def saved_without_new_fields(name: str) -> None:
    """The fixture really is an old-format file (guards against regenerating it with new code)."""
    payload = torch.load(OLD / name / "model.pt", weights_only=True)
    metadata = json.loads(payload["metadata"])
    assert "gene_vocabulary" not in metadata
    assert "decoder_batch_categories" not in metadata


@pytest.mark.parametrize("name", ["cellplm", "cellplm_gene_ids", "annotator", "cellplm_vocabulary"])
def test_the_fixtures_are_files_of_the_previous_release(name):
    saved_without_new_fields(name)


# ---------------------------------------------------------------- plain CellPLM (var_names)
def test_old_cellplm_loads_with_its_saved_anndata_and_gives_the_old_embedding():
    model = CellPLM.load(str(OLD / "cellplm"))
    np.testing.assert_allclose(model.get_latent_representation(), expected("cellplm")["latent"],
                               atol=ATOL, rtol=0)


def test_old_gmvae_keeps_its_most_likely_cluster_embedding_after_saving_again(tmp_path):
    """Files from before the mixture-mean default keep the rule they were made with."""
    model = CellPLM.load(str(OLD / "cellplm"))
    assert model.module.latent_distribution == "gmvae"
    assert model.module.latent.embedding == "cluster"
    assert model.module.input_target_sum is None  # and reads raw counts, as it was trained to
    assert model.module.sample_norm is None  # and normalises each cell token on its own
    model.save(str(tmp_path / "new"))
    again = CellPLM.load(str(tmp_path / "new"), adata=saved_adata("cellplm")).module
    assert again.latent.embedding == "cluster" and again.input_target_sum is None


def test_old_cellplm_gives_the_old_normalized_expression():
    model = CellPLM.load(str(OLD / "cellplm"))
    normalized = model.get_normalized_expression(library_size=1e4, return_numpy=True)
    want = expected("cellplm")["normalized"]
    np.testing.assert_allclose(normalized[: len(want)], want, atol=ATOL, rtol=1e-5)


def test_old_cellplm_recovers_its_vocabulary_and_decoder_batches_from_the_old_metadata():
    model = CellPLM.load(str(OLD / "cellplm"))
    adata = saved_adata("cellplm")
    assert list(model.gene_vocabulary) == list(adata.var_names)
    assert list(model.decoder_batch_categories_) == list(adata.obs["batch"].cat.categories)


def test_old_cellplm_matches_genes_by_name_on_data_with_permuted_columns():
    adata = permuted_columns(saved_adata("cellplm"))
    model = CellPLM.load(str(OLD / "cellplm"), adata=adata)
    np.testing.assert_allclose(model.get_latent_representation(), expected("cellplm")["latent"],
                               atol=ATOL, rtol=0)


def test_old_cellplm_normalized_expression_follows_the_columns_of_permuted_data():
    original = saved_adata("cellplm")
    adata = permuted_columns(original)
    model = CellPLM.load(str(OLD / "cellplm"), adata=adata)
    normalized = model.get_normalized_expression(library_size=1e4)
    want = expected("cellplm")["normalized"]
    got = normalized.loc[:, list(original.var_names)].to_numpy()[: len(want)]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_old_cellplm_saved_again_in_the_new_format_loads_with_the_same_embedding(tmp_path):
    model = CellPLM.load(str(OLD / "cellplm"))
    model.save(str(tmp_path / "new"), save_anndata=True)
    again = CellPLM.load(str(tmp_path / "new"))
    np.testing.assert_allclose(again.get_latent_representation(), expected("cellplm")["latent"],
                               atol=ATOL, rtol=0)
    assert list(again.gene_vocabulary) == list(model.gene_vocabulary)


def test_old_cellplm_resaved_in_the_new_format_also_loads_on_permuted_columns(tmp_path):
    CellPLM.load(str(OLD / "cellplm")).save(str(tmp_path / "new"))
    again = CellPLM.load(str(tmp_path / "new"), adata=permuted_columns(saved_adata("cellplm")))
    np.testing.assert_allclose(again.get_latent_representation(), expected("cellplm")["latent"],
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------- CellPLM set up with gene ids
def test_old_cellplm_with_gene_ids_loads_and_gives_the_old_embedding():
    model = CellPLM.load(str(OLD / "cellplm_gene_ids"))
    np.testing.assert_allclose(model.get_latent_representation(),
                               expected("cellplm_gene_ids")["latent"], atol=ATOL, rtol=0)


def test_old_cellplm_with_gene_ids_takes_its_vocabulary_from_the_gene_id_column():
    model = CellPLM.load(str(OLD / "cellplm_gene_ids"))
    assert list(model.gene_vocabulary) == list(saved_adata("cellplm_gene_ids").var["gene_ids"])


def test_old_cellplm_with_gene_ids_must_first_be_loaded_on_its_training_genes():
    """Its file lacks the vocabulary, which only its training AnnData (in order) can give."""
    adata = permuted_columns(saved_adata("cellplm_gene_ids"))
    with pytest.raises(CheckpointError, match="load it on its training AnnData once and save it again"):
        CellPLM.load(str(OLD / "cellplm_gene_ids"), adata=adata)


def test_old_cellplm_with_gene_ids_resaved_loads_on_permuted_columns(tmp_path):
    CellPLM.load(str(OLD / "cellplm_gene_ids")).save(str(tmp_path / "new"))
    adata = permuted_columns(saved_adata("cellplm_gene_ids"))
    again = CellPLM.load(str(tmp_path / "new"), adata=adata)
    np.testing.assert_allclose(again.get_latent_representation(),
                               expected("cellplm_gene_ids")["latent"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- annotator
def test_old_annotator_loads_and_gives_the_old_embedding_and_probabilities():
    ann = CellPLMAnnotator.load(str(OLD / "annotator"))
    want = expected("annotator")
    np.testing.assert_allclose(ann.get_latent_representation(), want["latent"], atol=ATOL, rtol=0)
    probs = ann.predict(soft=True)
    assert list(probs.columns) == list(want["label_categories"])
    np.testing.assert_allclose(probs.to_numpy(), want["probs"], atol=ATOL, rtol=0)


def test_old_annotator_gets_its_label_categories_from_the_saved_registry():
    ann = CellPLMAnnotator.load(str(OLD / "annotator"))
    assert list(ann.label_categories_) == list(expected("annotator")["label_categories"])


def test_old_annotator_saved_again_in_the_new_format_predicts_the_same(tmp_path):
    CellPLMAnnotator.load(str(OLD / "annotator")).save(str(tmp_path / "new"), save_anndata=True)
    again = CellPLMAnnotator.load(str(tmp_path / "new"))
    want = expected("annotator")
    np.testing.assert_allclose(again.get_latent_representation(), want["latent"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(again.predict(soft=True).to_numpy(), want["probs"], atol=ATOL, rtol=0)


def test_old_annotator_predicts_the_same_on_permuted_columns():
    adata = permuted_columns(saved_adata("annotator"))
    ann = CellPLMAnnotator.load(str(OLD / "annotator"), adata=adata)
    np.testing.assert_allclose(ann.predict(soft=True).to_numpy(), expected("annotator")["probs"],
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------- gene_index + dataset_gene_mask
def test_old_model_with_gene_index_and_dataset_mask_loads_and_gives_the_old_outputs():
    """Its file holds the retired ``gene_index`` buffer and a column-space ``dataset_gene_mask``."""
    state = torch.load(OLD / "cellplm_vocabulary" / "model.pt", weights_only=True)["model_state_dict"]
    assert "gene_index" in state and "dataset_gene_mask" in state
    model = CellPLM.load(str(OLD / "cellplm_vocabulary"))
    want = expected("cellplm_vocabulary")
    np.testing.assert_allclose(model.get_latent_representation(), want["latent"], atol=ATOL, rtol=0)
    normalized = model.get_normalized_expression(library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(normalized[: len(want["normalized"])], want["normalized"],
                               atol=ATOL, rtol=1e-5)


def test_old_model_with_dataset_mask_imputes_the_unmeasured_genes_as_before():
    model = CellPLM.load(str(OLD / "cellplm_vocabulary"))
    want = expected("cellplm_vocabulary")
    imputed = model.get_normalized_expression(library_size=1e4, transform_dataset="reference",
                                              return_numpy=True)
    np.testing.assert_allclose(imputed[want["panel_rows"]], want["imputed"], atol=ATOL, rtol=1e-5)


def test_old_model_with_explicit_vocabulary_keeps_it():
    model = CellPLM.load(str(OLD / "cellplm_vocabulary"))
    adata = saved_adata("cellplm_vocabulary")
    assert list(model.gene_vocabulary[: adata.n_vars]) == list(adata.var_names[::-1])
    assert len(model.gene_vocabulary) == adata.n_vars + 10


def test_old_model_with_gene_index_gives_the_same_embedding_on_permuted_columns():
    adata = permuted_columns(saved_adata("cellplm_vocabulary"))
    model = CellPLM.load(str(OLD / "cellplm_vocabulary"), adata=adata)
    np.testing.assert_allclose(model.get_latent_representation(),
                               expected("cellplm_vocabulary")["latent"], atol=ATOL, rtol=0)


def test_old_model_with_gene_index_saved_again_gives_the_same_outputs(tmp_path):
    CellPLM.load(str(OLD / "cellplm_vocabulary")).save(str(tmp_path / "new"), save_anndata=True)
    again = CellPLM.load(str(tmp_path / "new"))
    want = expected("cellplm_vocabulary")
    np.testing.assert_allclose(again.get_latent_representation(), want["latent"], atol=ATOL, rtol=0)
    imputed = again.get_normalized_expression(library_size=1e4, transform_dataset="reference",
                                              return_numpy=True)
    np.testing.assert_allclose(imputed[want["panel_rows"]], want["imputed"], atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------- model.pt of the format before safetensors
@pytest.fixture
def legacy_folder(pancreas_session, tmp_path):
    """A CellPLM and a CellPLMAnnotator saved as ``model.pt`` exactly as ``save`` wrote it before #23."""
    adata = pancreas_session[::10, :120].copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    model = CellPLM(adata, **TINY)
    save_legacy(model, tmp_path / "cellplm", save_anndata=True)
    annotator = CellPLMAnnotator.from_cellplm_model(model, labels_key="cell_type", n_head_hidden=8)
    save_legacy(annotator, tmp_path / "annotator", save_anndata=True)
    return tmp_path, model, annotator


def test_model_pt_of_the_format_before_safetensors_loads_with_the_same_outputs(legacy_folder):
    folder, model, annotator = legacy_folder
    assert sorted(p.name for p in (folder / "cellplm").iterdir()) == ["adata.h5ad", "model.pt"]
    loaded = CellPLM.load(str(folder / "cellplm"))
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    assert list(loaded.gene_vocabulary) == list(model.gene_vocabulary)
    assert loaded.decoder_batch_categories_ == model.decoder_batch_categories_
    assert CellPLM.load_registry(str(folder / "cellplm"))["setup_args"]["batch_key"] == "batch"
    ann = CellPLMAnnotator.load(str(folder / "annotator"))
    np.testing.assert_array_equal(ann.predict(soft=True).to_numpy(), annotator.predict(soft=True).to_numpy())


def test_model_pt_saved_again_becomes_safetensors_and_the_legacy_file_goes(legacy_folder):
    folder, model, _ = legacy_folder
    loaded = CellPLM.load(str(folder / "cellplm"))
    with pytest.raises(CheckpointError, match="already exists"):
        loaded.save(str(folder / "cellplm"))
    loaded.save(str(folder / "cellplm"), overwrite=True)
    assert sorted(p.name for p in (folder / "cellplm").iterdir()) == ["adata.h5ad", "metadata.json",
                                                                      "model.safetensors"]
    again = CellPLM.load(str(folder / "cellplm"))
    np.testing.assert_array_equal(again.get_latent_representation(), model.get_latent_representation())


def test_model_pt_is_found_by_load_pretrained_and_from_pretrained(legacy_folder, tmp_path):
    from scvi_cellplm.pretrain import load_pretrained

    folder, model, _ = legacy_folder
    (tmp_path / "run").mkdir()
    (folder / "cellplm").rename(tmp_path / "run" / "model")  # a pretraining OUT_DIR of before
    adata = model.adata.copy()
    for loaded in (load_pretrained(tmp_path / "run", adata), CellPLM.from_pretrained(tmp_path / "run" / "model")):
        np.testing.assert_array_equal(loaded.get_latent_representation(adata), model.get_latent_representation())
