"""The README's Python example runs as documented (the command line: test_cli.py)."""

from __future__ import annotations

import re
from pathlib import Path

import scvi_cellplm

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## In Python\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    # the example trains at the defaults; a short step budget keeps the test fast (the budget
    # itself is specified in test_defaults.py)
    monkeypatch.setattr("scvi_cellplm.model._base.get_max_steps_heuristic", lambda n, cells: 8)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    adata = namespace["adata"]
    assert adata.obsm["X_cellplm"].shape == (adata.n_obs, scvi_cellplm.SMALL_CPU["n_latent"])
    assert adata.layers["cellplm_denoised"].shape == adata.shape
    assert (tmp_path / "cellplm_model" / "model.safetensors").exists()
    assert (tmp_path / "cellplm_model" / "metadata.json").exists()
