"""Command line: ``cellplm demo``, ``cellplm embed`` and ``cellplm pretrain``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    result = run_demo(args.out, max_epochs=args.max_epochs, seed=args.seed,
                      progress_bar=not args.no_progress)
    table = Table(title="CellPLM demo: bundled human pancreas (1,937 cells, 14 cell types)")
    for col in ("embedding", "ARI", "NMI"):
        table.add_column(col)
    table.add_row("CellPLM (pretrained here)", f"{result.ari:.3f}", f"{result.nmi:.3f}")
    table.add_row("PCA of log-normalised counts", f"{result.ari_pca:.3f}", f"{result.nmi_pca:.3f}")
    console = Console()
    console.print(table)
    console.print("Leiden at resolution 1.0 for both; labels: obs['cell_type'].")
    console.print(f"Wrote {result.h5ad} and {result.figure} in {result.seconds:.0f} s.")
    return 0


def _embed(args: argparse.Namespace) -> int:
    import anndata as ad

    from . import CellPLM

    adata = ad.read_h5ad(args.input)
    model = CellPLM.load(args.model, adata=adata)
    adata.obsm[args.key] = model.get_latent_representation(adata)
    adata.write_h5ad(args.out, compression="gzip")
    Console().print(f"Wrote {args.out}: obsm[{args.key!r}] of shape {adata.obsm[args.key].shape}.")
    return 0


PRETRAIN_FLAGS = {
    # flag: (pretrain() keyword, type, help)
    "--preset": ("preset", str, "architecture preset: small | paper"),
    "--max-steps": ("max_steps", int, "optimiser steps"),
    "--max-epochs": ("max_epochs", int, "epochs (with --max-steps -1)"),
    "--max-cells-per-batch": ("max_cells_per_batch", int, "cell budget of a sentence and a mini-batch"),
    "--lr": ("lr", float, "peak learning rate"),
    "--layer": ("layer", str, "layer with raw counts (default .X)"),
    "--gene-id-key": ("gene_id_key", str, "var column with Ensembl ids (default var_names)"),
    "--batch-key": ("batch_key", str, "obs column of batches (default: one per file)"),
    "--sample-key": ("sample_key", str, "obs column of samples (sentences; default: batch)"),
    "--platform-key": ("platform_key", str, "obs column of platforms"),
    "--accelerator": ("accelerator", str, "cpu | gpu | auto"),
    "--devices": ("devices", str, "number of devices, or auto"),
    "--strategy": ("strategy", str, "auto | ddp | ddp_spawn | ..."),
    "--precision": ("precision", str, "Lightning precision, e.g. 32-true, bf16-mixed"),
    "--checkpoint-every": ("checkpoint_every", int, "save a checkpoint every N steps"),
    "--resume-from": ("resume_from", str, "checkpoint to resume from, or 'last'"),
    "--logger": ("logger_kind", str, "csv | tensorboard | both | none"),
    "--log-every-n-steps": ("log_every_n_steps", int, "logging interval in steps"),
    "--num-workers": ("num_workers", int, "DataLoader worker processes"),
    "--seed": ("seed", int, "seed of weights, windows, shuffle and masks"),
}


def _read_config(path: str) -> dict:
    """Keyword arguments of :func:`~scvi_cellplm.pretrain.pretrain` from YAML, JSON or TOML."""
    with open(path, "rb") as fh:
        if path.endswith(".json"):
            config = json.load(fh)
        elif path.endswith(".toml"):
            import tomllib

            config = tomllib.load(fh)
        else:
            import yaml  # PyYAML: a dependency of Lightning

            config = yaml.safe_load(fh)
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: the configuration must be a mapping of pretrain() arguments.")
    return config


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    config = _read_config(args.config) if args.config else {}
    if "out" in config:
        config["out_dir"] = config.pop("out")
    if args.data:
        config["data"] = args.data
    if args.out:
        config["out_dir"] = args.out
    for flag, (key, _, _) in PRETRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            config[key] = value
    if isinstance(config.get("devices"), str) and config["devices"].isdigit():
        config["devices"] = int(config["devices"])
    if args.no_progress:
        config["progress_bar"] = False
    missing = [k for k in ("data", "out_dir") if not config.get(k)]
    if missing:
        raise SystemExit(f"cellplm pretrain needs {' and '.join(missing)} (flags or config).")
    out_dir = config.pop("out_dir")
    model = pretrain(config.pop("data"), out_dir, **config)
    if model.trainer.is_global_zero:
        Console().print(f"Pretrained for {model.trainer.global_step} steps: model in {out_dir}/model "
                        f"(CellPLM.load), checkpoints in {out_dir}/checkpoints, logs in {out_dir}/logs.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``cellplm`` argument parser."""
    parser = argparse.ArgumentParser(prog="cellplm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain on bundled data, embed, cluster, plot, write")
    demo.add_argument("--out", default="cellplm_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--max-epochs", type=int, default=60, help="training epochs (%(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)

    embed = sub.add_parser("embed", help="embed an .h5ad with a saved model")
    embed.add_argument("input", help="input .h5ad with the model's genes and setup columns")
    embed.add_argument("--model", required=True, help="folder written by CellPLM.save")
    embed.add_argument("--out", required=True, help="output .h5ad")
    embed.add_argument("--key", default="X_cellplm", help="obsm key (default: %(default)s)")
    embed.set_defaults(func=_embed)

    pre = sub.add_parser(
        "pretrain", help="pretrain on .h5ad files streamed from disk (resumable, multi-device)",
        description="Pretrain CellPLM on a corpus of .h5ad files. Options come from CONFIG (YAML, "
        "JSON or TOML: keyword arguments of scvi_cellplm.pretrain.pretrain) and flags, flags winning.",
    )
    pre.add_argument("config", nargs="?", help="YAML/JSON/TOML file of pretrain() arguments")
    pre.add_argument("--data", nargs="+", help=".h5ad files of the corpus")
    pre.add_argument("--out", help="output folder (model/, checkpoints/, logs/, corpus.json)")
    for flag, (_, kind, text) in PRETRAIN_FLAGS.items():
        pre.add_argument(flag, type=kind, default=None, help=text)
    pre.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pre.set_defaults(func=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellplm`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
