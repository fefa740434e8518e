"""Every ```python block of the README and the documentation pages runs (examples cannot rot).

Each page's blocks run in order in one namespace, as a reader would type them, in a temporary
folder that holds what the text assumes (an official checkpoint pair at ``ckpt/20231027_85M``,
``.h5ad`` files, an ``adata``). Training is cut to one epoch (pretraining to two steps): the
test checks that the code runs against the current API, not what it learns. The tutorials are
executed by the documentation build and ``tests/test_tutorials.py``. Examples that need the network
(downloads, the Hugging Face Hub) are written as ```{code-block} python: shown, not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import TINY

import scvi_cellplm
from scvi_cellplm import CellPLM

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md") if not {"_build", "generated"} & set(p.parts)
)
CHECKPOINT = "ckpt/20231027_85M"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_pages_with_code_are_found():
    names = {p.name for p in PAGES_WITH_CODE}
    assert {"README.md", "spatial.md", "pretraining.md", "official_checkpoints.md", "sharing.md"} <= names


@pytest.fixture
def short_training(monkeypatch):
    """``train`` for one epoch, ``pretrain`` for two steps, no progress bars."""
    from scvi_cellplm import pretrain as pretrain_module

    train = CellPLM.train

    def one_epoch(self, max_epochs=None, **kwargs):
        return train(self, max_epochs=1, **{**kwargs, "enable_progress_bar": False})

    pretrain = pretrain_module.pretrain

    def two_steps(*args, **kwargs):
        return pretrain(*args, **{**kwargs, "max_steps": 2, "checkpoint_every": 1})

    monkeypatch.setattr(CellPLM, "train", one_epoch)
    monkeypatch.setattr(pretrain_module, "pretrain", two_steps)


def _pancreas(n_cells: int = 300) -> ad.AnnData:
    adata = scvi_cellplm.datasets.pancreas_demo()
    return adata[np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False)].copy()


def _official_checkpoint(adata: ad.AnnData) -> None:
    adata = adata.copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    Path(CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    CellPLM(adata, **TINY, input_target_sum=None).to_official(CHECKPOINT)


def _namespace(page: Path, tmp_path: Path) -> dict:
    """What the page's text assumes exists, in the current (temporary) folder."""
    import h5py

    namespace = {"anndata": ad, "np": np, "scvi_cellplm": scvi_cellplm, "CellPLM": CellPLM}
    pancreas = _pancreas()
    _official_checkpoint(pancreas)
    adata = pancreas.copy()
    if page.name == "spatial.md":
        adata = scvi_cellplm.datasets.merfish_u2os_demo()
        adata.obs["section"] = adata.obs["batch"]
        reference = adata[adata.obs["batch"] == "B1"].copy()
        reference.var_names = ["GENE1", "GENE2", *reference.var_names[2:]]
        namespace["sp_adata"] = adata[adata.obs["batch"] != "B1", 2:200].copy()
        namespace["sc_reference"] = reference
    if page.name == "pretraining.md":
        for name, batch in zip(("pancreas", "pbmc", "mouse_brain"), adata.obs["batch"].cat.categories):
            part = adata[adata.obs["batch"] == batch].copy()
            part.X = part.layers["counts"]
            part.write_h5ad(f"{name}.h5ad")
    if page.name == "performance.md":
        adata.obs["sample"] = adata.obs["batch"]
        adata.write_h5ad("atlas.h5ad")
        namespace["h5py_dataset"] = h5py.File(tmp_path / "z.h5", "w").create_dataset(
            "z", (adata.n_obs, TINY["n_latent"]), "f4"
        )
    namespace["adata"] = adata
    return namespace


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_page_code_runs(page, tmp_path, monkeypatch, short_training):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: plt.close("all"))
    namespace = _namespace(page, tmp_path)
    for i, block in enumerate(python_blocks(page)):
        try:
            exec(compile(block, f"{page.name} [python block {i + 1}]", "exec"), namespace)
        finally:
            plt.close("all")
