"""Streaming inference on backed .h5ad files of 100k and 1M cells: peak RSS and cells/s.

Each file is built by resampling real cells of ``../shared/data`` (mouse brain 10x subset, 1,000
genes) into one uncompressed CSR ``.h5ad``, written chunk by chunk (the builder never holds more
than one chunk of cells), in samples of ``--cells-per-sample`` cells. Samples above
``--max-cells`` are cut into expression windows (PCA fitted on a subsample, projected chunk-wise).
For each file a fresh subprocess opens it with ``anndata.read_h5ad(path, backed="r+")``, builds a
randomly initialised model of ``--preset`` and runs ``model.embed(adata)``, which streams the
embedding into the file's ``obsm/X_cellplm`` mini-batch by mini-batch. The table gives wall time
(windowing + inference + writing), cells/s and peak RSS (before inference and overall), and the
ratio of the largest file's peak RSS to the smallest's.

    python benchmarks/streaming_inference.py --sizes 100000 1000000 --preset small
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_memory  # its chunked .h5ad writer

SOURCE = "mouse_10k_subset.h5ad"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def build(path: Path, n_cells: int, cells_per_sample: int) -> None:
    """Write ``n_cells`` resampled cells to ``path`` in chunks (reused when already there)."""
    import anndata as ad

    marker = path.with_suffix(".json")
    spec = {"n_cells": n_cells, "cells_per_sample": cells_per_sample}
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == spec:
        return
    pretrain_memory.CELLS_PER_SAMPLE = cells_per_sample
    pretrain_memory.write_file(path, ad.read_h5ad(pretrain_memory.SHARED / SOURCE), n_cells,
                               seed=0, sample_offset=0)
    marker.write_text(json.dumps(spec))


def worker(path: str, preset: str, max_cells: int, threads: int, precision: str, queue) -> None:
    import anndata as ad
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from scvi_cellplm import CellPLM
    from scvi_cellplm._presets import PRESETS

    adata = ad.read_h5ad(path, backed="r+")
    CellPLM.setup_anndata(adata, sample_key="sample")
    model = CellPLM(adata, max_cells_per_batch=max_cells, **PRESETS[preset])
    before = _peak_rss_gib()
    start = time.perf_counter()
    model.embed(adata, precision=precision)
    seconds = time.perf_counter() - start
    z = adata.file["obsm"]["X_cellplm"]
    finite = bool(np.isfinite(z[: min(10_000, adata.n_obs)]).all())
    adata.file.close()
    queue.put({"cells": adata.n_obs, "seconds": seconds, "peak_rss_gib": _peak_rss_gib(),
               "rss_before_gib": before, "finite": finite})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--preset", default="small", choices=["small", "paper"])
    parser.add_argument("--max-cells", type=int, default=4000)
    parser.add_argument("--cells-per-sample", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--dir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if not (pretrain_memory.SHARED / SOURCE).exists():
        print(f"needs {pretrain_memory.SHARED / SOURCE} (the shared data folder)")
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n in args.sizes:
            path = folder / f"stream_{n}.h5ad"
            t0 = time.perf_counter()
            build(path, n, args.cells_per_sample)
            built = time.perf_counter() - t0
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=worker, args=(str(path), args.preset, args.max_cells,
                                                     args.threads, args.precision, queue))
            proc.start()
            row = queue.get()
            proc.join()
            rows.append(row)
            print(f"{n:>9,} cells | {args.preset} preset, {args.precision} | "
                  f"{row['seconds']:.1f} s, {n / row['seconds']:,.0f} cells/s | peak RSS "
                  f"{row['peak_rss_gib']:.2f} GiB (before inference {row['rss_before_gib']:.2f}) | "
                  f"file {path.stat().st_size / 1024**2:,.0f} MiB built in {built:.0f} s", flush=True)
    if len(rows) > 1:
        print(f"peak RSS {rows[-1]['cells']:,} / {rows[0]['cells']:,} cells: "
              f"x{rows[-1]['peak_rss_gib'] / rows[0]['peak_rss_gib']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
