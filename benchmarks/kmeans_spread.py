"""How much of scib-metrics' KMeans score is the embedding, and how much one k-means start.

scib-metrics' ``Benchmarker`` scores KMeans NMI/ARI from **one** k-means++ run with a fixed seed
(``scib_metrics.utils.KMeans(n_clusters)``: ``n_init=1``, ``seed=0``). Where the clusters are
unequal in size, different starts converge to different partitions of the same embedding, so one
start is a draw, not a property of the embedding. This script embeds a set exactly as
``benchmarks/quality.py`` does (same genes, same defaults, same seeds: its ``embed``), then scores
each embedding with scib-metrics' own KMeans at the Benchmarker's start (seed 0, the number in the
quality table) and at ``--starts`` starts (seeds 0..N-1), and prints the mean and spread per
method next to each other.

    python benchmarks/kmeans_spread.py --datasets mouse_brain --seeds 0 1 2 --threads 1
    python benchmarks/kmeans_spread.py --methods pca --datasets mouse_brain   # seconds
    python benchmarks/kmeans_spread.py --methods cellplm --label "token_norm sample" \
        --cellplm-model '{"token_norm": "sample"}'      # a CellPLM variant, as in quality.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from quality import DATASETS, ROOT, append_run, embed, load, quiet_torch, read_cache


def kmeans_scores(embedding: np.ndarray, labels: np.ndarray, starts: int) -> dict:
    """scib-metrics' KMeans NMI/ARI at its own start (seed 0) and over ``starts`` seeds."""
    from scib_metrics.utils import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    n_clusters = len(np.unique(labels))
    ari, nmi = [], []
    for seed in range(starts):
        pred = KMeans(n_clusters, seed=seed).fit(np.asarray(embedding, dtype=np.float32)).labels_
        ari.append(adjusted_rand_score(labels, pred))
        nmi.append(normalized_mutual_info_score(labels, pred, average_method="arithmetic"))
    return {"ari_start0": ari[0], "nmi_start0": nmi[0], "ari": ari, "nmi": nmi}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mouse_brain"])
    parser.add_argument("--methods", nargs="+", default=["cellplm", "scvi", "pca"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--starts", type=int, default=20, help="k-means starts (seeds) per embedding")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "kmeans_spread_runs.jsonl")
    parser.add_argument("--cellplm-model", type=json.loads, default={}, help="JSON kwargs of CellPLM()")
    parser.add_argument("--cellplm-train", type=json.loads, default={}, help="JSON kwargs of train()")
    parser.add_argument("--label", default=None, help="CellPLM variant: cached as 'cellplm (LABEL)'")
    args = parser.parse_args()
    if (args.cellplm_model or args.cellplm_train) and not args.label:
        parser.error("--cellplm-model/--cellplm-train need --label (the variant's name in the cache).")
    named = {m: f"{m} ({args.label})" if args.label and m == "cellplm" else m for m in args.methods}

    quiet_torch(args.threads)
    cached = read_cache(args.cache)
    done = {(r["dataset"], r["method"], r["seed"], r["starts"]) for r in cached}
    for name in args.datasets:
        adata = load(name, "hvg")
        labels = adata.obs["_labels"].to_numpy()
        for seed in args.seeds:
            for method in args.methods:
                if (name, named[method], seed, args.starts) in done:
                    continue
                start = time.perf_counter()
                emb, _ = embed(method, adata, seed, args.cellplm_model, args.cellplm_train, DATASETS[name][2])
                record = {"dataset": name, "method": named[method], "seed": seed, "starts": args.starts,
                          "seconds": time.perf_counter() - start,
                          **kmeans_scores(emb, labels, args.starts)}
                append_run(args.cache, cached, record)
                print(f"{name} {named[method]} seed {seed}: KMeans ARI at scib's start "
                      f"{record['ari_start0']:.3f}, over {args.starts} starts "
                      f"{np.mean(record['ari']):.3f} ± {np.std(record['ari']):.3f}", flush=True)
    print("\n| dataset | method | seeds | KMeans ARI, scib's start | KMeans ARI, mean of starts | "
          "KMeans NMI, scib's start | KMeans NMI, mean of starts |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets:
        for method in args.methods:
            rows = [r for r in cached if r["dataset"] == name and r["method"] == named[method]
                    and r["starts"] == args.starts and r["seed"] in args.seeds]
            if not rows:
                continue
            cells = []
            for key in ("ari", "nmi"):
                first = [r[f"{key}_start0"] for r in rows]
                every = [v for r in rows for v in r[key]]  # all starts of all seeds
                cells += [f"{np.mean(first):.3f} ± {np.std(first):.3f}",
                          f"{np.mean(every):.3f} ± {np.std(every):.3f}"]
            print(f"| {name} | {named[method]} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
