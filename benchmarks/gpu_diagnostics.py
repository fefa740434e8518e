"""Where inference time goes on a device, and the evidence behind the GPU chunk sizes (issue #21).

With the paper-size network (random weights, as ``gpu_table.py``) on ``DIAG_CELLS`` (48,082) PBMC
cells in one sentence, on the device given as the first argument (``cuda``; ``cpu`` for a dry run):

1. the official package's time (the parity reference);
2. ours split into data loading (CPU), host->device copy, forward, device->host copy (fp32, bf16);
3. variants of the accelerator's chunk size (``module._chunks.GPU_CHUNK_ROWS`` patched at run time;
   0 = the CPU sizes): whole call, forward, max abs difference to the official, peak memory;
4. a torch profile of one call (top operations, written to ``$OUT/profile_fp32.txt``);
5. parity context on 10,000 cells: the official and ours, each on the CPU and the device.

``DIAG_PARTS=breakdown`` stops after 2. Tables to stdout, numbers to ``$OUT/diag.json``.

    OUT=. python benchmarks/gpu_diagnostics.py cuda
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
OUT = Path(os.environ.get("OUT", "."))


class Bench:
    """The paper-size network loaded in ours on ``n`` cells, and the official package's embedding."""

    def __init__(self, device: str, n: int) -> None:
        from embedding_speed import CONFIG, _official_context, _official_embed, make_cells
        from official_oracle import build_official, save_official

        from scvi_cellplm import CellPLM

        self.device, self.results = device, {}
        config = json.loads(CONFIG.read_text())
        self.tmp = tempfile.mkdtemp()
        save_official(build_official(config), config, self.tmp, "paper")
        self.prefix = os.path.join(self.tmp, "paper")
        self.adata = make_cells(n, 2000, config["gene_list"])
        CellPLM.setup_anndata(self.adata, batch_key="batch")
        self.model = CellPLM.from_official(self.prefix, self.adata, max_cells_per_batch=n)
        self.model.to_device(device)
        self.model.get_latent_representation(indices=np.arange(min(n, 500)))
        with _official_context():
            self.reference, seconds, _ = self.timed(_official_embed(self.tmp, "paper", self.adata, device))
        self.results["official_s"] = seconds
        print(f"official, {n:,} cells: {seconds:.3f} s; max |embedding| {np.abs(self.reference).max():.3f}",
              flush=True)

    def sync(self) -> None:
        from embedding_speed import _sync

        _sync(self.device)

    def timed(self, call, reps: int = 2):
        """(first result, fastest seconds, all seconds) of ``reps`` synchronised calls."""
        from embedding_speed import _timed

        return _timed(call, reps, self.device)

    def save(self) -> None:
        (OUT / "diag.json").write_text(json.dumps(self.results, indent=1, default=str))

    def parts(self, precision: str = "32") -> dict:
        """One call split into loading (CPU), host->device, forward, device->host (seconds)."""
        import torch

        from scvi_cellplm.model._inference import _to_host

        model, backbone = self.model, self.model._latent_module()
        self.sync()
        t0 = time.perf_counter()
        tensors = next(iter(model._inference_batches(model._validate_anndata(self.adata), validate=False)))[1]
        t1 = time.perf_counter()
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in tensors.items()}
        self.sync()
        t2 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(self.device, torch.bfloat16, enabled=precision == "bf16"):
            z = backbone.inference(**backbone._get_inference_input(moved), sample=False)["qzm"]
        self.sync()
        t3 = time.perf_counter()
        _to_host(z.float())
        return {"loader_cpu": t1 - t0, "h2d": t2 - t1, "forward": t3 - t2, "d2h": time.perf_counter() - t3}

    def breakdown(self) -> None:
        for precision in ("32", "bf16"):
            self.parts(precision)
            runs = [self.parts(precision) for _ in range(3)]
            best = {k: min(r[k] for r in runs) for k in runs[0]}
            self.results[f"breakdown_{precision}"] = best
            print(f"breakdown {precision}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()),
                  flush=True)
        self.save()

    def chunk_variants(self) -> None:
        import torch

        import scvi_cellplm.module._chunks as chunks

        default = chunks.GPU_CHUNK_ROWS
        self.results["variants"] = {}
        print("| GPU_CHUNK_ROWS | fp32 call s | fp32 forward s | bf16 call s | bf16 forward s "
              "| max abs diff vs official | peak GiB |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for rows in (0, 16_384, 65_536):
            chunks.GPU_CHUNK_ROWS = rows
            cuda = self.device.startswith("cuda")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            z32, t32, _ = self.timed(lambda: self.model.get_latent_representation(precision="32"))
            _, tbf, _ = self.timed(lambda: self.model.get_latent_representation(precision="bf16"))
            f32 = min(self.parts("32")["forward"] for _ in range(2))
            fbf = min(self.parts("bf16")["forward"] for _ in range(2))
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            diff = float(np.abs(z32 - self.reference).max())
            self.results["variants"][rows] = {"fp32": t32, "bf16": tbf, "forward_fp32": f32, "forward_bf16": fbf,
                                              "max_abs_diff": diff, "peak_gib": peak}
            label = f"{rows:,}" if rows else "0 (CPU sizes)"
            print(f"| {label} | {t32:.3f} | {f32:.3f} | {tbf:.3f} | {fbf:.3f} | {diff:.2e} | {peak:.2f} |", flush=True)
            self.save()
        chunks.GPU_CHUNK_ROWS = default

    def profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            self.model.get_latent_representation(precision="32")
            self.sync()
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
        (OUT / "profile_fp32.txt").write_text(table)
        print(table, flush=True)

    def parity(self, n: int = 10_000) -> None:
        from embedding_speed import _official_context, _official_embed

        from scvi_cellplm import CellPLM

        n = min(n, self.adata.n_obs)
        cells = self.adata[:n].copy()
        CellPLM.setup_anndata(cells, batch_key="batch")
        with _official_context():
            official = {d: _official_embed(self.tmp, "paper", cells, d)() for d in (self.device, "cpu")}
        model = CellPLM.from_official(self.prefix, cells, max_cells_per_batch=n)
        ours = {"cpu": model.get_latent_representation()}
        model.to_device(self.device)
        ours[self.device] = model.get_latent_representation()
        pairs = {"official device vs official cpu": (official[self.device], official["cpu"]),
                 "ours device vs ours cpu": (ours[self.device], ours["cpu"]),
                 "ours device vs official device": (ours[self.device], official[self.device]),
                 "ours cpu vs official cpu": (ours["cpu"], official["cpu"])}
        self.results["parity"] = {"cells": n}
        print(f"parity, {n:,} cells (max |embedding| {np.abs(official['cpu']).max():.3f}):")
        for key, (a, b) in pairs.items():
            diff, rel = float(np.abs(a - b).max()), float(np.linalg.norm(a - b) / np.linalg.norm(b))
            self.results["parity"][key] = {"max_abs": diff, "relative": rel}
            print(f"  {key}: max abs {diff:.2e}, relative {rel:.1e}", flush=True)
        self.save()


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    bench = Bench(device, int(os.environ.get("DIAG_CELLS", 48_082)))
    bench.breakdown()
    if os.environ.get("DIAG_PARTS") != "breakdown":
        bench.chunk_variants()
        bench.profile()
        bench.parity()
    return 0


if __name__ == "__main__":
    sys.exit(main())
