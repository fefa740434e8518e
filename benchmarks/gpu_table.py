"""The paper's Table 1 setting on one device, in one process: every GPU figure of issue #21.

On the device named by ``--device`` (default ``cuda``), with the paper-size network (the official
``20230926_85M`` configuration: 4 x 1024 Flowformer, GMVAE 512, 19,374-gene vocabulary; random
weights built in the official package and loaded in ours with ``CellPLM.from_official``):

1. **Inference** at each of ``--sizes`` cells (default 1,000, 10,000 and 48,082; real PBMC cells
   resampled, 2,000 genes, all cells one sentence as in the official run): the official package,
   ours in fp32 and ours under bf16 autocast, in the same process, timed alternately over
   ``--rounds`` rounds after a warm-up (fastest and median reported); the maximum absolute
   difference ours/official (parity), bf16's cosine to fp32, the peak GPU memory of each call
   (``torch.cuda.max_memory_allocated``, reset before each call) and the speed as a fraction of
   a ``torch.mm`` of the model's width measured on the same device.
2. **Training throughput** (cells/s over timed steps after warm-up steps, wall time between the
   ends of consecutive steps, data loading included) for the small preset (``SMALL_CPU``) and the
   paper preset (``PAPER``), fp32 and bf16-mixed.
3. **The largest single sentence that fits**: ours fp32, doubling the number of cells from the
   largest size above, then bisecting between the last fit and the first out-of-memory, bounded
   by ``--max-cells``, ``--time-budget`` seconds and the host's memory.
4. **The goals** at 48,082 cells: fp32 <= 0.3 s, >= 2x the official package, parity <= 1e-5.

Markdown tables go to stdout (each section as soon as it is measured), all numbers to ``--json``
(rewritten after each section, so a crash keeps what was measured). On ``--device cpu`` the same
code runs as a dry run: its figures are CPU figures, labelled so, never GPU figures.

    python benchmarks/gpu_table.py --device cuda --json gpu.json        # the GPU run (nox -s gpu)
    python benchmarks/gpu_table.py --device cpu --quick                  # dry run, a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedding_speed import (
    CONFIG,
    DATA,
    ROOT,
    _official_context,
    _official_embed,
    _our_model,
    encoder_flops_per_cell,
    make_cells,
    matmul_peak,
)

GOAL_CELLS = 48_082
GOAL_SECONDS = 0.3
GOAL_SPEEDUP = 2.0
GOAL_PARITY = 1e-5
PAPER_A100_SECONDS = 0.85  # Wen et al. (ICLR 2024), Table 1: 48,082 cells on an A100
GIB = 1024**3


# ------------------------------------------------------------------ device helpers
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / GIB:.0f} GiB, {props.multi_processor_count} SMs)"
    name = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _timed_call(call, device: str):
    """(result, seconds, peak GPU bytes during the call or None, GPU bytes allocated before)."""
    import torch

    cuda = device.startswith("cuda")
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = call()
    _sync(device)
    seconds = time.perf_counter() - start
    return out, seconds, (torch.cuda.max_memory_allocated() if cuda else None), (before if cuda else None)


def _is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def _host_available_bytes() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float("inf")


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


# ------------------------------------------------------------------ 1. inference table
def measure_size(prefix_dir: str, n: int, genes: int, vocabulary, device: str, rounds: int,
                 skip_official: bool) -> dict:
    adata = make_cells(n, genes, vocabulary)
    model = _our_model(os.path.join(prefix_dir, "paper"), adata.copy(), device, ["32", "bf16"])
    calls = {
        "ours": lambda: model.get_latent_representation(precision="32"),
        "bf16": lambda: model.get_latent_representation(precision="bf16"),
    }
    row: dict = {"cells": n}
    with _official_context():
        if not skip_official:
            calls = {"official": _official_embed(prefix_dir, "paper", adata, device), **calls}
        times = {key: [] for key in calls}
        peaks = {key: [] for key in calls}
        resident = {}
        first = {}
        for i in range(rounds):
            for key in (list(calls) if i % 2 else list(calls)[::-1]):
                out, seconds, peak, before = _timed_call(calls[key], device)
                times[key].append(seconds)
                peaks[key].append(peak)
                resident[key] = before
                first.setdefault(key, out)
    for key in calls:
        row[key] = {"seconds": min(times[key]), "median_seconds": float(np.median(times[key])),
                    "times": times[key], "cells_per_s": n / min(times[key]),
                    "peak_gpu_bytes": None if peaks[key][0] is None else max(peaks[key]),
                    "gpu_bytes_before_call": resident[key]}
    a, b = first["ours"], first["bf16"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    clusters = {p: model.get_latent_representation(precision=p, return_cluster_probs=True).argmax(1)
                for p in ("32", "bf16")}
    same = clusters["32"] == clusters["bf16"]
    row["bf16"].update(cosine_min=float(cos.min()), cosine_median=float(np.median(cos)),
                       cluster_flips=float(1 - same.mean()),
                       cosine_min_same_cluster=float(cos[same].min()) if same.any() else float("nan"))
    if "official" in first:
        row["max_abs_diff"] = float(np.abs(first["ours"] - first["official"]).max())
        row["speedup_fp32"] = row["official"]["seconds"] / row["ours"]["seconds"]
        row["speedup_bf16"] = row["official"]["seconds"] / row["bf16"]["seconds"]
    model = calls = first = None  # free the GPU memory before the next size
    _free(device)
    return row


def inference_table(rows: list[dict], flops: float, peak: dict) -> str:
    lines = [
        "| cells | official fp32 | ours fp32 | speed-up | ours bf16 | speed-up | max abs diff "
        "| bf16 cosine min (same cluster) / flips | ours fp32 % of mm | peak memory official / fp32 / bf16 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        off = r.get("official")
        ours, bf = r["ours"], r["bf16"]
        pct = 100 * ours["cells_per_s"] * flops / 1e9 / peak["fp32"]
        mem = " / ".join(_gib(r[k]["peak_gpu_bytes"]) if k in r else "-" for k in ("official", "ours", "bf16"))
        official = f"{off['seconds']:.3f} s" if off else "-"
        speed32 = f"{r['speedup_fp32']:.2f}x" if off else "-"
        speed16 = f"{r['speedup_bf16']:.2f}x" if off else "-"
        diff = f"{r['max_abs_diff']:.1e}" if off else "-"
        lines.append(
            f"| {r['cells']:,} | {official} | {ours['seconds']:.3f} s | {speed32} | {bf['seconds']:.3f} s "
            f"| {speed16} | {diff} | {bf['cosine_min']:.5f} ({bf['cosine_min_same_cluster']:.5f}) / "
            f"{100 * bf['cluster_flips']:.1f}% | {pct:.0f}% | {mem} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ 2. training throughput
def vocabulary_cells(n: int, genes: int, vocabulary, seed: int = 0):
    """``make_cells`` spread over the whole vocabulary (the genes the data lacks are zero columns):
    the input and output width of the paper's pretraining (its 19,374-gene vocabulary)."""
    import anndata as ad
    from scipy import sparse

    cells = make_cells(n, genes, vocabulary, seed=seed)
    column = {g: i for i, g in enumerate(vocabulary)}
    x = sparse.csr_matrix(cells.X)
    cols = np.array([column[g] for g in cells.var_names])[x.indices]
    wide = sparse.csr_matrix((x.data, cols, x.indptr), shape=(n, len(vocabulary)))
    wide.sort_indices()
    adata = ad.AnnData(wide, obs=cells.obs.copy())
    adata.var_names = list(vocabulary)
    return adata


def training_throughput(preset_name: str, precision: str, cells_per_step: int, warmup: int, steps: int,
                        genes: int, vocabulary, device: str, full_vocabulary: bool) -> dict:
    import lightning.pytorch as pl

    import scvi_cellplm
    from scvi_cellplm import CellPLM

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cells: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.cells.append(int(batch["X"].shape[0]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(device)
            self.ends.append(time.perf_counter())

    preset = scvi_cellplm.PRESETS[preset_name]
    total = warmup + steps
    make = vocabulary_cells if full_vocabulary else make_cells
    adata = make(cells_per_step * (total + 1), genes, vocabulary, seed=1)
    CellPLM.setup_anndata(adata, batch_key="batch")
    # n_top_genes=None: the whole width is the vocabulary, as in the paper's pretraining
    model = CellPLM(adata, max_cells_per_batch=cells_per_step, n_top_genes=None, **preset)
    clock = StepClock()
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.train(max_epochs=1, max_steps=total, accelerator="gpu" if device.startswith("cuda") else "cpu",
                devices=1, validation_size=0.0, precision=precision, enable_progress_bar=False,
                max_cells_per_batch=cells_per_step,
                callbacks=[clock], plan_kwargs={"n_steps_lr_warmup": 1})
    wall = time.perf_counter() - start
    if len(clock.ends) < total:
        raise RuntimeError(f"only {len(clock.ends)} of {total} training steps ran")
    timed = np.diff(clock.ends[warmup - 1:total])  # step k's wall: end(k-1) -> end(k)
    cells = clock.cells[warmup:total]
    out = {
        "preset": preset_name, "precision": precision, "cells_per_step": float(np.mean(cells)),
        "timed_steps": len(timed), "warmup_steps": warmup, "seconds_per_step": float(np.median(timed)),
        "step_seconds": [float(t) for t in timed],
        "cells_per_s": float(np.sum(cells) / np.sum(timed)), "total_wall_s": wall,
        "parameters": int(sum(p.numel() for p in model.module.parameters())),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "n_hidden": preset["n_hidden"], "n_layers": preset["n_layers"], "n_latent": preset["n_latent"],
        "n_clusters": preset["n_clusters"], "vocabulary": adata.n_vars,
    }
    model = None
    _free(device)
    return out


def training_table(rows: list[dict], peak: dict) -> str:
    lines = ["| preset | precision | genes | parameters | cells / step | s / step (median) | cells/s "
             "| ≈ % of mm (3x encoder forward) | peak memory |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['precision']} | failed: {r['error']} | | | | | | |")
            continue
        flops = 3 * encoder_flops_per_cell(r["n_hidden"], r["n_layers"], r["n_latent"], r["n_clusters"])
        ref = peak["bf16" if r["precision"].startswith("bf16") else "fp32"]
        pct = 100 * r["cells_per_s"] * flops / 1e9 / ref
        lines.append(f"| {r['preset']} | {r['precision']} | {r['vocabulary']:,} | {r['parameters'] / 1e6:.1f} M "
                     f"| {r['cells_per_step']:.0f} | {r['seconds_per_step']:.3f} | {r['cells_per_s']:,.0f} "
                     f"| {pct:.1f}% | {_gib(r['peak_gpu_bytes'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ 3. largest sentence
class _Cells:
    """Resampled PBMC cells of the benchmark's genes (the genes selected once: fast at millions)."""

    def __init__(self, genes: int, vocabulary) -> None:
        template = make_cells(1, genes, vocabulary)
        import anndata as ad

        pbmc = ad.read_h5ad(DATA)
        ids = pbmc.var["gene_ids"].astype(str).to_numpy()
        position = {g: i for i, g in enumerate(ids)}
        self.x = pbmc.X[:, [position[g] for g in template.var_names]].tocsr().astype(np.float32)
        self.var_names = template.var_names
        self.nnz_per_cell = self.x.nnz / self.x.shape[0]

    def __call__(self, n: int, seed: int = 0):
        import anndata as ad

        rng = np.random.default_rng(seed)
        adata = ad.AnnData(self.x[np.sort(rng.integers(0, self.x.shape[0], n))])
        adata.var_names = self.var_names
        adata.obs_names = [f"c{i}" for i in range(n)]
        adata.obs["batch"] = "sample0"
        return adata

    def host_bytes(self, n: int, genes: int) -> float:
        """A generous estimate of the host memory of one probe (CSR copies and a dense sentence)."""
        return n * (3 * 12 * self.nnz_per_cell + 2 * 4 * genes)


def largest_sentence(prefix: str, start: int, max_cells: int, budget: float, genes: int, vocabulary,
                     device: str) -> dict:
    from scvi_cellplm import CellPLM

    cells = _Cells(genes, vocabulary)
    template = cells(64)
    CellPLM.setup_anndata(template, batch_key="batch")
    model = CellPLM.from_official(prefix, template, max_cells_per_batch=max_cells)
    if device != "cpu":
        model.to_device(device)
    model.get_latent_representation(precision="32")  # warm-up
    t0 = time.perf_counter()
    probes: list[dict] = []
    fit, fail = None, None
    stop_reason = "bisection converged"

    def probe(n: int) -> bool:
        adata = cells(n)
        try:
            _, seconds, peak, _ = _timed_call(lambda: model.get_latent_representation(adata, precision="32"),
                                             device)
            probes.append({"cells": n, "fits": True, "seconds": seconds, "peak_gpu_bytes": peak})
            return True
        except Exception as err:
            if not _is_oom(err):
                raise
            probes.append({"cells": n, "fits": False, "error": type(err).__name__})
            return False
        finally:
            adata = None
            _free(device)

    def allowed(n: int) -> str | None:
        elapsed = time.perf_counter() - t0
        last = next((p for p in reversed(probes) if p["fits"]), None)
        predicted = last["seconds"] * n / last["cells"] * 3 if last else 0.0  # data preparation ~2x
        if elapsed + predicted > budget:
            return f"time budget ({budget:.0f} s) reached"
        if cells.host_bytes(n, genes) > 0.7 * _host_available_bytes():
            return f"host memory (a probe of {n:,} cells would need about {cells.host_bytes(n, genes) / GIB:.0f} GiB)"
        return None

    n = min(max(start, 1), max_cells)
    while True:  # doubling
        reason = allowed(n)
        if reason:
            stop_reason = reason
            break
        if probe(n):
            fit = n
            if n >= max_cells:
                stop_reason = f"--max-cells ({max_cells:,}) fits"
                break
            n = min(2 * n, max_cells)
        else:
            fail = n
            break
    while fit is not None and fail is not None and fail - fit > max(0.05 * fit, 1):  # bisection
        n = (fit + fail) // 2
        reason = allowed(n)
        if reason:
            stop_reason = reason
            break
        if probe(n):
            fit = n
        else:
            fail = n
    best = next((p for p in probes if p["fits"] and p["cells"] == fit), None)
    model = None
    _free(device)
    return {"largest_fit": fit, "smallest_oom": fail, "stop_reason": stop_reason, "max_cells": max_cells,
            "seconds_at_largest": best["seconds"] if best else None,
            "peak_gpu_bytes_at_largest": best["peak_gpu_bytes"] if best else None,
            "probes": probes, "search_seconds": time.perf_counter() - t0}


def sentence_table(r: dict) -> str:
    fit = f"{r['largest_fit']:,} cells" if r["largest_fit"] else "none"
    oom = f"{r['smallest_oom']:,} cells" if r["smallest_oom"] else "none reached"
    secs = f"{r['seconds_at_largest']:.2f} s" if r["seconds_at_largest"] else "-"
    probes = ", ".join(f"{p['cells']:,}{'' if p['fits'] else ' OOM'}" for p in r["probes"])
    return ("| largest sentence that fits (ours fp32) | first out-of-memory | time at the largest "
            "| peak memory there | search stopped by |\n| ---: | ---: | ---: | ---: | --- |\n"
            f"| {fit} | {oom} | {secs} | {_gib(r['peak_gpu_bytes_at_largest'])} | {r['stop_reason']} |\n\n"
            f"Probes in order: {probes}.")


# ------------------------------------------------------------------ 4. goals
def goals(rows: list[dict], dry_run: bool) -> list[dict]:
    row = next((r for r in rows if r["cells"] == GOAL_CELLS), None)
    out = []
    for goal, key, target, cmp in (
        (f"{GOAL_CELLS:,} cells fp32 <= {GOAL_SECONDS} s", "seconds", GOAL_SECONDS, "<="),
        (f"fp32 >= {GOAL_SPEEDUP:.0f}x the official package", "speedup_fp32", GOAL_SPEEDUP, ">="),
        (f"parity <= {GOAL_PARITY:.0e}", "max_abs_diff", GOAL_PARITY, "<="),
    ):
        if row is None:
            value, status = None, f"not measured ({GOAL_CELLS:,} cells not in --sizes)"
        else:
            value = row["ours"]["seconds"] if key == "seconds" else row.get(key)
            if value is None:
                status = "not measured (--skip-official)"
            else:
                met = value <= target if cmp == "<=" else value >= target
                status = ("met" if met else "not met") + (" on the CPU (dry run; the goal is for a GPU)"
                                                          if dry_run else "")
        out.append({"goal": goal, "value": value, "status": status})
    return out


def goals_table(items: list[dict]) -> str:
    lines = ["| goal | measured | status |", "| --- | ---: | --- |"]
    for g in items:
        v = g["value"]
        shown = "-" if v is None else (f"{v:.1e}" if v < 1e-3 else f"{v:.3f}")
        lines.append(f"| {g['goal']} | {shown} | {g['status']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda", help="'cuda' (the GPU run) or 'cpu' (a dry run)")
    parser.add_argument("--sizes", type=int, nargs="+", help="cells per sentence (default 1000 10000 48082)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one round, short search and training: a dry run of the script")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--time-budget", type=float, help="seconds for the largest-sentence search (default 150)")
    parser.add_argument("--max-cells", type=int, help="upper bound of the largest-sentence search (default 4,000,000)")
    parser.add_argument("--rounds", type=int, help="alternating timed rounds per size (default 3)")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--train-cells", type=int, help="cells per training step (default 1024)")
    parser.add_argument("--train-steps", type=int, help="timed training steps (default 10)")
    parser.add_argument("--train-warmup", type=int, help="untimed training steps first (default 3)")
    parser.add_argument("--train-genes", choices=["vocabulary", "data"],
                        help="training input/output width: the whole 19,374-gene vocabulary (as the paper's "
                             "pretraining; default) or the --genes data genes (--quick)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    sizes = args.sizes or ([300, 1000] if quick else [1000, 10000, GOAL_CELLS])
    rounds = args.rounds or (1 if quick else 3)
    budget = args.time_budget if args.time_budget is not None else (30.0 if quick else 150.0)
    max_cells = args.max_cells or (4000 if quick else 4_000_000)
    train_cells = args.train_cells or (128 if quick else 1024)
    train_steps = args.train_steps or (3 if quick else 10)
    train_warmup = args.train_warmup or (2 if quick else 3)
    full_vocabulary = (args.train_genes or ("data" if quick else "vocabulary")) == "vocabulary"
    if not CONFIG.exists() or not DATA.exists():
        print(f"needs {CONFIG} and {DATA} (the shared data folder; set CELLPLM_SHARED_DATA)")
        return 1

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch (a CPU build, or no GPU): use --device cpu for a dry run")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dry_run = not args.device.startswith("cuda")
    sys.path.insert(0, str(ROOT / "tests"))
    from official_oracle import build_official, save_official

    import scvi_cellplm

    config = json.loads(CONFIG.read_text())
    vocabulary = config["gene_list"]
    flops = encoder_flops_per_cell(config["enc_hid"], config["enc_layers"], config["post_latent_dim"],
                                   config["num_clusters"])
    peak = matmul_peak(config["enc_hid"], torch.get_num_threads(), args.device)
    name = device_name(args.device)
    result = {
        "device": args.device, "device_name": name, "dry_run": dry_run, "torch": torch.__version__,
        "cuda": torch.version.cuda, "scvi_cellplm": scvi_cellplm.__version__, "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "genes": args.genes,
        "matmul_gflops": peak, "flop_per_cell": flops, "rounds": rounds,
        "paper_reference": {"cells": GOAL_CELLS, "seconds": PAPER_A100_SECONDS, "device": "NVIDIA A100"},
    }

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=float))

    banner = (f"DRY RUN on the CPU ({name}): these are CPU figures that test the script, NOT GPU figures."
              if dry_run else f"Device: {name}")
    print(f"# scvi-cellplm on {args.device}: the paper's Table 1 setting\n\n{banner}\n\n"
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), {result['date_utc']}; torch.mm width "
          f"{config['enc_hid']}: {peak['fp32']:,.0f} GFLOP/s fp32, {peak['bf16']:,.0f} GFLOP/s bf16; encoder "
          f"{flops / 1e6:.1f} MFLOP/cell -> fp32 roofline {peak['fp32'] * 1e9 / flops:,.0f} cells/s. "
          f"Paper: {GOAL_CELLS:,} cells in {PAPER_A100_SECONDS} s on an A100.\n", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        save_official(build_official(config), config, tmp, "paper")
        prefix = os.path.join(tmp, "paper")

        print(f"## Inference (paper-size network, one sentence, {args.genes:,} genes; fastest of "
              f"{rounds} alternating round{'s' * (rounds > 1)} in one process)\n", flush=True)
        result["inference"] = []
        for n in sizes:
            row = measure_size(tmp, n, args.genes, vocabulary, args.device, rounds, args.skip_official)
            result["inference"].append(row)
            save()
            print(f"  measured {n:,} cells", file=sys.stderr, flush=True)
        print(inference_table(result["inference"], flops, peak) + "\n", flush=True)
        result["goals"] = goals(result["inference"], dry_run)
        save()

        if not args.skip_train:
            width = f"{len(vocabulary):,}-gene vocabulary" if full_vocabulary else f"{args.genes:,} genes"
            print(f"## Training throughput ({train_cells:,} cells per step, {train_steps} timed steps after "
                  f"{train_warmup} warm-up steps, {width}; wall time between step ends, data loading "
                  "included)\n", flush=True)
            result["training"] = []
            for preset in ("small", "paper"):
                for precision in ("32-true", "bf16-mixed"):
                    try:
                        row = training_throughput(preset, precision, train_cells, train_warmup, train_steps,
                                                  args.genes, vocabulary, args.device, full_vocabulary)
                    except Exception as err:
                        if not _is_oom(err):
                            raise
                        row = {"preset": preset, "precision": precision, "error": "out of memory"}
                        _free(args.device)
                    result["training"].append(row)
                    save()
            print(training_table(result["training"], peak) + "\n", flush=True)

        if not args.skip_search:
            print(f"## Largest single sentence (ours fp32; doubling from {max(sizes):,} cells, then "
                  f"bisection; at most {max_cells:,} cells and {budget:.0f} s)\n", flush=True)
            result["largest_sentence"] = largest_sentence(prefix, max(sizes), max_cells, budget, args.genes,
                                                          vocabulary, args.device)
            save()
            print(sentence_table(result["largest_sentence"]) + "\n", flush=True)

    print(f"## Goals (at {GOAL_CELLS:,} cells)\n\n{goals_table(result['goals'])}\n")
    if dry_run:
        print("DRY RUN: the figures above were measured on the CPU and are not GPU figures.")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
