"""Draw the architecture figure of the user guide: ``docs/_static/architecture.png``.

Left: the layers of ``src/scvi_cellplm`` (imports only go down; ``tests/test_architecture.py``
checks it). Right: the path of one call, ``model.get_latent_representation(adata)``, each step
coloured by the layer that does it. Run from the repository root after changing the figure (the
PNG is committed)::

    python docs/_scripts/make_architecture.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parents[1] / "_static" / "architecture.png"

GREY, BLUE, PURPLE, GREEN, ORANGE, DARK = "#8C8C8C", "#4C72B0", "#8172B3", "#55A868", "#DD8452", "#333333"


def box(ax, x, y, w, h, color, title, body="", title_size=11.5, body_size=9.2):
    """A rounded box with a bold title on top and a smaller body below it."""
    for fc, ec, alpha, lw in ((color, "none", 0.16, 0), ("none", color, 1.0, 1.5)):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.1",
                                    fc=fc, ec=ec, alpha=alpha, lw=lw))
    if body:
        ax.text(x + 0.15, y + h - 0.13, title, ha="left", va="top", fontsize=title_size,
                weight="bold", color=DARK)
        ax.text(x + 0.15, y + h - 0.45, body, ha="left", va="top", fontsize=body_size,
                color=DARK, linespacing=1.35)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=title_size,
                weight="bold", color=DARK)


def arrow(ax, x0, y0, x1, y1, color=DARK, lw=1.6):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14,
                                 color=color, lw=lw))


def layers(ax) -> None:
    """The layer stack, top (workflows) to bottom (constants)."""
    x, w, gap = 0.55, 6.35, 0.22
    ax.text(x + w / 2, 9.55, "Layers of src/scvi_cellplm", ha="center", fontsize=13, weight="bold")
    ax.text(x + w / 2, 9.2, "imports only go down, never in a circle; no file above 500 lines",
            ha="center", fontsize=9.5, color=GREY, style="italic")
    rows = [
        (1.0, GREY, "workflows",
         "cli.py  ·  _demo.py  ·  pretrain/\nspatial/  (impute_genes, joint_anndata)"),
        (1.65, BLUE, "model/   scvi-tools model classes",
         "CellPLM  ·  CellPLMAnnotator  ·  CellPLMPerturbation: siblings over\n"
         "CellPLMBase (_base.py: backbone, validation, train, save/load)\n"
         "_inference.py: _collect, the one inference engine\n"
         "_transfer.py: the one weight transfer  ·  _setup.py: fields, checks"),
        (0.65, PURPLE, "train/   CellPLMTrainingPlan (masked reconstruction)", ""),
        (1.05, GREEN, "data/   AnnData → mini-batches",
         "_genes.py: align_to_vocabulary (the gene contract)  ·  _sentences.py\n"
         "_windows.py  ·  _graph.py  ·  _loader.py (gene_index per mini-batch)"),
    ]
    top = 8.85
    ys = []
    for h, color, title, body in rows:
        y = top - h
        box(ax, x, y, w, h, color, title, body)
        ys.append((y, top))
        top = y - gap
    # module/ and io/ side by side
    h, half = 1.05, (w - 0.2) / 2
    y = top - h
    box(ax, x, y, half, h, ORANGE, "module/", "pure torch, no data state:\ngene_index comes with each call")
    box(ax, x + half + 0.2, y, half, h, ORANGE, "io/",
        "official checkpoints, gene\ntables, safe loading")
    ys.append((y, top))
    top = y - gap
    h = 0.55
    y = top - h
    box(ax, x, y, w, h, GREY, "_constants.py  ·  _exceptions.py  ·  _presets.py", title_size=10.5)
    ys.append((y, top))
    for (low, _), (_, high) in zip(ys[:-1], ys[1:]):  # one arrow into each layer below
        arrow(ax, x - 0.25, low + 0.05, x - 0.25, high - 0.05, color=GREY, lw=1.3)


def data_path(ax) -> None:
    """The steps of one call, top to bottom, coloured by the layer that does them."""
    x, w = 8.0, 5.6
    ax.text(x + w / 2, 9.55, "One call: model.get_latent_representation(adata)", ha="center",
            fontsize=13, weight="bold")
    ax.text(x + w / 2, 9.2, "any AnnData: other genes, new batches, samples or labels",
            ha="center", fontsize=9.5, color=GREY, style="italic")
    steps = [
        (BLUE, "1  _validate_anndata  (model/)",
         "its own setup if it has one, else the model's,\nnew categories extended"),
        (GREEN, "2  gene alignment by identifier  (data/, io/)",
         "to the vocabulary, once per AnnData, logged;\nwarns below 50 % measured, error at none"),
        (GREEN, "3  sentences  (data/)",
         "a sample, or windows of one above\nmax_cells_per_batch"),
        (GREEN, "4  loader  (data/)",
         "mini-batches of whole sentences,\neach with its gene_index"),
        (ORANGE, "5  module.inference  (module/)", "pure torch: counts + gene_index → z"),
        (BLUE, "6  _collect  (model/)",
         'rows scattered back in cell order\n→ adata.obsm["X_cellplm"]'),
    ]
    h, gap, top = 0.9, 0.32, 8.85
    for i, (color, title, body) in enumerate(steps):
        y = top - h
        box(ax, x, y, w, h, color, title, body, title_size=10.5, body_size=9.2)
        if i < len(steps) - 1:
            arrow(ax, x + w / 2, y - 0.02, x + w / 2, y - gap + 0.02)
        top = y - gap


def main() -> None:
    fig, ax = plt.subplots(figsize=(14, 8.4))
    ax.set(xlim=(0, 14), ylim=(1.55, 9.9))
    ax.axis("off")
    layers(ax)
    data_path(ax)
    fig.savefig(OUT, dpi=100, bbox_inches="tight", facecolor="white")
    plt.close(fig)


if __name__ == "__main__":
    main()
