"""Quality by default: CellPLM (defaults) vs scVI (defaults) vs PCA on every labelled set.

Each labelled raw-count set of ``../shared/data`` is read as shipped, its raw counts put in
``.layers['counts']`` and cut to the same 2,000 highly variable genes for every method
(``seurat_v3`` on counts, per batch when there is one). Then, for each seed:

- **CellPLM**, as the README shows: ``CellPLM.setup_anndata(adata, layer="counts",
  batch_key=...)``, ``CellPLM(adata)``, ``model.train()`` — no arguments;
- **scVI**, its defaults: ``SCVI.setup_anndata(adata, layer="counts", batch_key=...)``,
  ``SCVI(adata)``, ``model.train()``;
- **PCA**: 50 components of log-normalised counts (``normalize_total`` + ``log1p``).

Each embedding is scored with scib-metrics' :class:`~scib_metrics.benchmark.Benchmarker`
(bio conservation, batch correction where the set has batches; ``Total`` unscaled, so runs score
independently; on a set without batches the total is the bio-conservation score) and with Leiden
clusters of its 15-nearest-neighbour graph against the labels:
"sweep" is scib-metrics' resolution sweep (``nmi_ari_cluster_labels_leiden``), "matched" the
resolution giving as many clusters as labels (bisection). Times are wall seconds of training +
embedding. Runs are cached per (dataset, method, variant, seed) in ``--cache`` so a variant can be
added without re-running the baselines.

    python benchmarks/quality.py                                  # 4 sets x 3 seeds, ~1 h on 2 cores
    python benchmarks/quality.py --methods cellplm --label lr3e-3 \\
        --cellplm-train '{"lr": 3e-3}'                             # an ablation row (labelled)
    python benchmarks/quality.py --genes all --methods cellplm    # every gene, as shipped
    python benchmarks/quality.py --table-only --plot docs/_static/quality_tradeoff.png
    python benchmarks/quality.py --methods cellplm --datasets pancreas_nobatch  # without its batch key
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
# file, labels key, batch key (None: one batch)
DATASETS = {
    "pancreas": ("baron_human_pancreas.h5ad", "cell_type", "batch"),
    "pancreas_4donors": ("baron_human_pancreas_4donors.h5ad", "cell_type", "batch"),
    "mouse_pancreas": ("baron_mouse_pancreas.h5ad", "cell_type", "batch"),
    "mouse_brain": ("zeisel_mouse_brain.h5ad", "cell_type", None),
}
# the pancreas sets read without their batch key, as a user who registers none does (one batch:
# CellPLM's one-batch defaults; scored on bio conservation only); run by name, not by default
ONE_BATCH = {f"{name}_nobatch": (file, labels, None)
             for name, (file, labels, batch) in DATASETS.items() if batch is not None}
ALL_SETS = {**DATASETS, **ONE_BATCH}
N_HVG = 2000


def load(name: str, genes: str):
    """Raw counts of a labelled set in ``.layers['counts']``, cut to the benchmark's genes."""
    import anndata as ad
    import scanpy as sc

    file, labels, batch = ALL_SETS[name]
    adata = ad.read_h5ad(SHARED / file)
    adata.layers["counts"] = adata.X.copy()
    adata = adata[np.asarray(adata.layers["counts"].sum(1)).ravel() > 0].copy()
    if genes == "hvg":
        sc.pp.highly_variable_genes(adata, n_top_genes=N_HVG, flavor="seurat_v3", layer="counts",
                                    batch_key=batch, subset=True)
    adata.obs["_batch"] = adata.obs[batch].astype(str) if batch else "all"
    adata.obs["_labels"] = adata.obs[labels].astype(str)
    return adata


def embed(method: str, adata, seed: int, model_kwargs: dict, train_kwargs: dict, batch: str | None):
    """Train ``method`` on ``adata`` at its defaults (plus the variant's kwargs); the embedding."""
    import scanpy as sc
    import scvi

    scvi.settings.seed = seed
    quiet = {"enable_progress_bar": False}
    if method == "cellplm":
        from scvi_cellplm import CellPLM

        data = adata.copy()
        CellPLM.setup_anndata(data, layer="counts", batch_key=batch)
        model = CellPLM(data, **model_kwargs)
        model.train(seed=seed, **quiet, **train_kwargs)
        return model.get_latent_representation(), int(model.trainer.global_step)
    if method == "scvi":
        data = adata.copy()
        scvi.model.SCVI.setup_anndata(data, layer="counts", batch_key=batch)
        model = scvi.model.SCVI(data)
        model.train(**quiet)
        return model.get_latent_representation(), int(model.trainer.global_step)
    if method == "pca":
        data = adata.copy()
        data.X = data.layers["counts"].copy()
        sc.pp.normalize_total(data, target_sum=1e4)
        sc.pp.log1p(data)
        sc.pp.pca(data, n_comps=50, random_state=seed)
        return data.obsm["X_pca"], 0
    raise ValueError(method)


def matched_leiden(neighbors, labels: np.ndarray, seed: int) -> tuple[float, float, int]:
    """ARI and NMI at the Leiden resolution giving as many clusters as labels (bisection)."""
    import random

    import igraph
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    n_cells, k = neighbors.indices.shape
    edges = np.stack([np.repeat(np.arange(n_cells), k), neighbors.indices.ravel()], 1)
    graph = igraph.Graph(n=n_cells, edges=edges[edges[:, 0] != edges[:, 1]].tolist()).simplify()
    target = len(np.unique(labels))

    def clusters(resolution: float) -> np.ndarray:
        random.seed(seed)  # igraph's Leiden draws from Python's random module
        part = graph.community_leiden(objective_function="modularity", resolution=resolution,
                                      n_iterations=2)
        return np.asarray(part.membership)

    lo, hi, best = 0.01, 5.0, None
    for _ in range(25):
        mid = (lo + hi) / 2
        member = clusters(mid)
        n = len(np.unique(member))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (member, n)
        if n == target:
            break
        lo, hi = (mid, hi) if n < target else (lo, mid)
    member, n = best
    return adjusted_rand_score(labels, member), normalized_mutual_info_score(labels, member), n


def low_resolution_sweep(neighbors, labels: np.ndarray, seed: int, grid: tuple[float, float]) -> tuple[float, float]:
    """NMI and ARI of the best-NMI partition over 0.05, 0.1, 0.15 and scib-metrics' sweep.

    ``grid`` is scib-metrics' own ``(nmi, ari)`` over its resolutions 0.2, ..., 2.0; a graph that
    splits into more communities at each resolution (CellPLM's, on some sets) has its best
    partition below that (docs/user_guide/quality.md, "One batch"). The three lower resolutions
    use scib-metrics' graph and Leiden call.
    """
    import random

    import igraph
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    graph = igraph.Graph.Weighted_Adjacency(neighbors.knn_graph_connectivities, mode="directed")
    graph.to_undirected(mode="each")
    best = grid
    for resolution in (0.05, 0.1, 0.15):
        igraph.set_random_number_generator(random.Random(seed))
        member = graph.community_leiden(objective_function="modularity", weights="weight",
                                        resolution=resolution).membership
        nmi = normalized_mutual_info_score(labels, member)
        if nmi > best[0]:
            best = (nmi, adjusted_rand_score(labels, member))
    return best


def score(adata, embedding: np.ndarray, seed: int, has_batch: bool) -> dict:
    """scib-metrics Benchmarker totals + Leiden ARI/NMI (sweep and matched)."""
    import scib_metrics
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    from scib_metrics.nearest_neighbors import pynndescent

    data = adata.copy()
    data.X = data.layers["counts"].astype(np.float32)
    data.obsm["emb"] = np.asarray(embedding, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = Benchmarker(data, batch_key="_batch", label_key="_labels", embedding_obsm_keys=["emb"],
                         bio_conservation_metrics=BioConservation(),
                         batch_correction_metrics=BatchCorrection() if has_batch else None,
                         progress_bar=False)
        bm.benchmark()
        table = bm.get_results(min_max_scale=False)
    row = table.loc["emb"]
    out = {str(k): float(v) for k, v in row.items() if isinstance(v, (int, float, np.floating))}
    if not has_batch:  # one batch: nothing to correct, the total is the bio-conservation score
        out["Total"] = out["Bio conservation"]
    labels = data.obs["_labels"].to_numpy()
    neighbors = pynndescent(data.obsm["emb"], n_neighbors=15, random_state=seed)
    sweep = scib_metrics.nmi_ari_cluster_labels_leiden(neighbors, labels, optimize_resolution=True,
                                                       seed=seed)
    out["ARI sweep"], out["NMI sweep"] = float(sweep["ari"]), float(sweep["nmi"])
    low = low_resolution_sweep(neighbors, labels, seed, (out["NMI sweep"], out["ARI sweep"]))
    out["NMI sweep from 0.05"], out["ARI sweep from 0.05"] = map(float, low)
    ari, nmi, n = matched_leiden(neighbors, labels, seed)
    out["ARI matched"], out["NMI matched"], out["clusters matched"] = ari, nmi, n
    return out


def quiet_torch(threads: int):
    """torch on ``threads`` threads, with Lightning's and scvi-tools' logs and warnings off."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return torch


def read_cache(path: Path) -> list[dict]:
    """The runs cached in the JSON-lines file ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_run(path: Path, cached: list[dict], record: dict) -> None:
    """Add ``record`` to ``cached`` and to the JSON-lines cache ``path`` (kept if a later run fails)."""
    cached.append(record)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def group_runs(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The runs of each (dataset, method), in the order first seen."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    return groups


def summarise(records: list[dict]) -> str:
    """Markdown table: mean ± sd over seeds per (dataset, method)."""
    cols = ["Total", "Bio conservation", "Batch correction", "ARI sweep", "NMI sweep", "ARI matched",
            "NMI matched", "seconds"]
    groups = group_runs(records)
    lines = ["| dataset | method | seeds | " + " | ".join(cols) + " |",
             "|" + "---|" * (3 + len(cols))]
    for (dataset, method), rows in groups.items():
        cells = []
        for c in cols:
            v = np.array([r["scores"].get(c, np.nan) if c != "seconds" else r["seconds"] for r in rows],
                         dtype=float)
            if np.all(np.isnan(v)):
                cells.append("–")
            elif c == "seconds":
                cells.append(f"{np.nanmean(v):.0f} ± {np.nanstd(v):.0f}")
            else:
                cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
        lines.append(f"| {dataset} | {method} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(records: list[dict], path: Path) -> None:
    """Scatter per dataset: scib-metrics total against swept Leiden ARI, one point per method/variant.

    Each point is the mean over a variant's seeds; CellPLM's defaults, scVI and PCA are labelled,
    every other CellPLM variant of the cache (the ablations and screens) is a grey point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(records)
    names = [d for d in DATASETS if any(dataset == d for dataset, _ in groups)]
    cols = min(len(names), 2)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    marks = {"cellplm (defaults)": ("tab:red", "o", "CellPLM defaults"), "scvi": ("tab:blue", "s", "scVI"),
             "pca": ("tab:green", "^", "PCA")}
    axis = dict(zip(names, axes.ravel()))
    for (name, method), runs in groups.items():
        x = np.mean([r["scores"]["Total"] for r in runs])
        y = np.mean([r["scores"]["ARI sweep"] for r in runs])
        colour, marker, text = marks.get(method, ("0.6", ".", None))
        axis[name].scatter(x, y, c=colour, marker=marker, s=60 if text else 25, zorder=3 if text else 2,
                           label=f"{text} ({len(runs)} seeds)" if text else None)
    for name, ax in axis.items():
        ax.set(title=name, xlabel="scib-metrics total", ylabel="Leiden ARI (sweep)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.suptitle("Grey: other CellPLM variants (ablations and screens), mean over their seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"Plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(ALL_SETS),
                        help="default: the four labelled sets; NAME_nobatch: a pancreas set without its batch key")
    parser.add_argument("--methods", nargs="+", default=["cellplm", "scvi", "pca"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--genes", choices=["hvg", "all"], default="hvg",
                        help="hvg: the same 2,000 HVGs for every method; all: every gene as shipped")
    parser.add_argument("--label", default="defaults", help="name of the CellPLM variant")
    parser.add_argument("--cellplm-model", type=json.loads, default={}, help="JSON kwargs of CellPLM()")
    parser.add_argument("--cellplm-train", type=json.loads, default={}, help="JSON kwargs of train()")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "quality_runs.jsonl")
    parser.add_argument("--rerun", action="store_true", help="ignore cached runs")
    parser.add_argument("--table-only", action="store_true", help="print the cached table")
    parser.add_argument("--plot", type=Path, help="also draw total vs Leiden ARI per dataset (PNG)")
    args = parser.parse_args()

    torch = quiet_torch(args.threads)
    cached = read_cache(args.cache)
    done = {(r["dataset"], r["method"], r["seed"], r["genes"]) for r in cached}
    if not args.table_only:
        for name in args.datasets:
            adata = None
            for seed in args.seeds:
                for method in args.methods:
                    label = f"cellplm ({args.label})" if method == "cellplm" else method
                    if (name, label, seed, args.genes) in done and not args.rerun:
                        continue
                    if adata is None:
                        adata = load(name, args.genes)
                    batch = ALL_SETS[name][2]
                    start = time.perf_counter()
                    emb, steps = embed(method, adata, seed, args.cellplm_model, args.cellplm_train, batch)
                    seconds = time.perf_counter() - start
                    scores = score(adata, emb, seed, batch is not None)
                    record = {"dataset": name, "method": label, "seed": seed, "genes": args.genes,
                              "n_obs": adata.n_obs, "n_vars": adata.n_vars, "steps": steps,
                              "seconds": seconds, "scores": scores,
                              "cellplm_model": args.cellplm_model, "cellplm_train": args.cellplm_train,
                              "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                                         f"{args.threads} threads, torch {torch.__version__}"}
                    append_run(args.cache, cached, record)
                    print(f"{name} {label} seed {seed}: total {scores.get('Total', np.nan):.3f} "
                          f"ARI sweep {scores['ARI sweep']:.3f} matched {scores['ARI matched']:.3f} "
                          f"({seconds:.0f} s, {steps} steps)", flush=True)
    wanted = [r for r in cached if r["genes"] == args.genes and r["dataset"] in args.datasets]
    print(f"\nGenes: {args.genes}; {wanted[0]['machine'] if wanted else ''}")
    print(summarise(sorted(wanted, key=lambda r: (list(ALL_SETS).index(r["dataset"]), r["method"]))))
    if args.plot:
        plot_tradeoff(wanted, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
