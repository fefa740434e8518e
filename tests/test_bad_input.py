"""Bad input: clear errors naming the field, documented fallbacks, nothing lost."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import TINY
from legacy_format import save_legacy

from scvi_cellplm import CellPLM, CheckpointError, GeneAlignmentError, InputDataError
from scvi_cellplm._constants import LEGACY_MODEL_FILE, METADATA_FILE, MODEL_FILE


def _setup(adata, **kwargs):
    CellPLM.setup_anndata(adata, layer=kwargs.pop("layer", "counts"), **kwargs)
    return CellPLM(adata, **TINY)


# ------------------------------------------------------------------ counts
def test_log_normalised_input_warns_with_the_fix(small_pancreas):
    small_pancreas.layers["lognorm"] = small_pancreas.layers["counts"].log1p()
    with pytest.warns(UserWarning, match="raw counts.*layer"):
        CellPLM.setup_anndata(small_pancreas, layer="lognorm")


def test_negative_values_are_refused(small_pancreas):
    x = small_pancreas.layers["counts"].toarray()
    x[0, 0] = -1
    small_pancreas.layers["scaled"] = x
    with pytest.raises(InputDataError, match=r"layers\['scaled'\].*negative"):
        CellPLM.setup_anndata(small_pancreas, layer="scaled")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_and_inf_counts_are_refused(small_pancreas, value):
    x = small_pancreas.layers["counts"].copy()
    x.data[3] = value
    small_pancreas.layers["bad"] = x
    with pytest.raises(InputDataError, match=r"layers\['bad'\].*NaN/inf"):
        CellPLM.setup_anndata(small_pancreas, layer="bad")


def test_missing_layer_is_named(small_pancreas):
    with pytest.raises(InputDataError, match="raw"):
        CellPLM.setup_anndata(small_pancreas, layer="raw")


def test_empty_anndata_is_refused(small_pancreas):
    with pytest.raises(InputDataError, match="empty"):
        CellPLM.setup_anndata(small_pancreas[:0].copy(), layer="counts")


def test_all_zero_cells_and_genes_give_finite_outputs(small_pancreas):
    x = small_pancreas.layers["counts"].tolil()
    x[:5] = 0
    x[:, :7] = 0
    small_pancreas.layers["counts"] = x.tocsr()
    model = _setup(small_pancreas, batch_key="batch")
    model.train(max_epochs=1, enable_progress_bar=False)
    assert np.isfinite(model.get_latent_representation()).all()
    assert np.isfinite(model.get_normalized_expression(return_numpy=True)).all()


def test_sample_with_one_cell(small_pancreas):
    small_pancreas.obs["sample"] = "big"
    small_pancreas.obs.iloc[0, small_pancreas.obs.columns.get_loc("sample")] = "single"
    model = _setup(small_pancreas, sample_key="sample")
    model.train(max_epochs=1, enable_progress_bar=False)
    z = model.get_latent_representation()
    assert np.isfinite(z).all() and len(model.sentences()) == 2


@pytest.mark.parametrize("kind", ["dense", "csc", "float64", "int64", "view", "backed"])
def test_input_formats_give_the_same_embedding(trained_small, small_pancreas, tmp_path, kind):
    reference = trained_small.get_latent_representation()
    trained_small.save(tmp_path / "m")
    other = small_pancreas.copy()
    counts = other.layers["counts"]
    if kind == "dense":
        other.layers["counts"] = counts.toarray()
    elif kind == "csc":
        other.layers["counts"] = sp.csc_matrix(counts)
    elif kind == "float64":
        other.layers["counts"] = counts.astype(np.float64)
    elif kind == "int64":
        other.layers["counts"] = counts.astype(np.int64)
    elif kind == "view":
        other = other[np.arange(other.n_obs)]
        assert other.is_view
    elif kind == "backed":
        other.X = counts
        del other.layers["counts"]
        other.write_h5ad(tmp_path / "b.h5ad")
        other = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    if kind == "view":
        with pytest.raises(InputDataError, match="copy"):
            CellPLM.setup_anndata(other, layer="counts")
        z = trained_small.get_latent_representation(other)  # inference accepts views
        np.testing.assert_allclose(z, reference, atol=1e-5)
        return
    if kind == "backed":
        CellPLM.setup_anndata(other, batch_key="batch")
        model = CellPLM(other, latent_distribution="gmvae", **TINY)
        model.module.load_state_dict(trained_small.module.state_dict())
    else:
        model = CellPLM.load(tmp_path / "m", adata=other)
    np.testing.assert_allclose(model.get_latent_representation(), reference, atol=1e-5)


# ------------------------------------------------------------------ genes
def test_duplicated_var_names_are_refused(small_pancreas):
    names = small_pancreas.var_names.to_numpy().copy()
    names[1] = names[0]
    small_pancreas.var_names = names
    CellPLM.setup_anndata(small_pancreas, layer="counts")
    with pytest.raises(GeneAlignmentError, match=names[0]):
        CellPLM(small_pancreas, **TINY)


def test_loading_into_fewer_genes_aligns_them_by_identifier(trained_small, small_pancreas, tmp_path):
    """A saved model loads on data with other genes: they are matched to its vocabulary by name,
    the missing ones are reported as unmeasured (the model's vocabulary is unchanged)."""
    trained_small.save(tmp_path / "m")
    other = small_pancreas[:, 5:].copy()
    model = CellPLM.load(tmp_path / "m", adata=other)
    assert model.gene_vocabulary == list(small_pancreas.var_names)
    alignment = model.gene_alignment()
    assert (alignment.n_matched, alignment.n_vocabulary) == (295, 300)
    assert "295 of the model's 300 vocabulary genes" in alignment.summary()
    assert np.isfinite(model.get_latent_representation()).all()


# ------------------------------------------------------------------ categories and keys
def test_unseen_batches_embed_but_decode_only_as_known_batches(trained_small, small_pancreas):
    other = small_pancreas.copy()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories(lambda c: c + "_new")
    z = trained_small.get_latent_representation(other)
    np.testing.assert_allclose(z, trained_small.get_latent_representation(), atol=1e-5)
    with pytest.raises(InputDataError, match="transform_batch"):
        trained_small.get_normalized_expression(other)
    known = trained_small.adata.obs["batch"].cat.categories[0]
    assert trained_small.get_normalized_expression(other, transform_batch=[known]).shape == other.shape


@pytest.mark.parametrize("key", ["batch_key", "sample_key", "labels_key"])
def test_missing_obs_keys_are_named(small_pancreas, key):
    with pytest.raises(InputDataError, match=f"{key}='absent'"):
        CellPLM.setup_anndata(small_pancreas, layer="counts", **{key: "absent"})


def test_spatial_problems_are_named(small_pancreas):
    with pytest.raises(InputDataError, match="spatial_key"):
        CellPLM.setup_anndata(small_pancreas, layer="counts", spatial_key="spatial")
    small_pancreas.obsm["spatial"] = np.zeros((small_pancreas.n_obs, 4))
    with pytest.raises(InputDataError, match="2 or 3 columns"):
        CellPLM.setup_anndata(small_pancreas, layer="counts", spatial_key="spatial")
    coords = np.random.default_rng(0).random((small_pancreas.n_obs, 2))
    coords[:3] = np.nan
    small_pancreas.obsm["spatial"] = coords
    with pytest.warns(UserWarning, match="3 cells have NaN"):
        CellPLM.setup_anndata(small_pancreas, layer="counts", spatial_key="spatial")
    model = CellPLM(small_pancreas, positional_encoding="sinusoidal", **TINY)
    assert np.isfinite(model.get_latent_representation()).all()


def test_positional_encoding_without_coordinates_is_an_error(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts")
    with pytest.raises(InputDataError, match="spatial_key"):
        CellPLM(small_pancreas, positional_encoding="sinusoidal")


# ------------------------------------------------------------------ model files
def _weights(folder, fmt: str, model) -> str:
    """Path of the weights file of ``model`` saved in ``folder`` in format ``fmt``."""
    if fmt == "legacy":
        return save_legacy(model, folder)
    model.save(folder)
    return os.path.join(folder, MODEL_FILE)


@pytest.mark.parametrize("fmt", ["safetensors", "legacy"])
def test_truncated_model_file_is_a_clear_error(trained_small, small_pancreas, tmp_path, fmt):
    path = Path(_weights(tmp_path / "m", fmt, trained_small))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        CellPLM.load(tmp_path / "m", adata=small_pancreas)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_legacy_model_file_with_pickled_code_is_refused(trained_small, small_pancreas, tmp_path):
    import torch

    path = save_legacy(trained_small, tmp_path / "m")
    payload = torch.load(path, weights_only=True)
    payload["extra"] = _Evil()
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="pickled"):
        CellPLM.load(tmp_path / "m", adata=small_pancreas)


@pytest.mark.parametrize("fmt", ["safetensors", "legacy"])
def test_tampered_weights_are_a_clear_error(trained_small, small_pancreas, tmp_path, fmt):
    import safetensors.torch
    import torch

    path = _weights(tmp_path / "m", fmt, trained_small)
    if fmt == "legacy":
        payload = torch.load(path, weights_only=True)
        payload["model_state_dict"]["embedder.gene_table"] = torch.zeros(3, 3)
        torch.save(payload, path)
    else:
        with safetensors.safe_open(path, framework="pt") as fh:
            header, state = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        state["embedder.gene_table"] = torch.zeros(3, 3)
        safetensors.torch.save_file(state, path, metadata=header)
    with pytest.raises(CheckpointError, match="gene_table"):
        CellPLM.load(tmp_path / "m", adata=small_pancreas)


def test_interrupted_save_leaves_the_previous_model(trained_small, small_pancreas, tmp_path, monkeypatch):
    import safetensors.torch

    trained_small.save(tmp_path / "m")
    before = {name: (tmp_path / "m" / name).read_bytes() for name in (MODEL_FILE, METADATA_FILE)}

    def crash(tensors, filename, *a, **k):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        trained_small.save(tmp_path / "m", overwrite=True)
    monkeypatch.undo()
    assert {name: (tmp_path / "m" / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path / "m")) == sorted(before)
    CellPLM.load(tmp_path / "m", adata=small_pancreas)


def _kill_before_the_metadata(monkeypatch) -> None:
    """Make the next save stop after the weights are in place, before the metadata is."""
    from scvi_cellplm.model import _saving

    publish = _saving._publish

    def killed_before_the_metadata(tmp, path):
        if path.endswith(METADATA_FILE):
            raise KeyboardInterrupt
        publish(tmp, path)

    monkeypatch.setattr(_saving, "_publish", killed_before_the_metadata)


def test_save_interrupted_between_weights_and_metadata_is_refused_not_mixed(trained_small, small_pancreas,
                                                                            tmp_path, monkeypatch):
    """The only window left: new weights in place, old metadata still there (power cut, kill -9)."""

    trained_small.save(tmp_path / "m")
    _kill_before_the_metadata(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        trained_small.save(tmp_path / "m", overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "m")) == [METADATA_FILE, MODEL_FILE]  # no temporary file left
    with pytest.raises(CheckpointError, match="different saves"):
        CellPLM.load(tmp_path / "m", adata=small_pancreas)


def test_interrupted_save_over_a_legacy_model_leaves_the_legacy_model(trained_small, small_pancreas, tmp_path,
                                                                      monkeypatch):

    save_legacy(trained_small, tmp_path / "m")
    _kill_before_the_metadata(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        CellPLM(small_pancreas, **TINY).save(tmp_path / "m", overwrite=True)  # another model
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "m")) == [LEGACY_MODEL_FILE, MODEL_FILE]
    loaded = CellPLM.load(tmp_path / "m", adata=small_pancreas)  # the complete model: the legacy one
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained_small.get_latent_representation())


# ------------------------------------------------------------------ training
class _Interrupt(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= 2:
            raise KeyboardInterrupt


def test_keyboard_interrupt_leaves_a_usable_model(small_pancreas):
    model = _setup(small_pancreas, batch_key="batch")
    with pytest.raises(KeyboardInterrupt):
        model.train(max_epochs=50, max_cells_per_batch=100, enable_progress_bar=False,
                    callbacks=[_Interrupt()])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    z = model.get_latent_representation()
    assert np.isfinite(z).all() and not model.module.training
