"""The batch adversary: what ``CellPLM(adata).train()`` does with the registered batches.

A classifier learns each cell's batch from its latent mean while the encoder, through gradient
reversal, learns to hide it (the decoder, which is given the batch, carries the batch effect).
``docs/user_guide/quality.md`` measures what it does to the scib-metrics batch scores; these
tests pin down when it is on and what it computes.
"""

from __future__ import annotations

import math

import pytest
import torch

import scvi_cellplm
from scvi_cellplm import CellPLM
from scvi_cellplm.train import BatchAdversary, CellPLMTrainingPlan

from .conftest import TINY


def test_the_encoder_gets_the_reversed_gradient_of_the_batch_classifier():
    torch.manual_seed(0)
    adversary = BatchAdversary(n_latent=6, n_batch=3).eval()  # eval: no dropout, fixed norm
    qzm = torch.randn(40, 6, requires_grad=True)
    batch = torch.randint(0, 3, (40, 1))
    adversary(qzm, batch).backward()
    reversed_grad = qzm.grad.clone()
    qzm.grad = None
    plain = torch.nn.functional.cross_entropy(adversary.classifier(qzm), batch.view(-1))
    plain.backward()
    assert torch.allclose(reversed_grad, -qzm.grad)
    classifier_grads = [p.grad for p in adversary.classifier.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in classifier_grads)  # it learns the batch


def test_the_classifier_detects_a_batch_shift_in_single_batch_mini_batches():
    # a training mini-batch is often one sentence, i.e. one batch: a batch-wide shift of the
    # latent must stay visible to the classifier (batch normalisation would erase it)
    torch.manual_seed(0)
    adversary = BatchAdversary(n_latent=4, n_batch=2)
    optimiser = torch.optim.Adam(adversary.parameters(), lr=1e-2)
    shift = torch.tensor([3.0, 0.0, 0.0, 0.0])
    for step in range(300):
        b = step % 2
        qzm = torch.randn(64, 4) + b * shift
        loss = adversary(qzm, torch.full((64,), b))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    adversary.eval()
    losses = [float(adversary(torch.randn(256, 4) + b * shift, torch.full((256,), b))) for b in (0, 1)]
    assert max(losses) < 0.4 < math.log(2)  # better than chance on each batch alone


def test_cellplm_trains_with_a_batch_adversary_by_default(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    assert small_pancreas.obs["batch"].nunique() > 1
    model = CellPLM(small_pancreas, **TINY)
    model.train(max_steps=4, enable_progress_bar=False)
    plan = model.trainer.lightning_module
    assert plan.batch_adversarial_weight == 5.0
    assert isinstance(plan.batch_adversary, BatchAdversary)
    optimised = {id(p) for group in plan.optimizers().optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in plan.batch_adversary.parameters())
    assert "batch_adversary_train" in model.history
    assert not any(k.startswith("batch_adversary") for k in model.module.state_dict())  # not saved


def test_batch_adversary_can_be_turned_off_and_needs_two_batches(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, **TINY)
    model.train(max_steps=2, enable_progress_bar=False, plan_kwargs={"batch_adversarial_weight": 0.0})
    assert model.trainer.lightning_module.batch_adversary is None
    assert "batch_adversary_train" not in model.history
    one = small_pancreas.copy()
    CellPLM.setup_anndata(one, layer="counts")  # no batch_key: one batch, nothing to hide
    single = CellPLM(one, **TINY)
    single.train(max_steps=2, enable_progress_bar=False)
    assert single.trainer.lightning_module.batch_adversary is None
    with pytest.raises(scvi_cellplm.InputDataError, match="batch_adversarial_weight"):
        CellPLMTrainingPlan(model.module, batch_adversarial_weight=-1.0)


def test_no_batch_adversary_without_batch_in_the_decoder(small_pancreas):
    CellPLM.setup_anndata(small_pancreas, layer="counts", batch_key="batch")
    model = CellPLM(small_pancreas, batch_in_decoder=False, **TINY)
    model.train(max_steps=2, enable_progress_bar=False)
    assert model.trainer.lightning_module.batch_adversary is None
