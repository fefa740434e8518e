"""Official checkpoints: exact parity with the official package, export, and safe loading.

The official ``cellplm`` package (import ``CellPLM``) is the oracle; tests skip when it is not
installed. Checkpoints are made by the tests (random weights), never downloaded.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import shared_file
from official_oracle import (
    build_official,
    official_decoder_mean,
    official_embedding,
    save_official,
    small_config,
)

from scvi_cellplm import CellPLM, CheckpointError
from scvi_cellplm.io._official import config_to_kwargs, read_official_weights

TOL = 1e-5


def _ours(prefix, adata, **kwargs):
    adata = adata.copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    return CellPLM.from_official(prefix, adata, **kwargs), adata


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_small_checkpoint_embeddings_match_official(tmp_path, vocabulary, ensembl_pancreas, latent):
    config = small_config(vocabulary, latent_mod=latent)
    prefix = save_official(build_official(config), config, tmp_path, "small")
    reference = official_embedding(str(tmp_path), "small", ensembl_pancreas.copy())
    model, _ = _ours(prefix, ensembl_pancreas)
    ours = model.get_latent_representation()
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= TOL


def test_paper_size_checkpoint_embeddings_match_official(tmp_path, vocabulary, ensembl_pancreas):
    """The official 20230926_85M configuration (19,374 genes, 4 x 1024 flowformer, GMVAE 512),
    and its 20231027_85M VAE variant, with random weights."""
    config = json.loads(shared_file("official/cellplm_20230926_85M.config.json").read_text())
    subset = ensembl_pancreas[ensembl_pancreas.obs["batch"] != "human1_lib3"].copy()
    for latent in ("gmvae", "vae"):
        config = {**config, "latent_mod": latent}
        prefix = save_official(build_official(config), config, tmp_path, f"paper_{latent}")
        reference = official_embedding(str(tmp_path), f"paper_{latent}", subset.copy())
        model, _ = _ours(prefix, subset)
        assert np.abs(model.get_latent_representation() - reference).max() <= TOL


def test_flow_attention_is_as_accurate_as_official_on_long_sentences():
    """At tens of thousands of cells in one sentence, float32 rounding of the flow sums and the
    softmax over keys decides parity; our attention (training and in-place inference paths) must
    stay as close to a float64 evaluation of the official layer as the official float32 is."""
    from CellPLM.layer.flowformer import Flow_Attention

    from scvi_cellplm.module.attention import FlowAttention

    torch.manual_seed(0)
    length, hidden, heads = 50_000, 64, 8
    official = Flow_Attention(hidden, heads).eval()
    ours = FlowAttention(hidden, heads, dropout=0.0).eval()
    for mine, theirs in (("q_proj", "query_projection"), ("k_proj", "key_projection"),
                         ("v_proj", "value_projection"), ("out_proj", "out_projection")):
        getattr(ours, mine).load_state_dict(getattr(official, theirs).state_dict())
    x = torch.randn(1, length, hidden)
    valid = torch.ones(1, length, dtype=torch.bool)
    with torch.no_grad():
        exact = official.double()(x.double())
        official_error = (official.float()(x).double() - exact).abs().max().item()
        forward_error = (ours(x, valid).double() - exact).abs().max().item()
        # in place: x + attn(x); compare with the official float32 sum, same final rounding
        in_place = ours.add_to_(x.clone(), valid, torch.nn.Identity(), torch.nn.Identity(), 2048)
        official_sum_error = ((x + official(x)).double() - (x.double() + exact)).abs().max().item()
        in_place_error = (in_place.double() - (x.double() + exact)).abs().max().item()
    assert forward_error <= 1.5 * official_error
    assert in_place_error <= 1.5 * official_sum_error


def test_decoder_outputs_match_official(tmp_path, vocabulary, ensembl_pancreas):
    config = small_config(vocabulary)
    official = build_official(config)
    prefix = save_official(official, config, tmp_path, "dec")
    model, adata = _ours(prefix, ensembl_pancreas)
    z = torch.as_tensor(model.get_latent_representation()[:50])
    idx = torch.as_tensor(model.gene_alignment().index)
    for batch in (None, torch.arange(50) % 7):
        ref = official_decoder_mean(official, z, batch)[:, idx.numpy()]
        ref = ref / ref.sum(1, keepdims=True)
        with torch.no_grad():
            ours = model.module.generative(z, torch.ones(50), batch, gene_index=idx)["px_scale"].numpy()
        assert np.abs(ours - ref).max() <= TOL
    denoised = model.get_normalized_expression(indices=np.arange(50), return_numpy=True)
    assert np.abs(denoised - official_decoder_mean(official, z)[:, idx.numpy()] /
                  official_decoder_mean(official, z)[:, idx.numpy()].sum(1, keepdims=True)).max() <= TOL


@pytest.mark.parametrize("latent", ["gmvae", "vae"])
def test_export_round_trip_through_official_package(tmp_path, vocabulary, ensembl_pancreas, latent):
    config = small_config(vocabulary, latent_mod=latent)
    prefix = save_official(build_official(config), config, tmp_path, "src")
    model, adata = _ours(prefix, ensembl_pancreas)
    # weights now differ from the source; seeded, so they do not depend on the tests run before
    model.train(max_epochs=1, enable_progress_bar=False, seed=0)
    model.to_official(str(tmp_path / "exported"))
    reference = official_embedding(str(tmp_path), "exported", ensembl_pancreas.copy())
    assert np.abs(model.get_latent_representation() - reference).max() <= TOL
    reloaded, _ = _ours(str(tmp_path / "exported"), ensembl_pancreas)
    np.testing.assert_allclose(reloaded.get_latent_representation(),
                               model.get_latent_representation(), atol=TOL)


def test_scratch_model_exports_to_official(tmp_path, small_pancreas):
    """A model pretrained from scratch (gene symbols as vocabulary) loads in the official code.

    The official code embeds a GMVAE cell with one cluster (compared at the most likely one) and
    reads raw counts and normalises each cell token on its own, so the model is asked for that
    embedding rule instead of the default mixture mean, for raw-count input and per-cell token
    norms; the others (relative expression, sample norm) are refused with a clear error.
    """
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    kwargs = {"n_hidden": 32, "n_layers": 2, "n_heads": 4, "n_latent": 8, "norm": "groupnorm",
              "gmvae_embedding": "cluster"}
    with pytest.raises(CheckpointError, match="input_target_sum=None"):
        CellPLM(small_pancreas, **kwargs).to_official(str(tmp_path / "refused"))
    with pytest.raises(CheckpointError, match="token_norm='cell'"):
        CellPLM(small_pancreas, **kwargs, input_target_sum=None, token_norm="sample").to_official(
            str(tmp_path / "refused"))
    model = CellPLM(small_pancreas, **kwargs, input_target_sum=None, token_norm="cell")
    model.train(max_epochs=1, enable_progress_bar=False)
    model.to_official(str(tmp_path / "scratch"))
    reference = official_embedding(str(tmp_path), "scratch", small_pancreas.copy())
    assert np.abs(model.get_latent_representation() - reference).max() <= TOL


def test_symbols_are_mapped_offline(tmp_path, vocabulary, pancreas):
    """var_names as gene symbols: aligned to the Ensembl vocabulary without network."""
    config = small_config(vocabulary)
    prefix = save_official(build_official(config), config, tmp_path, "sym")
    model, _ = _ours(prefix, pancreas)
    assert model.gene_alignment().n_symbol > 0.8 * pancreas.n_vars


def test_mismatched_checkpoint_is_an_error(tmp_path, vocabulary, ensembl_pancreas):
    config = small_config(vocabulary)
    save_official(build_official(config), config, tmp_path, "bad")
    wrong = {**config, "enc_hid": 32}
    (tmp_path / "bad.config.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match="shape"):
        _ours(str(tmp_path / "bad"), ensembl_pancreas)


def test_unknown_and_unsupported_config_keys_are_named(vocabulary):
    with pytest.raises(CheckpointError, match="mystery_key"):
        config_to_kwargs({**small_config(vocabulary), "mystery_key": 1})
    with pytest.raises(CheckpointError, match="dsbn"):
        config_to_kwargs({**small_config(vocabulary), "dsbn": True})


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path):
    path = tmp_path / "evil.best.ckpt"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled"):
        read_official_weights(str(path))


def test_official_defaults_to_no_positional_encoding(tmp_path, vocabulary, ensembl_pancreas):
    config = small_config(vocabulary)
    prefix = save_official(build_official(config), config, tmp_path, "pe")
    model, _ = _ours(prefix, ensembl_pancreas)
    assert model.module.pos_encoder is None


def test_a_sample_above_4000_cells_is_one_sentence_by_default_as_in_official(tmp_path, vocabulary, pancreas):
    """``from_official`` with no options reproduces the official ``predict`` on a single sample of
    4,079 cells (two pancreas files as one sample): one sentence, not windows."""
    import anndata as ad
    from scipy import sparse

    donors = ad.read_h5ad(shared_file("baron_human_pancreas_4donors.h5ad"))
    keep = pancreas.var["gene_ids"].isin(vocabulary).to_numpy() & pancreas.var_names.isin(donors.var_names)
    genes = pancreas.var_names[keep]
    x = sparse.vstack([pancreas[:, genes].layers["counts"], donors[:, genes].X], format="csr")
    big = ad.AnnData(x.astype(np.float32))
    big.obs_names = [f"c{i}" for i in range(big.n_obs)]
    big.var_names = pancreas.var.loc[genes, "gene_ids"].astype(str).to_numpy()
    big.obs["batch"] = "one_sample"
    assert big.n_obs > 4000
    config = small_config(vocabulary)
    prefix = save_official(build_official(config), config, tmp_path, "big")
    reference = official_embedding(str(tmp_path), "big", big.copy())
    CellPLM.setup_anndata(big, batch_key="batch")
    model = CellPLM.from_official(prefix, big)
    assert len(model.sentences()) == 1
    assert np.abs(model.get_latent_representation() - reference).max() <= TOL
