"""Reliability (issue #20): no silent wrong result, no lost file, no raw traceback for a user's mistake.

One section per class of failure; ``docs/user_guide/reliability.md`` states the contract these
tests check (what is refused, what is warned, what is repaired).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from legacy_format import save_legacy

from scvi_cellplm import (
    CellPLM,
    CellPLMAnnotator,
    CellPLMPerturbation,
    CheckpointError,
    GeneAlignmentError,
    InputDataError,
)
from scvi_cellplm._constants import LEGACY_MODEL_FILE, METADATA_FILE
from scvi_cellplm.cli import main

MICRO = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "n_latent": 4, "n_clusters": 2}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _spatial(adata: ad.AnnData, coords: np.ndarray, **model_kwargs) -> CellPLM:
    adata.obsm["spatial"] = coords
    _quiet(CellPLM.setup_anndata, adata, layer="counts", spatial_key="spatial")
    torch.manual_seed(0)
    return CellPLM(adata, **MICRO, **model_kwargs)


@pytest.fixture
def cells(small_pancreas) -> ad.AnnData:
    """200 cells x 300 genes (one batch-free sample)."""
    return small_pancreas[:200].copy()


# ----------------------------------------------------------------- 1. coordinates
@pytest.mark.parametrize("bad", [np.inf, -np.inf, 1e308, -1e200, 1e35])
def test_non_finite_or_overflowing_coordinates_are_missing_positions(cells, bad):
    """A cell with an infinite or overflowing coordinate is a cell without a position: the same
    embedding as with NaN, the others untouched, every embedding finite."""
    coords = np.random.default_rng(0).random((cells.n_obs, 2)) * 100
    kwargs = {"positional_encoding": "sinusoidal", "n_spatial_neighbors": 3}
    with_nan = coords.copy()
    with_nan[3, 0] = np.nan
    z_nan = _spatial(cells.copy(), with_nan, **kwargs).get_latent_representation()
    with_bad = coords.copy()
    with_bad[3, 0] = bad
    adata = cells.copy()
    adata.obsm["spatial"] = with_bad
    with pytest.warns(UserWarning, match="1 cells have NaN/inf or out-of-range"):
        CellPLM.setup_anndata(adata, layer="counts", spatial_key="spatial")
    torch.manual_seed(0)
    z_bad = CellPLM(adata, **MICRO, **kwargs).get_latent_representation()
    assert np.isfinite(z_bad).all()
    np.testing.assert_allclose(z_bad, z_nan, atol=1e-5)


def test_huge_coordinates_with_windows_train_and_embed(cells):
    """Half the cells at 1e300 (squidpy's neighbour search overflowed), windows of 50 cells,
    sinusoidal encoding and neighbourhood layer: finite training loss and finite embeddings."""
    coords = np.random.default_rng(0).random((cells.n_obs, 2)) * 100
    coords[::2] *= 1e300
    model = _spatial(cells, coords, positional_encoding="sinusoidal", n_spatial_neighbors=3,
                     max_cells_per_batch=50)
    _quiet(model.train, max_epochs=1, enable_progress_bar=False)  # a non-finite loss raises
    assert model.is_trained_ and np.isfinite(model.get_latent_representation()).all()


def test_no_usable_coordinate_is_refused(cells):
    cells.obsm["spatial"] = np.full((cells.n_obs, 2), 1e308)
    with pytest.raises(InputDataError, match="no usable coordinates"):
        CellPLM.setup_anndata(cells, layer="counts", spatial_key="spatial")


def test_module_reads_overflowing_coordinates_as_missing():
    from scvi_cellplm.module.neighbourhood import sentence_knn
    from scvi_cellplm.module.positional import normalize_coordinates

    coords = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0], [np.inf, 0.0], [2.0, 1e31]])
    sentence = torch.zeros(5, dtype=torch.long)
    unit = normalize_coordinates(coords, sentence)
    assert torch.isnan(unit[3:]).all()
    reference = normalize_coordinates(coords[:3], sentence[:3])
    torch.testing.assert_close(unit[:3], reference)
    index, valid = sentence_knn(coords, sentence, 2)
    assert not valid[3:].any() and not (valid[:3] & (index[:3] >= 3)).any()


# ----------------------------------------------------------------- 2. files
def test_save_anndata_never_replaces_an_existing_adata_file(micro_model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "adata.h5ad").write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="adata.h5ad already exists"):
        micro_model.save(folder, save_anndata=True)
    assert (folder / "adata.h5ad").read_bytes() == b"precious"
    assert sorted(os.listdir(folder)) == ["adata.h5ad"]


# ----------------------------------------------------------------- 3. metadata and configs
def _official_config(genes) -> dict:
    return {"enc_mod": "flowformer", "enc_hid": 16, "enc_layers": 1, "enc_head": 2, "latent_mod": "vae",
            "post_latent_dim": 4, "dec_mod": "nbmlp", "dec_hid": 16, "dec_layers": 2, "norm": "layernorm",
            "model_dropout": 0.1, "num_clusters": 4, "out_dim": len(genes), "batch_num": 0,
            "dataset_num": 0, "gene_list": list(genes), "dsbn": False}


@pytest.mark.parametrize(("change", "words"), [
    ({"enc_hid": None}, r"required fields missing: \['enc_hid'\]"),  # None: the key is removed
    ({"enc_hid": "16"}, "field 'enc_hid' must be an integer"),
    ({"enc_hid": 10**12}, "field 'enc_hid' must be an integer in"),
    ({"enc_layers": True}, "field 'enc_layers'"),
    ({"enc_head": 3}, "multiple of 'enc_head'"),
    ({"batch_num": -1}, "field 'batch_num'"),
    ({"model_dropout": 2}, "field 'model_dropout'"),
    ({"lamda": float("nan")}, "field 'lamda'"),
    ({"dsbn": "no"}, "field 'dsbn' must be true or false"),
    ({"gene_list": "ACTB"}, "field 'gene_list' must be a list"),
    ({"gene_list": ["ACTB", "ACTB", "GAPDH"]}, r"field 'gene_list' has duplicates: \['ACTB'\]"),
    ({"gene_list": ["ACTB", 7]}, "field 'gene_list' must hold non-empty strings"),
    ({"gene_list": ["ACTB", ""]}, "field 'gene_list' must hold non-empty strings"),
    ({"enc_hid": 65536, "enc_layers": 1024, "enc_head": 1}, "parameters"),
])
def test_malformed_official_config_is_refused_before_anything_is_built(cells, tmp_path, change, words):
    config = _official_config(cells.var_names[:20])
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    if "gene_list" in change:  # consistent with out_dim: only the list itself is wrong
        config["out_dim"] = len(change["gene_list"])
    (tmp_path / "bad.config.json").write_text(json.dumps(config))  # no weights file: never reached
    CellPLM.setup_anndata(cells, layer="counts")
    with pytest.raises(CheckpointError, match=words) as info:
        CellPLM.from_official(str(tmp_path / "bad"), cells)
    assert "\n" not in str(info.value)


def test_official_config_that_is_not_an_object_is_refused(tmp_path):
    from scvi_cellplm.io._official import read_official_config

    for text in ("[1, 2]", '"config"', "\x89PNG\x00binary"):
        (tmp_path / "c.config.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(CheckpointError, match="c.config.json"):
            read_official_config(str(tmp_path / "c.config.json"))


@pytest.fixture(scope="module", params=["safetensors", "legacy"])
def saved_model(request, tmp_path_factory, pancreas_session):
    """A saved micro model, in the current format and in the legacy ``model.pt``."""
    adata = pancreas_session[:100, :50].copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    folder = tmp_path_factory.mktemp("saved") / "m"
    model = CellPLM(adata, **MICRO)
    if request.param == "legacy":
        save_legacy(model, folder)
    else:
        model.save(folder)
    return folder, adata


def _tampered(saved_model, tmp_path, edit) -> Path:
    folder, _ = saved_model
    shutil.copytree(folder, tmp_path / "t")
    if (folder / METADATA_FILE).exists():
        metadata = json.loads((folder / METADATA_FILE).read_text())
        edit(metadata)
        (tmp_path / "t" / METADATA_FILE).write_text(json.dumps(metadata))
    else:
        payload = torch.load(folder / LEGACY_MODEL_FILE, weights_only=True)
        metadata = json.loads(payload["metadata"])
        edit(metadata)
        payload["metadata"] = json.dumps(metadata)
        torch.save(payload, tmp_path / "t" / LEGACY_MODEL_FILE)
    return tmp_path / "t"


def _set(path: str, value):
    def edit(metadata):
        *parents, last = path.split(".")
        target = metadata
        for key in parents:
            target = target[key]
        target[last] = value
    return edit


@pytest.mark.parametrize(("edit", "field"), [
    (_set("init_params_", []), "init_params_"),
    (_set("init_params_.kwargs", "x"), "init_params_.kwargs"),
    (_set("init_params_.non_kwargs.n_hidden", 10**12), "n_hidden"),
    (_set("init_params_.non_kwargs.n_hidden", "16"), "n_hidden"),
    (_set("init_params_.non_kwargs.n_hidden", 15), "n_heads"),
    (_set("init_params_.non_kwargs.dropout", -1), "dropout"),
    (_set("init_params_.non_kwargs.latent_distribution", 3), "latent_distribution"),
    (_set("init_params_.non_kwargs.gene_vocabulary", "A2M"), "gene_vocabulary"),
    (_set("registry_.setup_args", ["counts"]), "setup_args"),
    (_set("registry_.setup_args.layer", 5), "layer"),
    (_set("registry_.setup_method_name", "__init__"), "setup_method_name"),
    (_set("registry_.field_registries.batch.state_registry.categorical_mapping",
          {"__ndarray__": ["a"], "dtype": "V1000000000000"}), "dtype"),
    (_set("gene_vocabulary", ["A2M", "A2M"]), "gene_vocabulary"),
    (_set("gene_vocabulary", {"A2M": 0}), "gene_vocabulary"),
    (_set("decoder_batch_categories", "human1"), "decoder_batch_categories"),
    (_set("is_trained_", "yes"), "is_trained_"),
    (_set("var_names", [1, 2]), "var_names"),
    (_set("weights_id", 7), "weights_id"),
])
def test_tampered_model_metadata_is_refused_before_the_model_is_built(saved_model, tmp_path, monkeypatch,
                                                                       edit, field):
    from scvi_cellplm.model import _saving

    def never(*args, **kwargs):
        raise AssertionError("the model was being built from unchecked metadata")

    monkeypatch.setattr(_saving, "_attach", never)
    folder = _tampered(saved_model, tmp_path, edit)
    with pytest.raises(CheckpointError, match=field) as info:
        CellPLM.load(folder, adata=saved_model[1].copy())
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=field):  # load_registry reads the same checks
        CellPLM.load_registry(folder)


def test_gene_vocabulary_argument_with_duplicates_is_refused(cells):
    CellPLM.setup_anndata(cells, layer="counts")
    genes = list(cells.var_names)
    with pytest.raises(GeneAlignmentError, match=f"duplicated genes.*{genes[0]}"):
        CellPLM(cells, gene_vocabulary=[*genes, genes[0]], **MICRO)
    with pytest.raises(GeneAlignmentError, match="list of gene ids"):
        CellPLM(cells, gene_vocabulary="ACTB", **MICRO)


# ----------------------------------------------------------------- 4. arguments
@pytest.fixture(scope="module")
def micro_model(pancreas_session):
    adata = pancreas_session[:120, :60].copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    torch.manual_seed(0)
    return CellPLM(adata, **MICRO)


def test_every_public_method_with_indices_reads_a_boolean_mask_as_the_cells_it_selects(micro_model):
    n = micro_model.adata.n_obs
    mask = np.zeros(n, dtype=bool)
    mask[[3, 50, 97]] = True
    positions = np.flatnonzero(mask)
    np.testing.assert_array_equal(micro_model.get_latent_representation(indices=mask),
                                  micro_model.get_latent_representation(indices=positions))
    frame = micro_model.get_normalized_expression(indices=pd.Series(mask))
    assert list(frame.index) == list(micro_model.adata.obs_names[positions])
    assert [list(s) for s in micro_model.sentences(indices=mask)] == \
        [list(s) for s in micro_model.sentences(indices=positions)]


@pytest.mark.parametrize(("indices", "words"), [
    ([0, 0], "duplicates"), ([0, 120], r"\[0, 120\)"), ([0.5], "integer"), ([[0, 1]], "1-D"),
    (np.ones(5, dtype=bool), "120 entries"), (["c0"], "integer"),
])
def test_bad_indices_are_one_line_errors_in_every_method(micro_model, indices, words):
    for call in (micro_model.get_latent_representation, micro_model.get_normalized_expression,
                 micro_model.sentences):
        with pytest.raises(InputDataError, match=words):
            call(indices=indices)


def test_no_cells_gives_empty_results(micro_model):
    assert micro_model.get_latent_representation(indices=[]).shape == (0, MICRO["n_latent"])
    assert micro_model.get_normalized_expression(indices=[]).shape == (0, micro_model.adata.n_vars)
    assert micro_model.sentences(indices=[]) == []


@pytest.mark.parametrize(("out", "words"), [
    (np.zeros((120, 4), dtype=np.int32), "floating dtype"),
    (np.zeros((120, 4), dtype=bool), "floating dtype"),
    (np.zeros((120, 3), dtype=np.float32), r"\(120, 4\)"),
    (np.zeros((119, 4), dtype=np.float32), r"\(120, 4\)"),
    (np.zeros(480, dtype=np.float32), r"\(120, 4\)"),
])
def test_out_arrays_that_would_change_the_values_are_refused(micro_model, out, words):
    with pytest.raises(InputDataError, match=words):
        micro_model.get_latent_representation(out=out)
    assert not out.any()


def test_out_of_float64_gets_the_values(micro_model):
    out = np.full((120, 4), np.nan)
    micro_model.get_latent_representation(out=out)
    np.testing.assert_allclose(out, micro_model.get_latent_representation(), atol=1e-6)


def test_annotator_and_perturbation_predict_check_indices(pancreas_session):
    adata = pancreas_session[:80, :40].copy()
    CellPLMAnnotator.setup_anndata(adata, labels_key="cell_type", layer="counts")
    annotator = CellPLMAnnotator(adata, **MICRO)
    mask = np.arange(80) % 7 == 0
    np.testing.assert_array_equal(annotator.predict(indices=mask), annotator.predict(indices=np.flatnonzero(mask)))
    assert list(annotator.predict(indices=mask, soft=True).index) == list(adata.obs_names[mask])
    with pytest.raises(InputDataError, match="duplicates"):
        annotator.predict(indices=[1, 1])

    screen = pancreas_session[:80, :40].copy()
    screen.obs["perturbation"] = np.where(np.arange(80) < 60, "control", str(screen.var_names[0]))
    CellPLMPerturbation.setup_anndata(screen, layer="counts")
    pert = _quiet(CellPLMPerturbation, screen, **MICRO)
    mask = np.arange(80) % 5 == 1
    by_mask = pert.predict(indices=mask, aggregate=False)
    np.testing.assert_array_equal(by_mask.X, pert.predict(indices=np.flatnonzero(mask), aggregate=False).X)
    assert list(by_mask.obs["control_cell"]) == list(screen.obs_names[mask])
    with pytest.raises(InputDataError, match="duplicates"):
        pert.predict(indices=[2, 2])


# ----------------------------------------------------------------- 5. duplicate sparse entries
def _with_duplicates(x: sp.csr_matrix) -> sp.csr_matrix:
    """The same matrix with every stored entry split into two stored copies (scipy sums them)."""
    coo = x.tocoo()
    half = np.floor(coo.data / 2)
    rows, cols = np.tile(coo.row, 2), np.tile(coo.col, 2)
    data = np.concatenate([half, coo.data - half]).astype(np.float32)
    order = np.lexsort((cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=x.shape[0]))])
    dup = sp.csr_matrix((data[order], cols[order], indptr), shape=x.shape)
    assert not dup.has_canonical_format and (dup != x).nnz == 0
    return dup


def test_csr_with_duplicate_entries_reads_as_scipy_sums_them(micro_model):
    other = micro_model.adata.copy()
    other.layers["counts"] = _with_duplicates(sp.csr_matrix(other.layers["counts"]))
    before = other.layers["counts"].copy()
    np.testing.assert_allclose(micro_model.get_latent_representation(other),
                               micro_model.get_latent_representation(), atol=1e-5)
    np.testing.assert_allclose(micro_model.get_normalized_expression(other, return_numpy=True),
                               micro_model.get_normalized_expression(return_numpy=True), rtol=1e-4, atol=1e-6)
    layer = other.layers["counts"]  # the user's matrix is not modified
    assert not layer.has_canonical_format
    np.testing.assert_array_equal(layer.data, before.data)
    np.testing.assert_array_equal(layer.indices, before.indices)


def test_sum_duplicates_is_free_when_there_are_none():
    from scvi_cellplm.data._loader import sum_duplicates

    x = torch.eye(3).to_sparse_csr()
    assert sum_duplicates(x) is x
    dup = torch.sparse_csr_tensor(torch.tensor([0, 2, 3]), torch.tensor([1, 1, 0]), torch.tensor([1.0, 2.0, 4.0]),
                                  size=(2, 3))
    summed = sum_duplicates(dup)
    torch.testing.assert_close(summed.to_dense(), torch.tensor([[0.0, 3.0, 0.0], [4.0, 0.0, 0.0]]))
    assert summed.values().log1p().sum() == pytest.approx(np.log1p(3.0) + np.log1p(4.0))


def test_stored_zeros_are_not_measurements():
    from scvi_cellplm.data._statistics import measured_genes

    x = sp.csr_matrix((np.array([0.0, 3.0, 2.0], dtype=np.float32), np.array([0, 1, 1]), np.array([0, 2, 3, 3])),
                      shape=(3, 2))
    adata = ad.AnnData(x, obs=pd.DataFrame({"ds": ["a", "a", "b"]}, index=["c0", "c1", "c2"]))
    adata.var_names = ["g0", "g1"]
    _quiet(CellPLM.setup_anndata, adata, dataset_key="ds")
    mask = measured_genes(CellPLM._get_most_recent_anndata_manager(adata))
    np.testing.assert_array_equal(mask, [[False, True], [False, False]])  # g0 of "a": a stored 0
    assert adata.X.nnz == 3  # the user's matrix keeps its stored zero


def test_corpus_rows_sum_duplicate_entries():
    from scvi_cellplm.pretrain._corpus import _to_vocabulary

    x = sp.csr_matrix((np.array([1.0, 2.0, 5.0], dtype=np.float32), np.array([0, 0, 1]), np.array([0, 2, 3])),
                      shape=(2, 2))
    out = _to_vocabulary(x, np.array([1, 0]), 3)
    assert out.has_canonical_format
    np.testing.assert_array_equal(out.toarray(), [[0, 3, 0], [5, 0, 0]])


# ----------------------------------------------------------------- 6. workflows
def _panel_and_reference(small_pancreas, key: str):
    rng = np.random.default_rng(0)
    spatial = small_pancreas[:150, :60].copy()
    spatial.X = spatial.layers["counts"].copy()
    spatial.obsm[key] = rng.random((spatial.n_obs, 2)) * 100
    reference = small_pancreas[150:300, :100].copy()
    reference.X = reference.layers["counts"].copy()
    return spatial, reference


def test_impute_genes_reads_coordinates_under_any_obsm_key(small_pancreas):
    from scvi_cellplm.spatial import impute_genes

    spatial, reference = _panel_and_reference(small_pancreas, "xy")
    result, model = _quiet(impute_genes, spatial, reference, spatial_key="xy", max_epochs=1,
                           model_kwargs=MICRO)
    assert result.shape == (spatial.n_obs, 40) and np.isfinite(result.to_numpy()).all()
    assert model.adata_manager.registry["setup_args"]["spatial_key"] == "xy"


def test_impute_genes_names_a_missing_key_or_layer(small_pancreas):
    from scvi_cellplm.spatial import impute_genes

    spatial, reference = _panel_and_reference(small_pancreas, "xy")
    with pytest.raises(InputDataError, match=r"spatial_key='spatial'.*'xy'"):
        impute_genes(spatial, reference)
    with pytest.raises(InputDataError, match="layer='raw'"):
        impute_genes(spatial, reference, spatial_key="xy", layer="raw")
    with pytest.raises(InputDataError, match="sample_key='fov'"):
        impute_genes(spatial, reference, spatial_key="xy", sample_key="fov")


def test_annotator_without_labelled_cells_is_refused(cells):
    cells.obs["label"] = "Unknown"
    CellPLMAnnotator.setup_anndata(cells, labels_key="label", layer="counts")
    with pytest.raises(InputDataError, match="No labelled cells"):
        CellPLMAnnotator(cells, **MICRO)


# ----------------------------------------------------------------- 7. pretraining files
FAST = {"accelerator": "cpu", "devices": 1, "progress_bar": False, "logger_kind": "none",
        "model_kwargs": MICRO, "max_cells_per_batch": 32}


@pytest.fixture
def corpus_file(tmp_path, pancreas_session) -> str:
    """A 60-cell .h5ad whose genes are Ensembl ids."""
    adata = pancreas_session[:60, :40].copy()
    x = sp.csr_matrix(adata.layers["counts"], dtype=np.float32)
    out = ad.AnnData(x, var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(40)]))
    out.obs_names = [f"c{i}" for i in range(60)]
    out.write_h5ad(tmp_path / "cells.h5ad")
    return str(tmp_path / "cells.h5ad")


def test_truncated_corpus_file_is_named(corpus_file, tmp_path):
    from scvi_cellplm.pretrain import Corpus

    data = Path(corpus_file).read_bytes()
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match="broken.h5ad.*truncated or corrupted"):
        Corpus([corpus_file, str(bad)], 32)


def test_resuming_from_a_truncated_checkpoint_names_it(corpus_file, tmp_path):
    from scvi_cellplm.pretrain import pretrain

    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt.*truncated or corrupted"):
        pretrain([corpus_file], tmp_path / "run", resume_from=tmp_path / "cut.ckpt", max_steps=2, **FAST)


def test_a_second_run_never_mixes_with_the_first_ones_checkpoints(corpus_file, tmp_path):
    from scvi_cellplm.pretrain import pretrain

    out = tmp_path / "run"
    kwargs = {**FAST, "max_steps": 2, "checkpoint_every": 1}
    pretrain([corpus_file], out, **kwargs)
    first = (out / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(CheckpointError, match="earlier run.*resume_from='last'.*overwrite=True"):
        pretrain([corpus_file], out, **kwargs)
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == first
    pretrain([corpus_file], out, seed=1, overwrite=True, **kwargs)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in names and "last.ckpt" in names
    assert (out / "checkpoints" / "last.ckpt").read_bytes() != first
    # resuming the run of this folder is allowed (and finds it finished)
    pretrain([corpus_file], out, seed=1, resume_from="last", **kwargs)


def test_cli_pretrain_has_overwrite():
    from scvi_cellplm.cli import build_parser

    assert build_parser().parse_args(["pretrain", "--overwrite"]).overwrite


# ----------------------------------------------------------------- 8. command line
def test_cli_input_folder_and_missing_model_are_one_line_errors(tmp_path, capsys, pancreas_session):
    out = str(tmp_path / "out.h5ad")
    assert main(["embed", str(tmp_path), "--model", "m", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cellplm: error: ") and "is a folder" in err and "\n" not in err
    pancreas_session[:5, :5].copy().write_h5ad(tmp_path / "in.h5ad")
    assert main(["embed", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "nope"), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cellplm: error: ") and "--model" in err and "\n" not in err
    assert not os.path.exists(out)
