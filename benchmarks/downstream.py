"""Downstream tasks: CellPLM against scvi-tools baselines trained in the same run (CPU).

1. Zero-shot clustering (Baron pancreas, 1,937 cells, 14 types): Leiden at one fixed resolution
   (1.0, :func:`scvi_cellplm.evaluation.cluster_scores`) on the kNN graph of each embedding —
   CellPLM pretrained without labels vs ``scvi.model.SCVI`` vs PCA of log-normalised counts.
   ARI and NMI against the authors' cell types.
2. Annotation by library (leave one library out, the three folds averaged): labels of two
   libraries, the third predicted — ``CellPLMAnnotator`` fine-tuned from the pretrained CellPLM
   vs ``scvi.model.SCANVI`` from the pretrained SCVI vs logistic regression on the PCA. All three
   see the held-out library's expression (without labels) during unsupervised pretraining or PCA,
   none its labels. Accuracy and macro F1 on the held-out library.
3. Denoising (PBMC 3k): 10% of the non-zero counts are set to zero
   (:func:`scvi_cellplm.evaluation.hold_out_counts`); CellPLM and SCVI train on what is left and
   predict the hidden counts at each cell's observed library size. RMSE and MAE on log1p
   (:func:`scvi_cellplm.evaluation.denoising_errors`); lower is better.

Both datasets are cut to 2,000 highly variable genes (seurat_v3 on counts). The baselines use
scvi-tools' defaults (SCVI: ``n_latent=10``, epochs by scvi-tools' heuristic; SCANVI: 20 epochs,
100 samples per label, as in the scvi-tools tutorials). CellPLM is trained at its defaults
(`CellPLM(adata)`, `train()`), the annotator at its own. The script prints one table.

    python benchmarks/downstream.py               # about 20 min on 2 CPU cores
    python benchmarks/downstream.py --quick       # a smoke run: few epochs, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPLM_SHARED_DATA", ROOT / ".." / "shared" / "data"))
PANCREAS = SHARED / "baron_human_pancreas.h5ad"
PBMC = SHARED / "pbmc3k_raw.h5ad"

# CellPLM at its defaults (`CellPLM(adata)`, `train()`: the step budget on 256-cell random
# sentences); the annotator at its defaults (windows of 128 cells, 20 epochs)
CELLPLM: dict = {}
CELLPLM_TRAIN: dict = {}
CELLPLM_EPOCHS = None
ANNOTATOR_TRAIN = {"max_epochs": 20}
SCANVI_TRAIN = {"max_epochs": 20, "n_samples_per_label": 100}


def load(path: Path, n_hvg: int, batch_key: str | None):
    """Raw counts in ``.layers['counts']``, cut to ``n_hvg`` seurat_v3 genes, cells with counts."""
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=n_hvg, flavor="seurat_v3", batch_key=batch_key,
                                layer="counts", subset=True)
    adata = adata[np.asarray(adata.layers["counts"].sum(1)).ravel() > 0].copy()
    return adata


def pca(adata, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    import scanpy as sc

    base = sc.AnnData(adata.layers["counts"].copy())
    sc.pp.normalize_total(base, target_sum=1e4)
    sc.pp.log1p(base)
    sc.pp.pca(base, n_comps=n_comps, random_state=seed)
    return base.obsm["X_pca"]


def train_cellplm(adata, epochs: int | None, seed: int):
    from scvi_cellplm import CellPLM

    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch" if "batch" in adata.obs else None)
    model = CellPLM(adata, **CELLPLM)
    model.train(max_epochs=epochs, enable_progress_bar=False, seed=seed, **CELLPLM_TRAIN)
    return model


def train_scvi(adata, epochs: int | None):
    import scvi

    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch" if "batch" in adata.obs else None)
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    return model


def clustering_and_annotation(args, results: dict, seconds: dict) -> None:
    import scanpy as sc  # noqa: F401  (scanpy settings before scvi)
    import scvi
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from scvi_cellplm import CellPLMAnnotator
    from scvi_cellplm.evaluation import cluster_scores

    adata = load(PANCREAS, args.hvg, "batch")
    log(f"pancreas: {adata.n_obs} cells x {adata.n_vars} genes")
    scvi.settings.seed = args.seed
    start = time.perf_counter()
    adata.obsm["X_pca"] = pca(adata, seed=args.seed)
    seconds["PCA / LogReg"] = time.perf_counter() - start
    start = time.perf_counter()
    baselines = not args.cellplm_only
    if baselines:
        scvi_model = train_scvi(adata, args.scvi_epochs)
        adata.obsm["X_scvi"] = scvi_model.get_latent_representation()
        seconds["SCVI / SCANVI"] = time.perf_counter() - start
        log(f"SCVI trained in {seconds['SCVI / SCANVI']:.0f} s")
    scvi.settings.seed = args.seed
    start = time.perf_counter()
    cellplm = train_cellplm(adata, args.cellplm_epochs, args.seed)
    adata.obsm["X_cellplm"] = cellplm.get_latent_representation()
    seconds["CellPLM"] = time.perf_counter() - start
    log(f"CellPLM trained in {seconds['CellPLM']:.0f} s")
    for method, rep in (("CellPLM", "X_cellplm"), ("SCVI / SCANVI", "X_scvi"), ("PCA / LogReg", "X_pca")):
        if rep not in adata.obsm:
            continue
        ari, nmi, key = cluster_scores(adata, rep, "cell_type", seed=args.seed)
        results[("clustering", "ARI")][method] = ari
        results[("clustering", "NMI")][method] = nmi
        results[("clustering", "Leiden clusters")][method] = adata.obs[key].nunique()

    scores: dict[str, list] = {m: [] for m in ("CellPLM", "SCVI / SCANVI", "PCA / LogReg")}
    truth_all = adata.obs["cell_type"].astype(str).to_numpy()
    for held_out in adata.obs["batch"].cat.categories:
        test = (adata.obs["batch"] == held_out).to_numpy()
        adata.obs["label"] = np.where(test, "Unknown", truth_all)
        truth = truth_all[test]
        predictions = {}
        scvi.settings.seed = args.seed
        start = time.perf_counter()
        ann = CellPLMAnnotator.from_cellplm_model(cellplm, labels_key="label")
        ann.train(enable_progress_bar=False, seed=args.seed, **ANNOTATOR_TRAIN)
        predictions["CellPLM"] = np.asarray(ann.predict(), dtype=str)[test]
        seconds["CellPLM"] += time.perf_counter() - start
        if not baselines:
            scores["CellPLM"].append((accuracy_score(truth, predictions["CellPLM"]),
                                      f1_score(truth, predictions["CellPLM"], average="macro")))
            log(f"held out {held_out}: CellPLM acc {scores['CellPLM'][-1][0]:.3f} F1 {scores['CellPLM'][-1][1]:.3f}")
            continue
        scvi.settings.seed = args.seed
        start = time.perf_counter()
        scanvi = scvi.model.SCANVI.from_scvi_model(scvi_model, unlabeled_category="Unknown",
                                                   labels_key="label", adata=adata)
        scanvi.train(enable_progress_bar=False, **SCANVI_TRAIN)
        predictions["SCVI / SCANVI"] = np.asarray(scanvi.predict(), dtype=str)[test]
        seconds["SCVI / SCANVI"] += time.perf_counter() - start
        start = time.perf_counter()
        logreg = LogisticRegression(max_iter=2000).fit(adata.obsm["X_pca"][~test], truth_all[~test])
        predictions["PCA / LogReg"] = logreg.predict(adata.obsm["X_pca"][test])
        seconds["PCA / LogReg"] += time.perf_counter() - start
        for method, pred in predictions.items():
            scores[method].append((accuracy_score(truth, pred), f1_score(truth, pred, average="macro")))
        log(f"held out {held_out}: " + ", ".join(
            f"{m} acc {scores[m][-1][0]:.3f} F1 {scores[m][-1][1]:.3f}" for m in scores))
    for method, values in scores.items():
        if not values:
            continue
        results[("annotation", "accuracy")][method] = float(np.mean([v[0] for v in values]))
        results[("annotation", "macro F1")][method] = float(np.mean([v[1] for v in values]))


def denoising(args, results: dict, seconds: dict) -> None:
    import scvi

    from scvi_cellplm.evaluation import denoising_errors, hold_out_counts

    adata = load(PBMC, args.hvg, None)
    corrupted, held = hold_out_counts(adata, layer="counts", fraction=0.1, seed=args.seed)
    log(f"PBMC: {adata.n_obs} cells x {adata.n_vars} genes, {len(held.values):,} counts held out")
    if not args.cellplm_only:
        scvi.settings.seed = args.seed
        start = time.perf_counter()
        model = train_scvi(corrupted, args.scvi_epochs)
        pred = model.get_normalized_expression(library_size="latent", return_numpy=True)
        seconds["SCVI / SCANVI"] += time.perf_counter() - start
        for name, value in denoising_errors(pred, held).items():
            results[("denoising", f"{name.upper()} (lower better)")]["SCVI / SCANVI"] = value
    scvi.settings.seed = args.seed
    start = time.perf_counter()
    model = train_cellplm(corrupted, args.cellplm_epochs, args.seed)
    pred = model.get_normalized_expression(library_size="latent", return_numpy=True)
    seconds["CellPLM"] += time.perf_counter() - start
    for name, value in denoising_errors(pred, held).items():
        results[("denoising", f"{name.upper()} (lower better)")]["CellPLM"] = value


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hvg", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cellplm-epochs", type=int, default=CELLPLM_EPOCHS,
                        help="CellPLM training epochs (default: train()'s step budget)")
    parser.add_argument("--scvi-epochs", type=int, default=None,
                        help="SCVI epochs (default: scvi-tools' heuristic, 400 for these sizes)")
    parser.add_argument("--tasks", nargs="+", default=["clustering", "denoising"],
                        choices=["clustering", "denoising"], help="clustering includes annotation")
    parser.add_argument("--quick", action="store_true", help="2 epochs everywhere (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cellplm-only", action="store_true",
                        help="CellPLM rows only (compare with an earlier full run)")
    parser.add_argument("--cellplm-model", type=json.loads, default={},
                        help='JSON kwargs of CellPLM() on top of the defaults, e.g. \'{"n_latent": 32}\'')
    parser.add_argument("--cellplm-train", type=json.loads, default={},
                        help='JSON kwargs of CellPLM.train(), e.g. \'{"plan_kwargs": {"max_kl_weight": 2.0}}\'')
    args = parser.parse_args()
    CELLPLM.update(args.cellplm_model)
    CELLPLM_TRAIN.update(args.cellplm_train)
    if not PANCREAS.exists() or not PBMC.exists():
        print(f"needs {PANCREAS} and {PBMC} (the shared data folder)")
        return 1
    if args.quick:
        args.cellplm_epochs = args.scvi_epochs = 2
        ANNOTATOR_TRAIN["max_epochs"] = SCANVI_TRAIN["max_epochs"] = 2

    import scvi
    import torch

    import scvi_cellplm

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.utilities.rank_zero", "scvi", "scvi_cellplm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    methods = ("CellPLM", "SCVI / SCANVI", "PCA / LogReg")
    results: dict = {}
    for row in [("clustering", "ARI"), ("clustering", "NMI"), ("clustering", "Leiden clusters"),
                ("annotation", "accuracy"), ("annotation", "macro F1"),
                ("denoising", "RMSE (lower better)"), ("denoising", "MAE (lower better)")]:
        results[row] = {}
    seconds = dict.fromkeys(methods, 0.0)
    total = time.perf_counter()
    if "clustering" in args.tasks:
        clustering_and_annotation(args, results, seconds)
    if "denoising" in args.tasks:
        denoising(args, results, seconds)
    total = time.perf_counter() - total
    print()
    training = "defaults (step budget)" if args.cellplm_epochs is None else f"{args.cellplm_epochs} epochs"
    print(f"Downstream benchmark: {platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} "
          f"threads, torch {torch.__version__}, scvi-tools {scvi.__version__}, scvi-cellplm "
          f"{scvi_cellplm.__version__}; {args.hvg} HVGs; CellPLM "
          f"{training}; total {total / 60:.1f} min{' (QUICK: numbers meaningless)' if args.quick else ''}")
    header = f"| {'task':<10} | {'metric':<20} | " + " | ".join(f"{m:>13}" for m in methods) + " |"
    print(header)
    print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    for (task, metric), values in results.items():
        if not values:
            continue
        cells = []
        for m in methods:
            v = values.get(m)
            cells.append(f"{'n/a':>13}" if v is None else f"{v:>13d}" if isinstance(v, int | np.integer)
                         else f"{v:>13.3f}")
        print(f"| {task:<10} | {metric:<20} | " + " | ".join(cells) + " |")
    print(f"| {'time':<10} | {'training + inference':<20} | "
          + " | ".join(f"{seconds[m]:>11.0f} s" for m in methods) + " |")
    if args.json:
        args.json.write_text(json.dumps({
            "results": {f"{t}/{k}": {m: float(v) for m, v in vals.items()} for (t, k), vals in results.items()},
            "seconds": seconds, "total_seconds": total, "threads": args.threads,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
