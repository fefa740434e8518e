"""Cell-embedding inference: scvi-cellplm vs the official CellPLM package, same weights.

Builds the paper-size model (``../shared/data/official/cellplm_20230926_85M.config.json``: 4 x 1024
Flowformer, GMVAE 512, 19,374-gene vocabulary) with random weights in the official package, saves
it as an official checkpoint, loads it in ours with ``CellPLM.from_official``, and embeds the same
real cells (PBMC 3k, resampled) with both. Like the official run, all cells form one sentence.
Each measurement runs in a fresh subprocess (same threads) so peak RSS is its own, after a warm-up
call on 500 cells (one-time kernel selection, e.g. oneDNN's bf16 kernels); the embeddings
of both are compared (max abs difference) and the table prints ratios ours/official.

    python benchmarks/embedding_speed.py --sizes 2000 10000 48082 --threads 2 [--repeats 3]
    python benchmarks/embedding_speed.py --sizes 48082 --device cuda --bf16   # the paper's Table 1 setting
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPLM_SHARED_DATA", ROOT / ".." / "shared" / "data"))
CONFIG = SHARED / "official" / "cellplm_20230926_85M.config.json"
DATA = SHARED / "pbmc3k_raw.h5ad"
FLOP_PER_CELL = None  # filled from the config in main()


def encoder_flops_per_cell(d: int, n_layers: int, n_latent: int, n_clusters: int) -> float:
    """Dense FLOPs of one cell through projection, transformer and GMVAE mean (multiply-add = 2)."""
    per_layer = 2 * (4 * d * d) + 2 * (2 * d * 2 * d)  # q, k, v, out + feed-forward d -> 2d -> d
    embed = 2 * d * d
    latent = 2 * (d * n_clusters + (d + n_clusters) * 512 + 512 * n_latent)
    return n_layers * per_layer + embed + latent


def make_cells(n_cells: int, n_genes: int, vocabulary: list[str], seed: int = 0):
    """``n_cells`` real PBMC cells (resampled) x the ``n_genes`` most expressed vocabulary genes."""
    import anndata as ad

    pbmc = ad.read_h5ad(DATA)
    pbmc = pbmc[:, pbmc.var["gene_ids"].isin(set(vocabulary)).to_numpy()]
    totals = np.asarray(pbmc.X.sum(0)).ravel()
    genes = np.sort(np.argsort(-totals)[:n_genes])
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(pbmc.n_obs, n_cells, replace=n_cells > pbmc.n_obs))
    adata = ad.AnnData(pbmc.X[cells][:, genes].astype(np.float32))
    adata.var_names = pbmc.var["gene_ids"].to_numpy()[genes].astype(str)
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.obs["batch"] = "sample0"
    return adata


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(call, repeats: int, device: str):
    """Result of the first call and the fastest of ``repeats`` wall times (shared machines: the
    minimum is the least disturbed run)."""
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = call()
        _sync(device)
        times.append(time.perf_counter() - start)
        result = out if result is None else result
    return result, min(times), times


@contextlib.contextmanager
def _official_context():
    """Where the official package runs: its random calls made deterministic, its prints silenced."""
    sys.path.insert(0, str(ROOT / "tests"))
    from official_oracle import deterministic_official

    with deterministic_official(), contextlib.redirect_stdout(open(os.devnull, "w")):
        yield


def _official_embed(directory, prefix, adata, device):
    """The official pipeline's embedding call on ``adata``, warmed up (run in `_official_context`)."""
    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline

    pipeline = CellEmbeddingPipeline(pretrain_prefix=prefix, pretrain_directory=directory)
    # warm-up (one-time kernel selection/JIT, CUDA context), not part of the timing
    pipeline.predict(adata[:500].copy(), device=device, ensembl_auto_conversion=False)
    return lambda: pipeline.predict(adata, device=device, ensembl_auto_conversion=False).cpu().numpy()


def _our_model(path_prefix, adata, device, precisions):
    """Ours, loaded from the official checkpoint onto ``adata`` (registered here, all cells in one
    sentence), warmed up at each of ``precisions``."""
    from scvi_cellplm import CellPLM

    CellPLM.setup_anndata(adata, batch_key="batch")
    model = CellPLM.from_official(path_prefix, adata, max_cells_per_batch=max(adata.n_obs, 1))
    if device != "cpu":
        model.to_device(device)
    # warm-up (one-time kernel selection/JIT, CUDA context), not part of the timing
    for precision in precisions:
        model.get_latent_representation(indices=np.arange(min(adata.n_obs, 500)), precision=precision)
    return model


def _run_official(directory, prefix, n_cells, n_genes, vocabulary, threads, device, repeats, queue):
    import torch

    torch.set_num_threads(threads)
    adata = make_cells(n_cells, n_genes, vocabulary)
    with _official_context():
        embed = _official_embed(directory, prefix, adata, device)
        base = _peak_rss_gib()
        emb, seconds, times = _timed(embed, repeats, device)
    queue.put({"seconds": seconds, "times": times, "peak_rss_gib": _peak_rss_gib(),
               "rss_before_gib": base, "embedding": emb})


def _run_ours(path_prefix, n_cells, n_genes, vocabulary, threads, precision, device, clusters, repeats,
              queue):
    import torch

    torch.set_num_threads(threads)
    model = _our_model(path_prefix, make_cells(n_cells, n_genes, vocabulary), device, [precision])
    base = _peak_rss_gib()
    emb, seconds, times = _timed(lambda: model.get_latent_representation(precision=precision),
                                 repeats, device)
    if clusters:  # not timed: which GMVAE branch each cell took
        clusters = model.get_latent_representation(precision=precision, return_cluster_probs=True).argmax(1)
    queue.put({"seconds": seconds, "times": times, "peak_rss_gib": _peak_rss_gib(),
               "rss_before_gib": base, "embedding": emb, "clusters": clusters})


def _run_paired(directory, prefix, n_cells, n_genes, vocabulary, threads, device, rounds, queue):
    """Both implementations in one process, timed alternately (ours fp32, official, ours bf16;
    reversed every other round), so a slow spell of a shared machine hits both: per-round ratios."""
    import torch

    torch.set_num_threads(threads)
    adata = make_cells(n_cells, n_genes, vocabulary)
    model = _our_model(os.path.join(directory, prefix), adata.copy(), device, ["32", "bf16"])
    with _official_context():
        calls = {
            "official": _official_embed(directory, prefix, adata, device),
            "ours": lambda: model.get_latent_representation(precision="32"),
            "bf16": lambda: model.get_latent_representation(precision="bf16"),
        }
        times = {key: [] for key in calls}
        for i in range(rounds):
            for key in (list(calls) if i % 2 else list(calls)[::-1]):
                times[key].append(_timed(calls[key], 1, device)[1])
    queue.put(times)


def _in_subprocess(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def matmul_peak(width: int, threads: int, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of a square-ish ``torch.mm`` (fp32 and bf16) of the model's width, this process
    (mean over 10 calls: the fastest single bf16 call here can be 3x the sustained rate)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(4096, width, dtype=dtype, device=device)
        b = torch.randn(width, width, dtype=dtype, device=device)
        for _ in range(3):
            torch.mm(a, b)
        reps = 10 if device == "cpu" else 200
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        out[name] = 2 * 4096 * width * width * reps / (time.perf_counter() - start) / 1e9
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 48082])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also run ours under bf16 autocast")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls per measurement; the fastest is reported (noisy machines)")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="also time both implementations alternately in one process, ROUNDS "
                             "rounds, and print the per-round speed ratios (robust on shared machines)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--device", default="cpu",
                        help="'cpu' or 'cuda' (both implementations; one warm-up run before timing)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if not CONFIG.exists() or not DATA.exists():
        print(f"needs {CONFIG} and {DATA} (the shared data folder)")
        return 1

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from official_oracle import build_official, save_official

    config = json.loads(CONFIG.read_text())
    vocabulary = config["gene_list"]
    flops = encoder_flops_per_cell(config["enc_hid"], config["enc_layers"],
                                   config["post_latent_dim"], config["num_clusters"])
    peak = matmul_peak(config["enc_hid"], args.threads, args.device)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads; "
          f"torch.mm width {config['enc_hid']}: "
          f"{peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16; "
          f"encoder {flops / 1e6:.1f} MFLOP/cell -> fp32 roofline "
          f"{peak['fp32'] * 1e9 / flops:.0f} cells/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_official(build_official(config), config, tmp, "paper")
        prefix = os.path.join(tmp, "paper")
        for n in args.sizes:
            row = {"cells": n}
            ours = _in_subprocess(_run_ours, prefix, n, args.genes, vocabulary, args.threads, "32",
                                  args.device, args.bf16, args.repeats)
            row["ours"] = ours
            if not args.skip_official:
                official = _in_subprocess(_run_official, tmp, "paper", n, args.genes, vocabulary,
                                          args.threads, args.device, args.repeats)
                row["official"] = official
                row["max_abs_diff"] = float(np.abs(ours["embedding"] - official["embedding"]).max())
            if args.bf16:
                bf = _in_subprocess(_run_ours, prefix, n, args.genes, vocabulary, args.threads, "bf16",
                                    args.device, True, args.repeats)
                a, b = ours["embedding"], bf["embedding"]
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                bf["cosine_min"], bf["cosine_mean"] = float(cos.min()), float(cos.mean())
                # the GMVAE embeds each cell through its most likely cluster: at a near-tie bf16
                # rounding can pick the other one, a jump, not an accumulated error
                same = bf.pop("clusters") == ours.pop("clusters")
                bf["cluster_flips"] = float(1 - same.mean())
                bf["cosine_min_same_cluster"] = float(cos[same].min()) if same.any() else float("nan")
                row["bf16"] = bf
            if args.paired and not args.skip_official:
                row["paired"] = _in_subprocess(_run_paired, tmp, "paper", n, args.genes, vocabulary,
                                               args.threads, args.device, args.paired)
            rows.append(row)
            _print_row(row, flops, peak)
    if args.json:
        for row in rows:
            for key in ("ours", "official", "bf16"):
                row.get(key, {}).pop("embedding", None)
        args.json.write_text(json.dumps({"matmul_gflops": peak, "flop_per_cell": flops,
                                         "rows": rows}, indent=2))
    return 0


def _print_row(row: dict, flops: float, peak: dict) -> None:
    n = row["cells"]
    parts = []
    for key in ("official", "ours", "bf16"):
        if key not in row:
            continue
        r = row[key]
        rate = n / r["seconds"]
        gflops = rate * flops / 1e9
        ref = peak["bf16" if key == "bf16" else "fp32"]
        parts.append(f"{key}: {r['seconds']:.2f} s, {rate:.0f} cells/s, {gflops:.0f} GFLOP/s "
                     f"({100 * gflops / ref:.0f}% of mm), peak RSS {r['peak_rss_gib']:.2f} GiB")
    line = f"{n:>7} cells | " + " | ".join(parts)
    if "official" in row:
        speed = row["official"]["seconds"] / row["ours"]["seconds"]
        line += f" | ours/official speed x{speed:.2f}, max|diff| {row['max_abs_diff']:.1e}"
        if "bf16" in row:
            line += f", bf16 x{row['official']['seconds'] / row['bf16']['seconds']:.2f}"
    if "bf16" in row:
        bf = row["bf16"]
        line += (f", bf16 cosine min {bf['cosine_min']:.5f} (cells with the same GMVAE cluster "
                 f"{bf['cosine_min_same_cluster']:.5f}; {100 * bf['cluster_flips']:.1f}% changed cluster)")
    print(line, flush=True)
    if "paired" in row:
        t = {key: np.asarray(v) for key, v in row["paired"].items()}
        fp32, bf16 = t["official"] / t["ours"], t["official"] / t["bf16"]
        print(f"{'':>7}         paired, {len(fp32)} alternating rounds in one process: median official "
              f"{np.median(t['official']):.2f} s, ours {np.median(t['ours']):.2f} s, bf16 "
              f"{np.median(t['bf16']):.2f} s; per-round speed ratio median x{np.median(fp32):.2f} "
              f"[{fp32.min():.2f}-{fp32.max():.2f}], bf16 x{np.median(bf16):.2f} "
              f"[{bf16.min():.2f}-{bf16.max():.2f}]; ours {n / np.median(t['ours']):.0f} cells/s = "
              f"{100 * n / np.median(t['ours']) * flops / 1e9 / peak['fp32']:.0f}% of mm", flush=True)


if __name__ == "__main__":
    sys.exit(main())
