"""The fast training step (``CellPLMModule.sparse_loss``): the same loss and gradients as the dense
reference over the whole vocabulary, inference untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY

from scvi_cellplm.module import CellPLMModule, embedder, sample_input_mask
from scvi_cellplm.module import _loss as loss_module
from scvi_cellplm.module._loss import DECODER_HIDDEN_KEY


@pytest.fixture(params=["by density", "gathered non-zeros", "every entry"])
def nonzero_path(request, monkeypatch):
    """Run a test with the fast step's choice by density, and forced to each of its two ways of
    handling non-zeros (bags of non-zeros / gathered lgamma, or one dense product / lgamma on
    every entry): all must give the dense reference."""
    if request.param != "by density":
        forced = 1.0 if request.param == "gathered non-zeros" else 0.0
        monkeypatch.setattr(embedder, "BAG_DENSITY", forced)
        monkeypatch.setattr(loss_module, "GATHER_DENSITY", forced)
    return request.param


def _module(n_genes=60, panels=None, **kwargs):
    torch.manual_seed(0)
    return CellPLMModule(n_genes, n_batch=2, n_dataset=0 if panels is None else len(panels),
                         dataset_gene_mask=panels, embed_shared_genes=panels is None, n_hidden=16,
                         n_layers=1, n_heads=2, n_latent=6, n_clusters=3, **kwargs)


def _tensors(n=50, g=60, seed=0, n_dataset=0, sparsity=0.7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 4, generator=gen)
    x[torch.rand(n, g, generator=gen) < sparsity] = 0
    x[0] = 0  # a cell with an empty library
    tensors = {"X": x, "sentence": torch.arange(n) % 3, "batch": torch.randint(2, (n, 1), generator=gen)}
    if n_dataset:
        tensors["dataset"] = torch.randint(n_dataset, (n, 1), generator=gen)
    return tensors


def _step(module, tensors, mask, sparse, seed=1):
    """Loss terms and parameter gradients of one training step."""
    module.sparse_loss = sparse
    module.train()
    module.zero_grad()
    torch.manual_seed(seed)  # the same dropout draws
    _, gen, out = module(tensors, inference_kwargs={"input_mask": mask}, loss_kwargs={"input_mask": mask})
    assert (DECODER_HIDDEN_KEY in gen) == sparse
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    terms = {k: float(v) for k, v in out.extra_metrics.items()}
    return float(out.loss), terms, grads


def _assert_same_step(module, tensors, mask):
    loss_d, terms_d, grads_d = _step(module, tensors, mask, sparse=False)
    loss_s, terms_s, grads_s = _step(module, tensors, mask, sparse=True)
    assert terms_d.keys() == terms_s.keys()
    np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5)
    for key in terms_d:
        np.testing.assert_allclose(terms_s[key], terms_d[key], rtol=1e-5, atol=1e-4)
    assert grads_d.keys() == grads_s.keys()
    for name, grad in grads_d.items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(grads_s[name], grad, atol=1e-4 * scale, rtol=1e-3, msg=name)


@pytest.mark.parametrize("masked", [True, False])
def test_sparse_loss_equals_dense_loss_and_gradients(masked, nonzero_path):
    """Every entry measured (a model trained on an AnnData's own genes): the same loss, terms and
    gradients as the dense formula, with and without masking."""
    module = _module()
    tensors = _tensors()
    mask = sample_input_mask(tensors["sentence"], 60, generator=torch.Generator().manual_seed(3)) if masked else None
    _assert_same_step(module, tensors, mask)


def test_sparse_loss_equals_dense_loss_with_panels_and_gene_index(nonzero_path):
    """Several datasets with different (overlapping) panels in one mini-batch, input columns
    outside the vocabulary (gene_index -1): the same loss and gradients."""
    gen = torch.Generator().manual_seed(5)
    panels = torch.rand(3, 60, generator=gen) < 0.6
    panels[2] = False
    panels[2, :10] = True  # a small panel
    module = _module(panels=panels)
    tensors = _tensors(n=45, g=50, n_dataset=3)
    index = torch.randperm(60, generator=gen)[:50]
    index[[3, 17]] = -1
    tensors["gene_index"] = index
    mask = sample_input_mask(tensors["sentence"], 50, generator=gen)
    _assert_same_step(module, tensors, mask)
    # one dataset only (the usual pretraining mini-batch): columns restricted to its panel
    tensors["dataset"] = torch.full((45, 1), 2)
    _assert_same_step(module, tensors, mask)


def test_sparse_loss_edge_cases(nonzero_path):
    """No masked cell, no masked-term weight: the same terms as the dense formula."""
    tensors = _tensors()
    none_masked = torch.zeros(50, 60, dtype=torch.bool)
    _assert_same_step(_module(), tensors, none_masked)
    mask = sample_input_mask(tensors["sentence"], 60, generator=torch.Generator().manual_seed(0))
    _assert_same_step(_module(masked_recon_weight=0.0), tensors, mask)


def test_unmeasured_genes_get_no_gradient_from_the_sparse_loss():
    """Genes no cell of the mini-batch measured are never computed: zero gradient in the decoder's
    output rows and dispersions, and in the gene table."""
    panels = torch.zeros(2, 60, dtype=torch.bool)
    panels[0, :30], panels[1, 20:40] = True, True
    module = _module(panels=panels)
    tensors = _tensors(n_dataset=2)
    tensors["X"][:, 40:] = 0  # unmeasured genes are zeros in the corpus
    mask = sample_input_mask(tensors["sentence"], 60, generator=torch.Generator().manual_seed(1))
    _, _, grads = _step(module, tensors, mask, sparse=True)
    assert grads["decoder.mean.weight"][40:].abs().sum() == 0
    assert grads["decoder.log_theta"][40:].abs().sum() == 0
    assert grads["embedder.gene_table"][40:].abs().sum() == 0
    assert grads["decoder.mean.weight"][:40].abs().sum() > 0
    assert grads["embedder.gene_table"][:40].abs().sum() > 0


def test_embedding_bag_expression_equals_dense_product(nonzero_path):
    """The training embedder (bags of the shown non-zeros) equals log1p(masked x) @ table."""
    module = _module()
    tensors = _tensors()
    x = tensors["X"]
    hide = torch.rand(x.shape) < 0.3
    index = torch.randperm(60)[:60]
    index[5] = -1
    keep = torch.rand(60) < 0.8
    emb = module.embedder
    for gene_index, kept in ((None, None), (index, keep)):
        expected = emb.expression(x.masked_fill(hide, 0.0), gene_index, keep=kept)
        got = emb.expression_of_entries(x, hide, gene_index, keep=kept)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_inference_is_untouched_by_the_sparse_loss():
    """Without autograd, or in eval mode, the module computes what it did: the flag only changes a
    training step."""
    module = _module()
    tensors = _tensors()
    outputs = {}
    for sparse in (False, True):
        module.sparse_loss = sparse
        module.eval()
        inf, gen = module(tensors, compute_loss=False)
        module.train()
        with torch.no_grad():
            torch.manual_seed(0)
            _, gen_train = module(tensors, compute_loss=False)
        outputs[sparse] = (inf["qzm"], gen["px_scale"], gen["px_rate"], gen_train["px_scale"])
    for a, b in zip(outputs[False], outputs[True]):
        assert torch.equal(a, b)


def test_bf16_autocast_training_step_stays_finite_and_close():
    """Under bfloat16 autocast (Lightning's ``precision="bf16-mixed"``) the sparse loss keeps its
    activations in float32: finite, close to the float32 loss."""
    module = _module()
    tensors = _tensors()
    mask = sample_input_mask(tensors["sentence"], 60, generator=torch.Generator().manual_seed(3))
    reference, _, _ = _step(module, tensors, mask, sparse=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, grads = _step(module, tensors, mask, sparse=True)
    assert np.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    np.testing.assert_allclose(loss, reference, rtol=0.05)


def test_model_training_history_is_the_same_with_the_sparse_loss(small_pancreas):
    """A model trained from scratch on an AnnData (vocabulary = its genes, every entry measured)
    sees the same per-epoch losses with the fast step as with the dense reference."""
    import scvi_cellplm

    scvi_cellplm.CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    histories = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = scvi_cellplm.CellPLM(small_pancreas, **TINY)
        model.module.sparse_loss = sparse
        torch.manual_seed(1)
        model.train(max_epochs=4, accelerator="cpu", enable_progress_bar=False)
        histories[sparse] = model.history["train_loss"].to_numpy(dtype=float).ravel()
    np.testing.assert_allclose(histories[True], histories[False], rtol=1e-4)


def test_mixed_precision_training_runs_with_gradient_clipping(small_pancreas):
    """``train(precision="bf16-mixed")`` with the default gradient clipping trains (the fused AdamW,
    which Lightning refuses to clip under mixed precision, is kept for full-precision runs)."""
    import scvi_cellplm

    scvi_cellplm.CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = scvi_cellplm.CellPLM(small_pancreas, **TINY)
    model.train(max_epochs=2, accelerator="cpu", precision="bf16-mixed", enable_progress_bar=False)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert model.is_trained
