"""Spatial gene imputation benchmark (issue #5): kNN transfer vs CellPLM without / with positions.

Two settings on the real data in ``../shared/data``:

1. BDTNP Drosophila atlas (3,039 cells, 3-D positions, 84 genes, in-situ values) with its
   Drop-seq reference: the 84 genes are split into folds (20% each); each fold is hidden from
   the spatial data and imputed from the reference. Gaussian likelihood (values, not counts).
2. MERFISH U-2 OS (raw counts): batch B1 is the dissociated reference (coordinates dropped,
   all genes), B2/B3 the spatial target restricted to a 300-gene panel; 100 held-out genes are
   imputed. Negative-binomial likelihood; blank barcodes dropped.

For each, per-gene Pearson correlation and cosine similarity with the truth (averaged over genes)
for (a) kNN-in-expression transfer from the reference (SpaGE-like: z-scored shared genes, 10
neighbours), (b) CellPLM with ``positional_encoding="none"``, (c) CellPLM with the sinusoidal
encoding of the coordinates, (d) CellPLM with the neighbourhood layer instead (each cell's expression
embedding averaged with its 8 nearest cells', ``n_spatial_neighbors=8``); and, as a post-hoc
spatial-context baseline, rows (a), (b), (d) again after :func:`spatial_smoothing` of their
predictions (half a cell's own, half its 8 nearest cells' mean). All models are
trained here, in this process, on CPU, for the same number of optimisation steps in both settings
(``--steps``, default 900: 100 epochs of BDTNP's 9 mini-batches, 225 of MERFISH's 4; the learning
rate schedule spans the steps).

    python benchmarks/spatial_imputation.py [--settings bdtnp merfish] [--folds 5] [--steps 900]
                                            [--seed 0] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from scvi_cellplm.spatial import impute_genes

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


MODELS = (  # name, positional encoding, n_spatial_neighbors
    ("CellPLM, no positions", "none", 0),
    ("CellPLM, positions", "sinusoidal", 0),
    ("CellPLM, neighbours", "none", 8),
)
SMOOTHED = ("kNN transfer", "CellPLM, no positions", "CellPLM, neighbours")
"""Rows also scored after :func:`spatial_smoothing` (a post-hoc spatial-context baseline)."""
SMOOTH_NEIGHBOURS = 8


def spatial_smoothing(pred: np.ndarray, coords: np.ndarray, samples: np.ndarray,
                      k: int = SMOOTH_NEIGHBOURS) -> np.ndarray:
    """Half each cell's prediction, half the mean of its ``k`` nearest cells' (same sample)."""
    out = np.empty_like(pred)
    for sample in np.unique(samples):
        cells = np.flatnonzero(samples == sample)
        n = min(k + 1, len(cells))
        _, idx = NearestNeighbors(n_neighbors=n).fit(coords[cells]).kneighbors(coords[cells])
        out[cells] = 0.5 * pred[cells] + 0.5 * pred[cells][idx[:, 1:]].mean(axis=1)
    return out


def _record(results: dict, name: str, pred: np.ndarray, truth: np.ndarray, coords: np.ndarray,
            samples: np.ndarray) -> None:
    """Score ``pred`` as row ``name`` (and, for :data:`SMOOTHED` rows, its smoothed version)."""
    results.setdefault(name, []).append(gene_scores(pred, truth))
    if name in SMOOTHED:
        smoothed = spatial_smoothing(np.asarray(pred, dtype=np.float64), coords, samples)
        results.setdefault(f"{name} + smoothing", []).append(gene_scores(smoothed, truth))


def gene_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean over genes of Pearson's r and of the cosine similarity (genes with variance only)."""
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    pearson, cosine = [], []
    for j in range(truth.shape[1]):
        p, t = pred[:, j], truth[:, j]
        if t.std() == 0:
            continue
        pearson.append(0.0 if p.std() == 0 else np.corrcoef(p, t)[0, 1])
        cosine.append(p @ t / (np.linalg.norm(p) * np.linalg.norm(t) + 1e-12))
    return float(np.mean(pearson)), float(np.mean(cosine))


def knn_transfer(panel: np.ndarray, reference_panel: np.ndarray, reference_targets: np.ndarray,
                 k: int = 10) -> np.ndarray:
    """Average of the targets of each spatial cell's k nearest reference cells (z-scored panel)."""
    def z(a):
        return (a - a.mean(0)) / (a.std(0) + 1e-8)

    _, idx = NearestNeighbors(n_neighbors=k).fit(z(reference_panel)).kneighbors(z(panel))
    return reference_targets[idx].mean(axis=1)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


EPOCH_CAP = 100_000


def _train_kwargs(steps: int, seed: int) -> dict:
    """Training for ``steps`` optimisation steps (``max_epochs`` is set high enough never to bind)."""
    return {"max_epochs": EPOCH_CAP, "train_kwargs": {"seed": seed, "max_steps": steps}}


def bdtnp(folds: int, steps: int, seed: int) -> dict[str, list[tuple[float, float]]]:
    spatial = ad.read_h5ad(DATA / "bdtnp_drosophila_spatial.h5ad")
    reference = ad.read_h5ad(DATA / "drosophila_embryo_scrna_ref.h5ad")
    keep = reference.var["in_bdtnp_atlas"].to_numpy() | reference.var["highly_variable"].to_numpy()
    reference = reference[:, keep].copy()
    genes = np.asarray(spatial.var_names)
    order = np.random.default_rng(seed).permutation(len(genes))
    coords, samples = np.asarray(spatial.obsm["spatial"], dtype=np.float64), np.zeros(spatial.n_obs)
    results: dict[str, list] = {}
    for fold, hidden in enumerate(np.array_split(genes[order], 5)[:folds]):
        panel = spatial[:, ~spatial.var_names.isin(hidden)].copy()
        truth = _dense(spatial[:, hidden].X)
        shared = list(panel.var_names)
        knn = knn_transfer(_dense(panel.X), _dense(reference[:, shared].X), _dense(reference[:, hidden].X))
        _record(results, "kNN transfer", knn, truth, coords, samples)
        for name, pe, k in MODELS:
            pred, _ = impute_genes(panel, reference, genes=list(hidden), gene_likelihood="gaussian",
                                   positional_encoding=pe, n_spatial_neighbors=k, key_added=None,
                                   **_train_kwargs(steps, seed))
            _record(results, name, pred.to_numpy(), truth, coords, samples)
        print(f"  BDTNP fold {fold + 1}/{folds}: "
              + ", ".join(f"{k} r={v[-1][0]:.3f}" for k, v in results.items()), flush=True)
    return results


def _log_normalised(counts: np.ndarray, library: np.ndarray) -> np.ndarray:
    return np.log1p(counts / np.maximum(library, 1.0)[:, None] * 1e3)


def merfish(steps: int, seed: int, n_panel: int = 300, n_hidden: int = 100) -> dict[str, list]:
    import scanpy as sc

    adata = ad.read_h5ad(DATA / "merfish_u2os_spatial.h5ad")
    adata = adata[:, ~adata.var["is_blank"].to_numpy()].copy()
    reference = adata[adata.obs["batch"] == "B1"].copy()
    spatial = adata[adata.obs["batch"] != "B1"].copy()
    del reference.obsm["spatial"]
    # panel + hidden genes: the most variable genes of the reference (a realistic panel design)
    ref_norm = reference.copy()
    sc.pp.normalize_total(ref_norm)
    sc.pp.log1p(ref_norm)
    sc.pp.highly_variable_genes(ref_norm, n_top_genes=2000)
    hvg = ref_norm.var_names[ref_norm.var["highly_variable"].to_numpy()]
    detected = np.asarray((spatial[:, hvg].X > 0).mean(0)).ravel()
    candidates = hvg[np.argsort(-detected)[: n_panel + n_hidden]]
    chosen = np.random.default_rng(seed).permutation(candidates)
    panel_genes, hidden = list(chosen[:n_panel]), list(chosen[n_panel:])
    reference = reference[:, hvg].copy()
    panel = spatial[:, panel_genes].copy()
    panel_lib = _dense(panel.X).sum(1)
    truth = _log_normalised(_dense(spatial[:, hidden].X), panel_lib)
    ref_lib = _dense(reference[:, panel_genes].X).sum(1)
    knn = knn_transfer(
        _log_normalised(_dense(panel.X), panel_lib),
        _log_normalised(_dense(reference[:, panel_genes].X), ref_lib),
        _log_normalised(_dense(reference[:, hidden].X), ref_lib),
    )
    coords = np.asarray(spatial.obsm["spatial"], dtype=np.float64)
    samples = spatial.obs["batch"].to_numpy()
    results: dict[str, list] = {}
    _record(results, "kNN transfer", knn, truth, coords, samples)
    for name, pe, k in MODELS:
        pred, _ = impute_genes(panel, reference, genes=hidden, gene_likelihood="nb",
                               positional_encoding=pe, n_spatial_neighbors=k, sample_key="batch",
                               key_added=None, **_train_kwargs(steps, seed))
        # imputed counts are at each cell's panel library: same normalisation as the truth
        _record(results, name, _log_normalised(pred.to_numpy(), panel_lib), truth, coords, samples)
    print("  MERFISH: " + ", ".join(f"{k} r={v[-1][0]:.3f}" for k, v in results.items()), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5, help="BDTNP folds to run (of 5)")
    parser.add_argument("--steps", type=int, default=900, help="optimisation steps per model (both settings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", choices=["bdtnp", "merfish"], default=["bdtnp", "merfish"],
                        help="settings to run (default: both)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        raise SystemExit(f"needs the shared data folder {DATA}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tables = {}
    if "bdtnp" in args.settings:
        tables["BDTNP Drosophila (in-situ, 3-D)"] = bdtnp(args.folds, args.steps, args.seed)
    if "merfish" in args.settings:
        tables["MERFISH U-2 OS (counts)"] = merfish(args.steps, args.seed)
    print(f"\nSpatial imputation, mean over genes (BDTNP: {args.folds} fold(s) of 20% of the genes; "
          f"MERFISH: 100 genes); {args.steps} steps; seed {args.seed}; {torch.get_num_threads()} CPU threads; "
          f"{time.perf_counter() - start:.0f} s")
    width = max(len(method) for results in tables.values() for method in results)
    print(f"| {'setting':<32} | {'method':<{width}} | Pearson | cosine |")
    print(f"|{'-' * 34}|{'-' * (width + 2)}|---------|--------|")
    summary = {}
    for setting, results in tables.items():
        for method, scores in results.items():
            pearson, cosine = np.mean(scores, axis=0)
            summary[f"{setting} / {method}"] = {"pearson": pearson, "cosine": cosine}
            print(f"| {setting:<32} | {method:<{width}} | {pearson:7.3f} | {cosine:6.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
