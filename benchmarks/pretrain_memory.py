"""Pretraining memory and throughput on on-disk corpora of 10k, 100k and 1M cells.

Each corpus is built by resampling real cells of ``../shared/data`` (human pancreas, human PBMC,
mouse brain: three different gene panels) into at least three uncompressed CSR ``.h5ad`` files of
at most 50,000 cells, written chunk by chunk (building the 1M corpus never holds more than one chunk of
cells in memory). Cells come in samples of 2,000 (the sentences are windows of at most
``--max-cells`` cells of a sample). For each corpus, a fresh subprocess indexes it with
:class:`~scvi_cellplm.pretrain.Corpus` and runs ``--steps`` pretraining steps of the small CPU
preset with :func:`~scvi_cellplm.pretrain.pretrain` (cells streamed from disk, no checkpoints);
the table gives its peak RSS and throughput (steps after the first 5), and the ratio of the
largest corpus's peak RSS to the smallest's.

With ``--compare``, each corpus is trained ``--repeats`` times with the dense reference loss over
the whole vocabulary (``pretrain(..., sparse_loss=False)``, "before") and with the default loss
over the measured genes ("after"), in alternating subprocesses so that machine load hits both
alike; the table gives the best run of each and the speed-up.

    python benchmarks/pretrain_memory.py --sizes 10000 100000 1000000 --steps 200
    python benchmarks/pretrain_memory.py --sizes 10000 --steps 40 --compare --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELLPLM_SHARED_DATA", ROOT / ".." / "shared" / "data"))
SOURCES = ["baron_human_pancreas.h5ad", "pbmc3k_raw.h5ad", "mouse_10k_subset.h5ad"]
CELLS_PER_FILE = 50_000
CELLS_PER_SAMPLE = 2_000
CHUNK = 10_000


def write_file(path: Path, source, n_cells: int, seed: int, sample_offset: int) -> None:
    """``n_cells`` cells resampled from ``source`` into an uncompressed CSR ``.h5ad``, in chunks."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    x = source.X
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        group = f.create_group("X")
        group.attrs["encoding-type"], group.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        group.attrs["shape"] = (n_cells, source.n_vars)
        data = group.create_dataset("data", (0,), dtype=np.float32, maxshape=(None,), chunks=(1 << 16,))
        indices = group.create_dataset("indices", (0,), dtype=np.int32, maxshape=(None,), chunks=(1 << 16,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        for start in range(0, n_cells, CHUNK):
            stop = min(start + CHUNK, n_cells)
            rows = x[np.sort(rng.integers(0, source.n_obs, stop - start))]
            n, m = data.shape[0], rows.nnz
            data.resize((n + m,))
            indices.resize((n + m,))
            data[n:] = rows.data.astype(np.float32)
            indices[n:] = rows.indices.astype(np.int32)
            indptr[start + 1 : stop + 1] = n + rows.indptr[1:]
        group.create_dataset("indptr", data=indptr)
        samples = sample_offset + np.arange(n_cells) // CELLS_PER_SAMPLE
        obs = pd.DataFrame({"sample": pd.Categorical([f"s{s}" for s in samples])},
                           index=[f"c{i}" for i in range(n_cells)])
        write_elem(f, "obs", obs)
        write_elem(f, "var", source.var[["gene_ids"]].astype(str))
        for key in ("uns", "obsm", "varm", "layers", "obsp", "varp"):
            write_elem(f, key, {})


def build_corpus(directory: Path, n_cells: int) -> list[str]:
    """Write (or reuse) the corpus of ``n_cells`` cells in ``directory``; return the file paths."""
    import anndata as ad

    directory.mkdir(parents=True, exist_ok=True)
    n_files = max(len(SOURCES), -(-n_cells // CELLS_PER_FILE))  # every corpus has all three panels
    sizes = np.full(n_files, n_cells // n_files)
    sizes[: n_cells % n_files] += 1
    paths = [directory / f"part{i:03d}.h5ad" for i in range(n_files)]
    done = directory / "done.json"
    if done.exists() and json.loads(done.read_text()) == {"n_cells": n_cells, "n_files": n_files}:
        return [str(p) for p in paths]
    sources = [ad.read_h5ad(SHARED / name) for name in SOURCES]
    offset = 0
    for i, (path, size) in enumerate(zip(paths, sizes)):
        write_file(path, sources[i % len(sources)], int(size), seed=i, sample_offset=offset)
        offset += -(-int(size) // CELLS_PER_SAMPLE)
    done.write_text(json.dumps({"n_cells": n_cells, "n_files": n_files}))
    return [str(p) for p in paths]


def worker(files: list[str], steps: int, max_cells: int, threads: int, sparse_loss: bool = True,
           seed: int = 0) -> dict:
    """Index the corpus and pretrain ``steps`` steps; peak RSS, throughput and the loss of each step."""
    import lightning.pytorch as pl
    import torch

    torch.set_num_threads(threads)
    from scvi_cellplm.pretrain import Corpus, pretrain

    class Clock(pl.Callback):
        def __init__(self):
            self.cells, self.t0, self.losses = 0, None, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                self.t0 = time.perf_counter()
            if self.t0 is not None:
                self.cells += batch["X"].shape[0]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    t = time.perf_counter()
    corpus = Corpus(files, max_cells, gene_id_key="gene_ids", sample_key="sample", seed=seed)
    index_s = time.perf_counter() - t
    rss_index = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        pretrain(corpus, out, max_steps=steps, max_cells_per_batch=max_cells, accelerator="cpu",
                 devices=1, checkpoint_every=10**9, logger_kind="none", progress_bar=False,
                 callbacks=[clock], sparse_loss=sparse_loss, seed=seed)
    seconds = time.perf_counter() - clock.t0
    return {
        "n_cells": corpus.n_cells,
        "n_files": len(files),
        "n_genes": corpus.n_genes,
        "n_sentences": corpus.n_sentences,
        "steps": steps,
        "index_s": index_s,
        "rss_after_index_gib": rss_index,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "cells_per_s": clock.cells / seconds,
        "s_per_step": seconds / (steps - 5),
        "loss": "sparse" if sparse_loss else "dense",
        "seed": seed,
        "losses": clock.losses,
    }


def print_curves(curves: list) -> None:
    """Per seed: the speed-up of the paired runs and the training loss at a few steps, dense vs sparse."""
    for n, runs in curves:
        steps = len(runs["dense"][0]["losses"])
        marks = sorted({1, 2, 5, steps // 2, steps})
        print(f"\n{n:,} cells: training loss at step k (dense / sparse loss, same seed, same batches)")
        print(f"{'seed':>4} {'speed-up':>8} " + " ".join(f"{'k=' + str(k):>17}" for k in marks))
        for dense, fast in zip(runs["dense"], runs["sparse"]):
            cells = " ".join(f"{dense['losses'][k - 1]:>8.1f}/{fast['losses'][k - 1]:<8.1f}" for k in marks)
            print(f"{dense['seed']:>4} x{fast['cells_per_s'] / dense['cells_per_s']:>7.2f} {cells}")


def run_worker(cmd: list[str], n: int) -> dict:
    """Run one worker subprocess; its result row."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker failed for {n} cells:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shown = {k: v for k, v in result.items() if k != "losses"}
    print(f"{n:>9,} cells done: {json.dumps(shown)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps per corpus")
    parser.add_argument("--max-cells", type=int, default=256, help="cells per mini-batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where corpora are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora")
    parser.add_argument("--compare", action="store_true",
                        help="before/after: the dense reference loss vs the default (sparse) loss")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loss with --compare")
    parser.add_argument("--dense-loss", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.max_cells, args.threads,
                                sparse_loss=not args.dense_loss, seed=args.seed)))
        return
    if args.steps <= 10:
        raise SystemExit("--steps must be above 10 (the first 5 are warm-up).")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cellplm_corpora_"))
    rows, curves = [], []
    try:
        for n in args.sizes:
            t = time.perf_counter()
            files = build_corpus(workdir / f"corpus_{n}", n)
            size_gb = sum(os.path.getsize(f) for f in files) / 1e9
            build_s = time.perf_counter() - t
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--max-cells", str(args.max_cells),
                   "--threads", str(args.threads), "--worker", *files]
            if not args.compare:
                result = run_worker(cmd, n)
                result.update(disk_gb=size_gb, build_s=build_s)
                rows.append(result)
                continue
            runs = {"dense": [], "sparse": []}
            for seed in range(args.repeats):  # alternating: the machine's load hits both alike
                for kind in runs:
                    extra = ["--seed", str(seed)] + (["--dense-loss"] if kind == "dense" else [])
                    runs[kind].append(run_worker(cmd + extra, n))
            curves.append((n, runs))
            for results in runs.values():
                best = max(results, key=lambda r: r["cells_per_s"])
                best.update(disk_gb=size_gb, build_s=build_s)
                rows.append(best)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nPretraining streamed from disk: small preset, {args.max_cells} cells per mini-batch, "
          f"{args.steps} steps per corpus, {args.threads} CPU thread(s)"
          + (f", best of {args.repeats} alternating runs per loss" if args.compare else "") + "\n")
    header = (f"{'cells':>10} {'loss':>6} {'files':>5} {'on disk':>8} {'genes':>6} {'sentences':>9} "
              f"{'index s':>7} {'RSS after index':>15} {'peak RSS':>9} {'cells/s':>8} {'s/step':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['n_cells']:>10,} {r['loss']:>6} {r['n_files']:>5} {r['disk_gb']:>6.2f}GB {r['n_genes']:>6,} "
              f"{r['n_sentences']:>9,} {r['index_s']:>7.1f} {r['rss_after_index_gib']:>13.2f}Gi "
              f"{r['peak_rss_gib']:>7.2f}Gi {r['cells_per_s']:>8.0f} {r['s_per_step']:>7.2f}")
    if args.compare:
        print()
        for dense, fast in zip(rows[::2], rows[1::2]):
            speed = fast["cells_per_s"] / dense["cells_per_s"]
            rss = fast["peak_rss_gib"] / dense["peak_rss_gib"]
            print(f"{dense['n_cells']:>10,} cells: sparse / dense loss x{speed:.2f} cells/s, peak RSS x{rss:.2f}")
        print_curves(curves)
        rows = rows[1::2]  # the RSS verdict below: the default loss
    if len(rows) > 1:
        ratio = rows[-1]["peak_rss_gib"] / rows[0]["peak_rss_gib"]
        verdict = "flat (within 20%)" if ratio <= 1.2 else "NOT flat"
        print(f"\npeak RSS {rows[-1]['n_cells']:,} / {rows[0]['n_cells']:,} cells: x{ratio:.3f} -> {verdict}")


if __name__ == "__main__":
    main()
