"""Perturbation prediction (experimental) on real control cells with synthetic perturbations.

The screen is built from the bundled pancreas cells: a perturbation of gene ``g`` sets ``g`` to
zero and scales a known set of target genes by a known factor (Poisson up, binomial thinning
down); a combination applies both effects. Perturbed cells of the training screen and of the
held-out evaluation come from disjoint pools of real cells.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import TINY
from scipy import sparse

from scvi_cellplm import CellPLM, CellPLMPerturbation, InputDataError
from scvi_cellplm.data._perturbation import log_normalize

EFFECTS = {"A": 5.0, "B": 0.1, "C": 5.0}  # gene label -> factor on its targets
PERTURBATIONS = ["A", "B", "C", "A+B"]


def _perturb(counts: np.ndarray, perturbation: str, design: dict, rng) -> np.ndarray:
    x = counts.copy()
    for label in perturbation.split("+"):
        gene, targets, factor = design[label]
        x[:, targets] = rng.poisson(x[:, targets] * factor) if factor > 1 else rng.binomial(
            x[:, targets].astype(np.int64), factor)
        x[:, gene] = 0
    return x.astype(np.float32)


def make_screen(pancreas: ad.AnnData, n_train: int = 90, n_test: int = 60, seed: int = 0):
    """Training screen, held-out perturbed cells by perturbation, control counts, and the columns
    each perturbation changes (perturbed genes and their targets)."""
    rng = np.random.default_rng(seed)
    counts = pancreas.layers["counts"].toarray()
    expressed = np.argsort(-(counts > 0).mean(0))[:60]  # perturbed and target genes: well detected
    genes = rng.choice(expressed, 3 + 3 * 12, replace=False)
    design = {
        label: (int(genes[i]), genes[3 + 12 * i : 3 + 12 * (i + 1)], factor)
        for i, (label, factor) in enumerate(EFFECTS.items())
    }
    names = {label: pancreas.var_names[g] for label, (g, _, _) in design.items()}
    cells = rng.permutation(pancreas.n_obs)
    control, train_pool, test_pool = np.array_split(cells, [pancreas.n_obs // 2, 3 * pancreas.n_obs // 4])
    sources, labels, test = [control], ["control"] * len(control), {}
    for p in PERTURBATIONS:
        real = "+".join(names[label] for label in p.split("+"))
        sources.append(rng.choice(train_pool, n_train))
        labels += [real] * n_train
        test[real] = _perturb(counts[rng.choice(test_pool, n_test)], p, design, rng)
    blocks = [counts[control]] + [_perturb(counts[s], p, design, rng) for s, p in zip(sources[1:], PERTURBATIONS)]
    source = np.concatenate(sources)
    screen = ad.AnnData(sparse.csr_matrix(np.vstack(blocks)), var=pancreas.var[[]].copy())
    screen.obs_names = [f"cell{i}" for i in range(screen.n_obs)]
    screen.obs["perturbation"] = pd.Categorical(labels)
    screen.obs["batch"] = pancreas.obs["batch"].to_numpy()[source]
    screen.layers["counts"] = screen.X.copy()
    affected = {
        "+".join(names[label] for label in p.split("+")): np.concatenate(
            [[design[label][0]] for label in p.split("+")] + [design[label][1] for label in p.split("+")])
        for p in PERTURBATIONS
    }
    return screen, test, counts[control], affected


@pytest.fixture
def screen(pancreas_session):
    """A screen on 300 genes of the bundled pancreas cells (one library: one control sentence)."""
    genes = np.argsort(-np.asarray(pancreas_session.X.sum(0)).ravel())[:300]
    lib = pancreas_session[pancreas_session.obs["batch"] == "human1_lib2"][:, np.sort(genes)].copy()
    return make_screen(lib)


@pytest.fixture
def backbone(screen):
    adata = screen[0]
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    model = CellPLM(adata, **TINY)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model


def test_perturbation_head_beats_no_change_on_held_out_cells(screen, backbone):
    adata, held_out, control, affected = screen
    pert = CellPLMPerturbation.from_cellplm_model(backbone, adata, max_cells_per_batch=128)
    assert pert.training_perturbations_ == sorted(held_out)
    untrained = pert.predict(perturbations=list(held_out))
    baseline = log_normalize(control, 1e4).mean(0)
    np.testing.assert_allclose(untrained.X, np.broadcast_to(baseline, untrained.shape), atol=1e-4)

    pert.train(max_epochs=60, max_cells_per_batch=256, lr=3e-3, enable_progress_bar=False)
    pred = pert.predict(perturbations=list(held_out))
    assert isinstance(pred, ad.AnnData) and pred.shape == (len(held_out), adata.n_vars)
    assert list(pred.obs_names) == list(held_out) and list(pred.var_names) == list(adata.var_names)
    assert (pred.obs["n_control_cells"] == (adata.obs["perturbation"] == "control").sum()).all()
    for name, cells in held_out.items():
        truth = log_normalize(cells, 1e4).mean(0)
        # all genes (the held-out cells differ from the controls in cell-type mix too) ...
        mse_model = np.mean((pred[name].X.ravel() - truth) ** 2)
        mse_baseline = np.mean((baseline - truth) ** 2)
        assert mse_model < 0.85 * mse_baseline, (name, mse_model, mse_baseline)
        # ... and the genes the perturbation changes
        genes = affected[name]
        mse_model = np.mean((pred[name].X.ravel()[genes] - truth[genes]) ** 2)
        mse_baseline = np.mean((baseline[genes] - truth[genes]) ** 2)
        assert mse_model < 0.5 * mse_baseline, (name, mse_model, mse_baseline)


def test_predict_outputs_per_cell_new_controls_and_save_load(screen, backbone, tmp_path):
    adata, held_out = screen[:2]
    pert = CellPLMPerturbation.from_cellplm_model(backbone, adata)
    pert.train(max_epochs=2, enable_progress_bar=False)
    n_control = int((adata.obs["perturbation"] == "control").sum())
    first = next(iter(held_out))
    cells = pert.predict(perturbations=["control", [first]], aggregate=False)
    assert cells.shape == (2 * n_control, adata.n_vars)
    assert list(cells.obs["perturbation"].cat.categories) == ["control", first]
    mean = pert.predict(perturbations=["control", first])
    np.testing.assert_allclose(cells[cells.obs["perturbation"] == first].X.mean(0), mean[first].X.ravel(),
                               rtol=1e-4, atol=1e-5)
    # new control cells without a perturbation column: all of them are controls
    controls = adata[adata.obs["perturbation"] == "control"].copy()
    del controls.obs["perturbation"]
    np.testing.assert_allclose(pert.predict(controls, perturbations=[first]).X, mean[[first]].X, atol=1e-5)
    pert.save(tmp_path / "pert")
    loaded = CellPLMPerturbation.load(tmp_path / "pert", adata=controls)
    assert loaded.training_perturbations_ == pert.training_perturbations_
    np.testing.assert_allclose(loaded.predict(perturbations=[first]).X, mean[[first]].X, atol=1e-5)


def test_unknown_genes_raise_and_unseen_genes_warn(screen, backbone):
    adata = screen[0]
    pert = CellPLMPerturbation.from_cellplm_model(backbone, adata)
    with pytest.raises(InputDataError, match="NOT_A_GENE"):
        pert.predict(perturbations=["NOT_A_GENE"])
    with pytest.raises(InputDataError, match="NOT_A_GENE"):
        pert.predict(perturbations=[f"{pert.perturbed_genes_[0]}+NOT_A_GENE"])
    unseen = next(g for g in adata.var_names if g not in pert.perturbed_genes_)
    with pytest.warns(UserWarning, match="never perturbed"):
        pert.predict(perturbations=[unseen])


def test_bad_screens_are_refused(screen, backbone):
    adata = screen[0].copy()
    with pytest.raises(InputDataError, match="control"):
        CellPLMPerturbation.from_cellplm_model(backbone, adata, control_category="ctrl")
    with pytest.raises(InputDataError, match="absent"):
        CellPLMPerturbation.from_cellplm_model(backbone, adata, perturbation_key="absent")
    adata.obs["perturbation"] = adata.obs["perturbation"].cat.add_categories("MISSINGGENE")
    adata.obs.iloc[-1, adata.obs.columns.get_loc("perturbation")] = "MISSINGGENE"
    with pytest.raises(InputDataError, match="MISSINGGENE"):
        CellPLMPerturbation.from_cellplm_model(backbone, adata)


def test_screen_with_fewer_genes_aligns_to_the_backbone_vocabulary(screen, backbone):
    adata = screen[0]
    perturbed = {g for p in adata.obs["perturbation"].cat.categories if p != "control" for g in p.split("+")}
    dropped = [g for g in adata.var_names if g not in perturbed][:50]
    sub = adata[:, ~adata.var_names.isin(dropped)].copy()
    pert = CellPLMPerturbation.from_cellplm_model(backbone, sub)
    assert pert.module.gene_index is not None  # the head's genes, placed in the vocabulary
    table = backbone.module.embedder.gene_table.detach()
    np.testing.assert_array_equal(pert.module.backbone.embedder.gene_table.detach().numpy(),
                                  table.numpy())
    pert.train(max_epochs=1, enable_progress_bar=False)
    pred = pert.predict(perturbations=[sorted(perturbed)[0]])
    assert pred.shape == (1, sub.n_vars) and list(pred.var_names) == list(sub.var_names)
