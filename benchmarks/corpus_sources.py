"""Pretraining from the same cells stored as ``.h5ad`` files, zarr stores and TileDB-SOMA experiments.

For each corpus size, the ``.h5ad`` corpus of ``pretrain_memory.py`` (real cells of
``../shared/data`` resampled into uncompressed CSR files of at most 50,000 cells, three gene
panels, samples of 2,000 cells) is copied file by file into zarr AnnData stores
(``adata.write_zarr``) and TileDB-SOMA experiments (``tiledbsoma.io.from_h5ad``, Census layout:
``ms["RNA"].X["raw"]``, one experiment per file). For each source a fresh subprocess indexes the
corpus and runs ``--steps`` pretraining steps of the small CPU preset; the table gives indexing
time, the time to read a mini-batch (inside the training loop), seconds per step and cells/s
(steps after the first 5) and peak RSS.

    python benchmarks/corpus_sources.py --sizes 10000 100000 --steps 25
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_memory import build_corpus

SOURCES = ("h5ad", "zarr", "soma")


def convert(files: list[str], source: str, directory: Path) -> list[str]:
    """Copy every ``.h5ad`` file of the corpus into a zarr store or a SOMA experiment (reused if done)."""
    import anndata as ad

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        target = directory / Path(path).stem
        out.append(str(target))
        if (directory / f"{target.name}.done").exists():
            continue
        shutil.rmtree(target, ignore_errors=True)
        if source == "zarr":
            ad.read_h5ad(path).write_zarr(target)
        else:
            import tiledbsoma.io

            tiledbsoma.io.from_h5ad(str(target), path, measurement_name="RNA", X_layer_name="raw")
        (directory / f"{target.name}.done").touch()
    return out


def worker(source: str, paths: list[str], steps: int, max_cells: int, threads: int) -> dict:
    """Index the corpus from ``source`` and pretrain ``steps`` steps; read time, throughput, peak RSS."""
    import lightning.pytorch as pl
    import torch

    torch.set_num_threads(threads)
    from scvi_cellplm.pretrain import Corpus, CorpusDataset, SomaSource, pretrain

    reads: list[float] = []
    getitem = CorpusDataset.__getitem__

    def timed(self, item):
        t = time.perf_counter()
        out = getitem(self, item)
        reads.append(time.perf_counter() - t)
        return out

    CorpusDataset.__getitem__ = timed

    class Clock(pl.Callback):
        def __init__(self):
            self.cells, self.t0 = 0, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                self.t0 = time.perf_counter()
            if self.t0 is not None:
                self.cells += batch["X"].shape[0]

    data = [SomaSource(p, gene_id_key="gene_ids") for p in paths] if source == "soma" else paths
    t = time.perf_counter()
    corpus = Corpus(data, max_cells, gene_id_key="gene_ids", sample_key="sample")
    index_s = time.perf_counter() - t
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        pretrain(corpus, out, max_steps=steps, max_cells_per_batch=max_cells, accelerator="cpu",
                 devices=1, checkpoint_every=10**9, logger_kind="none", progress_bar=False,
                 callbacks=[clock])
    seconds = time.perf_counter() - clock.t0
    return {
        "source": source,
        "n_cells": corpus.n_cells,
        "fingerprint": corpus.fingerprint(),
        "index_s": index_s,
        "read_ms": 1000 * sum(reads[5:]) / max(len(reads) - 5, 1),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "cells_per_s": clock.cells / seconds,
        "s_per_step": seconds / (steps - 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--steps", type=int, default=25, help="pretraining steps per source")
    parser.add_argument("--max-cells", type=int, default=256, help="cells per mini-batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where corpora are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        source, *paths = args.worker
        print(json.dumps(worker(source, paths, args.steps, args.max_cells, args.threads)))
        return
    if args.steps <= 10:
        raise SystemExit("--steps must be above 10 (the first 5 are warm-up).")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cellplm_sources_"))
    rows = []
    try:
        for n in args.sizes:
            files = build_corpus(workdir / f"corpus_{n}", n)
            for source in args.sources:
                t = time.perf_counter()
                paths = files if source == "h5ad" else convert(files, source, workdir / f"{source}_{n}")
                build_s = time.perf_counter() - t
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--max-cells", str(args.max_cells),
                       "--threads", str(args.threads), "--worker", source, *paths]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode:
                    raise SystemExit(f"worker failed for {source}, {n} cells:\n{out.stderr[-4000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result.update(build_s=build_s, disk_gb=sum(_size(p) for p in paths) / 1e9, n_datasets=len(paths))
                rows.append(result)
                print(f"{n:>9,} cells, {source}: {json.dumps(result)}", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nPretraining from each source: small preset, {args.max_cells} cells per mini-batch, "
          f"{args.steps} steps, {args.threads} CPU thread(s)\n")
    print("| cells | source | datasets | on disk | indexing | read / mini-batch | s/step | cells/s | peak RSS |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n_cells']:,} | {r['source']} | {r['n_datasets']} | {r['disk_gb']:.2f} GB "
              f"| {r['index_s']:.1f} s | {r['read_ms']:.0f} ms | {r['s_per_step']:.2f} | {r['cells_per_s']:.0f} "
              f"| {r['peak_rss_gib']:.2f} GiB |")
    for n in args.sizes:
        prints = {r["fingerprint"] for r in rows if r["n_cells"] == n}
        print(f"\n{n:,} cells: {'same corpus (fingerprint)' if len(prints) == 1 else 'DIFFERENT corpora'} "
              "from every source")


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


if __name__ == "__main__":
    main()
