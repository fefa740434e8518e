"""The tutorials in ``tutorials/`` run end to end as plain Python scripts (slow: ~minutes each).

The documentation build executes them as notebooks; this test catches a broken tutorial without
Sphinx. Each runs in a fresh temporary working directory with the non-interactive matplotlib
backend.
"""

from __future__ import annotations

import logging
import runpy
from pathlib import Path

import pytest

_QUIETENED = (
    "lightning", "lightning.pytorch", "lightning.fabric", "lightning.fabric.utilities.seed", "scvi",
    "scvi_cellplm",
)
TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    if path.stem == "official_checkpoints":
        pytest.importorskip("CellPLM", reason="needs the official `cellplm` package")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import scanpy as sc

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: plt.close("all"))
    # the tutorials quieten these; give the other tests their settings back
    loggers = {name: logging.getLogger(name).level for name in _QUIETENED}
    verbosity = sc.settings.verbosity
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        plt.close("all")
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
        sc.settings.verbosity = verbosity


def test_tutorials_are_found():
    assert {p.stem for p in TUTORIALS} >= {
        "pretraining_alongside_scvi",
        "denoising",
        "annotation_query_mapping",
        "official_checkpoints",
    }
