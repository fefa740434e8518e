"""Regenerate the models in ``tests/data/old_release/``: files written by the previous release.

``tests/test_saved_format_migration.py`` checks that the current code still loads these files and
gives the outputs the previous release computed. The files were made by commit ``ea07887`` (the
last commit before the gene-vocabulary contract: the module held a ``gene_index`` buffer,
``dataset_gene_mask`` was in column space, the annotator had no ``label_categories`` argument and
the metadata stored neither ``gene_vocabulary`` nor ``decoder_batch_categories``).

This script must run with THAT release's code, never the current one (it refuses otherwise)::

    git worktree add /tmp/old_release ea07887
    PYTHONPATH=/tmp/old_release/src .venv/bin/python tests/data/make_old_release_models.py
    git worktree remove --force /tmp/old_release

It writes four folders, each with ``model.pt``, ``adata.h5ad`` (gzip) and ``expected.npz`` (the
outputs computed by the old code right after training, on the CPU):

``cellplm/``
    A plain :class:`~scvi_cellplm.CellPLM` (``layer="counts"``, ``batch_key="batch"``; genes are
    ``var_names``). ``expected.npz``: ``latent`` (all cells) and ``normalized`` (the first 20 cells
    of ``get_normalized_expression(library_size=1e4, return_numpy=True)``).
``cellplm_gene_ids/``
    The same, set up with ``gene_id_key="gene_ids"`` (Ensembl ids). ``expected.npz``: ``latent``.
``annotator/``
    :meth:`CellPLMAnnotator.from_cellplm_model` of the plain model, ``labels_key="cell_type"``,
    fine-tuned one epoch. ``expected.npz``: ``latent``, ``probs``
    (``predict(soft=True).to_numpy()``) and ``label_categories`` (its columns).
``cellplm_vocabulary/``
    A CellPLM with the file layouts the new code no longer writes: an explicit
    ``gene_vocabulary`` (the genes of ``cellplm/`` reversed, plus 10 genes the data lacks), so the
    module holds a ``gene_index`` buffer (column -> vocabulary row); and ``dataset_key="dataset"``
    (``"panel"``: the cells of batch ``human1_lib3``, whose last 40 genes are set to zero, i.e.
    unmeasured; ``"reference"``: the others), so ``dataset_gene_mask`` is in column space; plus
    ``center_input=True`` (an ``input_center`` in vocabulary space). ``expected.npz``: ``latent``,
    ``normalized`` (first 20 cells, as for ``cellplm/``) and ``imputed`` (the first 20 panel cells
    decoded as the reference: ``transform_dataset="reference"``), ``panel_rows`` (their rows).

Data: the bundled pancreas demo reduced to 300 cells (100 per batch, drawn with
``numpy.random.default_rng(0)``, in their original order) and the 200 genes with the highest total
counts over those cells (for ``cellplm_gene_ids/``: among the genes with a non-empty id), in their
original order; ``X`` is dropped (in the demo it equals ``layers["counts"]``, which the models
use), to keep the files small. Architecture: ``n_hidden=16, n_layers=1, n_heads=2, n_latent=4, n_clusters=3``;
one epoch with ``scvi.settings.seed = 0``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import scvi

import scvi_cellplm
from scvi_cellplm import CellPLM, CellPLMAnnotator

OLD_RELEASE = "ea07887"
OUT = Path(__file__).resolve().parent / "old_release"
ARCH = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "n_latent": 4, "n_clusters": 3}
TRAIN = {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False}
N_CELLS_PER_BATCH = 100
N_GENES = 200
N_NORMALIZED_CELLS = 20
N_UNMEASURED = 40
N_EXTRA_VOCABULARY = 10


def _check_old_code() -> None:
    """Refuse to run on anything but a checkout of ``OLD_RELEASE``."""
    src = Path(scvi_cellplm.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not head.startswith(OLD_RELEASE):
        sys.exit(f"scvi_cellplm is imported from {src} at commit {head[:7]}, not {OLD_RELEASE}: "
                 "run with PYTHONPATH=<worktree of ea07887>/src (see the module docstring).")


def _cells(adata) -> np.ndarray:
    rng = np.random.default_rng(0)
    chosen = [rng.choice(np.flatnonzero(adata.obs["batch"] == b), N_CELLS_PER_BATCH, replace=False)
              for b in adata.obs["batch"].cat.categories]
    return np.sort(np.concatenate(chosen))


def _subset(adata, genes_with_ids: bool):
    sub = adata[_cells(adata)]
    candidates = np.arange(adata.n_vars)
    if genes_with_ids:
        candidates = np.flatnonzero(adata.var["gene_ids"].astype(str).str.len() > 0)
    totals = np.asarray(sub.layers["counts"][:, candidates].sum(0)).ravel()
    top = candidates[np.argsort(-totals, kind="stable")[:N_GENES]]
    sub = sub[:, np.sort(top)].copy()
    sub.X = None  # equal to layers["counts"] in the demo: not stored twice
    return sub


def _train_cellplm(adata, **setup) -> CellPLM:
    scvi.settings.seed = 0
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch", **setup)
    model = CellPLM(adata, **ARCH)
    model.train(**TRAIN)
    return model


def _save(model, name: str, **expected) -> None:
    folder = OUT / name
    model.save(str(folder), overwrite=True, save_anndata=True, compression="gzip")
    np.savez_compressed(folder / "expected.npz", **expected)


def main() -> None:
    _check_old_code()
    pancreas = scvi_cellplm.datasets.pancreas_demo()

    plain = _train_cellplm(_subset(pancreas, genes_with_ids=False))
    normalized = plain.get_normalized_expression(library_size=1e4, return_numpy=True)
    _save(plain, "cellplm", latent=plain.get_latent_representation(),
          normalized=normalized[:N_NORMALIZED_CELLS])

    by_id = _train_cellplm(_subset(pancreas, genes_with_ids=True), gene_id_key="gene_ids")
    _save(by_id, "cellplm_gene_ids", latent=by_id.get_latent_representation())

    scvi.settings.seed = 0
    annotator = CellPLMAnnotator.from_cellplm_model(plain, labels_key="cell_type")
    annotator.train(**TRAIN)
    probs = annotator.predict(soft=True)
    _save(annotator, "annotator", latent=annotator.get_latent_representation(),
          probs=probs.to_numpy(), label_categories=np.asarray(probs.columns, dtype=str))

    data = _subset(pancreas, genes_with_ids=False)
    panel = (data.obs["batch"] == "human1_lib3").to_numpy()
    data.obs["dataset"] = np.where(panel, "panel", "reference")
    counts = data.layers["counts"].tolil()
    counts[np.flatnonzero(panel)[:, None], np.arange(data.n_vars - N_UNMEASURED, data.n_vars)] = 0
    data.layers["counts"] = counts.tocsr()
    data.layers["counts"].eliminate_zeros()
    vocabulary = [*data.var_names[::-1], *(f"ABSENT{i}" for i in range(N_EXTRA_VOCABULARY))]
    scvi.settings.seed = 0
    CellPLM.setup_anndata(data, layer="counts", batch_key="batch", dataset_key="dataset")
    vocab = CellPLM(data, **ARCH, gene_vocabulary=vocabulary, center_input=True)
    vocab.train(**TRAIN)
    assert vocab.module.gene_index is not None and vocab.module.dataset_gene_mask is not None
    normalized = vocab.get_normalized_expression(library_size=1e4, return_numpy=True)
    imputed = vocab.get_normalized_expression(library_size=1e4, transform_dataset="reference",
                                              return_numpy=True)
    panel_rows = np.flatnonzero(panel)[:N_NORMALIZED_CELLS]
    _save(vocab, "cellplm_vocabulary", latent=vocab.get_latent_representation(),
          normalized=normalized[:N_NORMALIZED_CELLS], imputed=imputed[panel_rows],
          panel_rows=panel_rows)

    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>9,d}  {path.relative_to(OUT)}")


if __name__ == "__main__":
    main()
