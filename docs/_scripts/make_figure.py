"""Draw the CellPLM schematic of the user guide: ``docs/_static/cellplm_schematic.png``.

Run from the repository root after changing the figure (the PNG is committed)::

    python docs/_scripts/make_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

OUT = Path(__file__).resolve().parents[1] / "_static" / "cellplm_schematic.png"

BLUE, ORANGE, GREEN, PURPLE, GREY = "#4C72B0", "#DD8452", "#55A868", "#8172B3", "#8C8C8C"


def box(ax, x, y, w, h, text, color, fontsize=9.5, alpha=0.18):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec=color, alpha=alpha, lw=0))
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc="none", ec=color, lw=1.4))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, x0, y0, x1, y1, color="#333333", style="-|>", ls="-"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=12,
                                 color=color, lw=1.3, linestyle=ls))


def count_matrix(ax, x, y, w, h, masked, title):
    """A small cells x genes grid; masked entries hatched."""
    rng = np.random.default_rng(3)
    n_cells, n_genes = 6, 8
    values = rng.poisson(1.2, (n_cells, n_genes))
    cw, ch = w / n_genes, h / n_cells
    for i in range(n_cells):
        for j in range(n_genes):
            shade = min(values[i, j] / 4, 1.0)
            hide = masked[i, j]
            ax.add_patch(Rectangle(
                (x + j * cw, y + h - (i + 1) * ch), cw, ch,
                fc="white" if hide else plt.cm.Blues(0.15 + 0.7 * shade),
                ec="white" if not hide else ORANGE, lw=0.8, hatch="////" if hide else None,
            ))
    ax.text(x + w / 2, y + h + 0.12, title, ha="center", va="bottom", fontsize=9.5)
    ax.text(x - 0.08, y + h / 2, "cells", rotation=90, ha="right", va="center", fontsize=8,
            color=GREY)
    ax.text(x + w / 2, y - 0.08, "genes", ha="center", va="top", fontsize=8, color=GREY)


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 5.2))
    ax.set(xlim=(0, 12), ylim=(0, 5.2))
    ax.axis("off")

    # 1. input: counts of one sentence, with masked entries (pretraining)
    rng = np.random.default_rng(0)
    masked = np.zeros((6, 8), dtype=bool)
    for i in rng.choice(6, 4, replace=False):  # most cells of the sentence are chosen ...
        masked[i, rng.choice(8, 2, replace=False)] = True  # ... and hide some of their genes
    count_matrix(ax, 0.35, 1.75, 1.6, 1.5, masked, "counts of one sentence")
    ax.text(1.15, 1.22, "sentence = one sample, or a\ncontiguous window of a large one",
            ha="center", va="top", fontsize=8, color=GREY)
    ax.text(1.15, 0.55, "hatched: entries hidden\nfor pretraining", ha="center", va="top",
            fontsize=8, color=ORANGE)

    # 2. embedder
    box(ax, 2.45, 2.05, 1.75, 0.9, "embedder\nlog1p(counts)\n@ gene table → MLP", BLUE,
        fontsize=8.5)
    arrow(ax, 2.05, 2.5, 2.42, 2.5)
    box(ax, 2.45, 3.65, 1.75, 0.7, "positional encoding\nof coordinates (spatial)", GREY,
        fontsize=8)
    arrow(ax, 3.32, 3.62, 3.32, 2.98, color=GREY, ls="--")

    # 3. transformer over cell tokens
    tokens_y = np.linspace(1.7, 3.3, 6)
    for k, ty in enumerate(tokens_y):
        ax.add_patch(FancyBboxPatch((4.65, ty - 0.1), 0.45, 0.2,
                                    boxstyle="round,pad=0.01,rounding_size=0.05",
                                    fc=BLUE, ec="none", alpha=0.35 + 0.08 * k))
    arrow(ax, 4.22, 2.5, 4.6, 2.5)
    ax.text(4.87, 3.55, "cell tokens", ha="center", fontsize=8.5)
    box(ax, 5.35, 1.6, 1.65, 1.8,
        "transformer\nacross the cells\nof the sentence\n\nflowformer\n(linear cost)\nor sdpa",
        PURPLE, fontsize=8.5)
    for ty in tokens_y:
        arrow(ax, 5.12, ty, 5.33, 2.5, color=PURPLE, style="-")

    # 4. latent
    box(ax, 7.35, 2.05, 1.45, 0.9, "GMVAE / VAE\nlatent z", GREEN)
    arrow(ax, 7.02, 2.5, 7.32, 2.5)
    ax.text(8.07, 1.55, "eval: posterior mean,\nmost likely cluster\n(deterministic)",
            ha="center", va="top", fontsize=8, color=GREEN)
    box(ax, 7.35, 3.65, 1.45, 0.7, 'obsm\n["X_cellplm"]', GREEN, fontsize=8.5, alpha=0.08)
    arrow(ax, 8.07, 2.98, 8.07, 3.62, color=GREEN)

    # 5. decoder
    box(ax, 9.15, 2.05, 1.45, 0.9, "NB decoder\n+ batch\nembeddings", ORANGE, fontsize=8.5)
    arrow(ax, 8.82, 2.5, 9.12, 2.5)
    box(ax, 9.15, 3.65, 1.45, 0.7, 'layers\n["cellplm_denoised"]', ORANGE, fontsize=8,
        alpha=0.08)
    arrow(ax, 9.87, 2.98, 9.87, 3.62, color=ORANGE)

    # 6. loss
    box(ax, 10.9, 1.9, 0.95, 1.2, "masked\nNB loss\n+ KL", ORANGE, fontsize=8.5)
    arrow(ax, 10.62, 2.5, 10.87, 2.5)
    ax.text(11.37, 1.75, "pretraining\nonly", ha="center", va="top", fontsize=8, color=GREY)

    ax.text(6, 5.0, "CellPLM: cells are the tokens, samples are the sentences", ha="center",
            va="center", fontsize=12.5, weight="bold")
    fig.savefig(OUT, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)


if __name__ == "__main__":
    main()
