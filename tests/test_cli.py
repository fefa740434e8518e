"""`cellplm embed` on raw-count .h5ad files as users have them, and the CLI's error handling.

The model is applied to files whose genes are in another order (or a superset, with genes it
never saw), whose counts are in ``.X`` and whose batches are new; the output is the input file
plus ``obsm[KEY]`` and nothing else, and the input file is never touched. Bad input ends with one
line ``cellplm: error: ...`` and exit status 2, checked before any expensive work.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
from scipy import sparse

import scvi_cellplm
from scvi_cellplm.cli import main

N_LATENT = 8
TINY = {"n_hidden": 32, "n_layers": 1, "n_heads": 2, "n_latent": N_LATENT, "n_clusters": 4}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cellplm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``cellplm`` command in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "scvi_cellplm.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("cellplm: error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pancreas():
    """600 cells (200 per batch) of the bundled pancreas data, all 2,000 genes, counts in a layer."""
    full = scvi_cellplm.datasets.pancreas_demo()
    rng = np.random.default_rng(0)
    cells = np.concatenate([
        rng.choice(np.flatnonzero(full.obs["batch"] == b), 200, replace=False)
        for b in full.obs["batch"].cat.categories
    ])
    return full[np.sort(cells)].copy()


@pytest.fixture(scope="module")
def model_genes(pancreas) -> list[str]:
    """The 400 most expressed genes: the model's vocabulary (a subset of the file's genes)."""
    totals = np.asarray(pancreas.layers["counts"].sum(0)).ravel()
    return [str(g) for g in pancreas.var_names[np.sort(np.argsort(-totals)[:400])]]


@pytest.fixture(scope="module")
def model_dir(pancreas, model_genes, tmp_path_factory) -> Path:
    """A tiny CellPLM trained one epoch on the model genes, saved with CellPLM.save."""
    scvi.settings.seed = 0
    train = pancreas[:, model_genes].copy()
    scvi_cellplm.CellPLM.setup_anndata(train, layer="counts", batch_key="batch")
    model = scvi_cellplm.CellPLM(train, **TINY)
    model.train(max_epochs=1, enable_progress_bar=False)
    path = tmp_path_factory.mktemp("model") / "model"
    model.save(path)
    return path


def user_file(pancreas, genes, path: Path, rename_batches: dict | None = None, extra_genes: int = 0,
              seed: int = 0) -> Path:
    """A raw-count .h5ad as users have it: counts in .X (sparse), no layers, the given genes in that
    order, batches renamed, optionally ``extra_genes`` genes no model has seen, some metadata."""
    sub = pancreas[:, genes]
    x = sparse.csr_matrix(sub.layers["counts"], dtype=np.float32)
    var = pd.DataFrame({"symbol": [f"sym_{g}" for g in genes]}, index=list(genes))
    if extra_genes:
        rng = np.random.default_rng(seed)
        unknown = sparse.csr_matrix(rng.poisson(0.5, (sub.n_obs, extra_genes)).astype(np.float32))
        x = sparse.hstack([x, unknown], format="csr")
        names = [f"UNKNOWN_GENE_{i}" for i in range(extra_genes)]
        var = pd.concat([var, pd.DataFrame({"symbol": names}, index=names)])
        order = np.random.default_rng(seed + 1).permutation(x.shape[1])
        x, var = x[:, order], var.iloc[order]
    batch = sub.obs["batch"].astype(str)
    if rename_batches:
        batch = batch.map(lambda b: rename_batches.get(b, b))
    obs = pd.DataFrame({"batch": pd.Categorical(batch), "cell_type": sub.obs["cell_type"].to_numpy()},
                       index=sub.obs_names.copy())
    adata = ad.AnnData(X=x, obs=obs, var=var, uns={"note": "from the lab"})
    adata.obsm["X_pca_lab"] = np.random.default_rng(seed).normal(size=(adata.n_obs, 3))
    adata.write_h5ad(path)
    return path


@pytest.fixture
def raw_file(pancreas, model_genes, tmp_path) -> Path:
    """The model's genes in a permuted order, counts in .X, batches renamed."""
    genes = list(np.random.default_rng(3).permutation(model_genes))
    renamed = {b: f"site_{i}" for i, b in enumerate(pancreas.obs["batch"].cat.categories)}
    return user_file(pancreas, genes, tmp_path / "raw.h5ad", rename_batches=renamed)


# ------------------------------------------------------------------- 1. refusing to overwrite
def test_existing_output_is_refused_without_overwrite_before_the_model_is_loaded(raw_file, tmp_path):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"precious")
    result = cellplm("embed", raw_file, "--model", tmp_path / "no_such_model", "--out", out)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(out), "--overwrite")
    assert "no_such_model" not in result.stderr  # the output is the complaint, not the model
    assert out.read_bytes() == b"precious"


def test_output_same_as_input_needs_overwrite(raw_file, capsys):
    before = sha256(raw_file)
    assert main(["embed", str(raw_file), "--model", "no_such_model", "--out", str(raw_file)]) == 2
    assert_one_line_error(capsys.readouterr().err, "is the input file", "--overwrite")
    assert sha256(raw_file) == before


@pytest.mark.parametrize(("out_name", "key", "words"), [
    ("out.csv", "X_cellplm", ["must end with .h5ad"]),
    ("missing_folder/out.h5ad", "X_cellplm", ["folder of --out does not exist"]),
    ("out.h5ad", "a/b", ["--key", "'a/b'"]),
    ("out.h5ad", "", ["--key must not be empty"]),
    ("out.h5ad", "_scvi_latent", ["reserved"]),
])
def test_bad_output_or_key_is_refused_before_any_work(raw_file, tmp_path, capsys, out_name, key, words):
    out = tmp_path / out_name
    assert main(["embed", str(raw_file), "--model", "no_such_model", "--out", str(out), "--key", key]) == 2
    assert_one_line_error(capsys.readouterr().err, *words)
    assert not out.exists()


def test_missing_input_file_is_one_line(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nope.h5ad"), "--model", "m", "--out", str(tmp_path / "o.h5ad")]) == 2
    assert_one_line_error(capsys.readouterr().err, "input file not found", "nope.h5ad")


def test_unreadable_input_file_is_one_line(tmp_path, capsys):
    (tmp_path / "in.h5ad").write_text("not hdf5")
    assert main(["embed", str(tmp_path / "in.h5ad"), "--model", str(tmp_path), "--out", str(tmp_path / "o.h5ad")]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot read", "in.h5ad")


# ------------------------------------------------------------------------- 2. missing keys
@pytest.mark.parametrize(("flag", "value", "available"), [
    ("--layer", "counts", "layers: none"),
    ("--batch-key", "donor", "'batch', 'cell_type'"),
    ("--sample-key", "slide", "'batch', 'cell_type'"),
    ("--gene-id-key", "ensembl", "'symbol'"),
])
def test_missing_key_names_the_available_keys(raw_file, model_dir, tmp_path, capsys, flag, value, available):
    out = tmp_path / "out.h5ad"
    code = main(["embed", str(raw_file), "--model", str(model_dir), "--out", str(out), flag, value])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, flag, repr(value), available)
    assert not out.exists()


def test_missing_layer_in_a_subprocess_exits_2_without_traceback(raw_file, model_dir, tmp_path):
    result = cellplm("embed", raw_file, "--model", model_dir, "--out", tmp_path / "out.h5ad",
                     "--layer", "counts")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--layer 'counts'", "layers: none")


def test_debug_shows_the_traceback(raw_file, model_dir, tmp_path):
    with pytest.raises(KeyError, match="--batch-key 'donor'"):
        main(["embed", str(raw_file), "--model", str(model_dir), "--out", str(tmp_path / "o.h5ad"),
              "--batch-key", "donor", "--debug"])


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "in.h5ad"])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "--model", "--out")


def test_pretrain_user_errors_are_one_line(tmp_path, capsys):
    assert main(["pretrain", "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr().err, "pretrain needs --data and --out")
    config = tmp_path / "config.yaml"
    config.write_text("data: [a.h5ad\n")
    assert main(["pretrain", str(config)]) == 2
    assert_one_line_error(capsys.readouterr().err, "unreadable YAML")


# ----------------------------------------------------------------------- 3. end to end
def test_embed_raw_counts_in_X_with_permuted_genes_and_new_batch_names(raw_file, model_dir, tmp_path):
    before = sha256(raw_file)
    out = tmp_path / "embedded.h5ad"
    result = cellplm("embed", raw_file, "--model", model_dir, "--out", out, "--batch-key", "batch")
    assert result.returncode == 0, result.stderr
    assert "obsm['X_cellplm']" in result.stdout and str(out) in result.stdout

    assert sha256(raw_file) == before
    original, written = ad.read_h5ad(raw_file), ad.read_h5ad(out)
    assert written.obsm["X_cellplm"].shape == (original.n_obs, N_LATENT)
    assert np.isfinite(written.obsm["X_cellplm"]).all()
    assert not [k for k in written.uns if k.startswith("_scvi")]
    assert not [k for k in written.obs if k.startswith("_scvi")]
    # everything else is the input, unchanged
    pd.testing.assert_frame_equal(written.obs, original.obs)
    pd.testing.assert_frame_equal(written.var, original.var)
    assert (written.X != original.X).nnz == 0
    assert written.uns["note"] == "from the lab"
    assert set(written.obsm) == {"X_pca_lab", "X_cellplm"}
    assert not list(tmp_path.glob(".cellplm-*"))  # no temporary file left behind


def test_embed_in_place_with_overwrite(raw_file, model_dir, capsys):
    assert main(["embed", str(raw_file), "--model", str(model_dir), "--out", str(raw_file),
                 "--batch-key", "batch", "--key", "X_tiny", "--overwrite"]) == 0
    written = ad.read_h5ad(raw_file)
    assert written.obsm["X_tiny"].shape == (written.n_obs, N_LATENT)
    assert not [k for k in written.uns if k.startswith("_scvi")]
    assert "X_tiny" in capsys.readouterr().out


# ------------------------------------------------- the saved model's own data; the demo
def test_embed_reproduces_the_models_own_embedding(tmp_path, trained_small, small_pancreas):
    trained_small.save(tmp_path / "model")
    small_pancreas.write_h5ad(tmp_path / "in.h5ad")
    assert main(["embed", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "out.h5ad"), "--layer", "counts", "--batch-key", "batch"]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_allclose(out.obsm["X_cellplm"], trained_small.get_latent_representation(),
                               atol=1e-5)


def test_embed_uses_the_models_batch_key_when_the_file_has_it(tmp_path, trained_small, small_pancreas):
    """Without --batch-key, a file with the model's batch column is read sample by sample, as the
    model reads its own data; only the layer has to be named."""
    trained_small.save(tmp_path / "model")
    small_pancreas.write_h5ad(tmp_path / "in.h5ad")
    assert main(["embed", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "out.h5ad"), "--layer", "counts"]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_allclose(out.obsm["X_cellplm"], trained_small.get_latent_representation(),
                               atol=1e-5)


def test_demo_writes_h5ad_with_embedding_and_umap_png(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--max-epochs", "2", "--no-progress"]) == 0
    adata = ad.read_h5ad(tmp_path / "pancreas_cellplm.h5ad")
    assert adata.obsm["X_cellplm"].shape[0] == adata.n_obs == 1937
    assert "cellplm_leiden" in adata.obs and "X_umap_cellplm" in adata.obsm
    png = (tmp_path / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# ------------------------------------------------------------------------------- 4. --help
@pytest.mark.parametrize("args", [["--help"], ["embed", "--help"]])
def test_help_is_fast(args):
    entry_point = Path(sys.executable).parent / "cellplm"
    command = [str(entry_point)] if entry_point.exists() else [sys.executable, "-m", "scvi_cellplm.cli"]
    start = time.perf_counter()
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    print(f"cellplm {' '.join(args)}: {seconds:.2f} s")
    assert result.returncode == 0, result.stderr
    assert "usage: cellplm" in result.stdout
    assert seconds < 5, f"cellplm {' '.join(args)} took {seconds:.1f} s"


# --------------------------------------------------------- 5. other genes, new batch category
def test_superset_of_genes_with_unknown_genes_and_a_new_batch_embeds_like_the_model_genes(
    pancreas, model_genes, model_dir, tmp_path
):
    others = [str(g) for g in pancreas.var_names if g not in set(model_genes)][:300]
    superset = list(np.random.default_rng(5).permutation(model_genes + others))
    first = str(pancreas.obs["batch"].cat.categories[0])
    new_batch = {first: "never_seen_site"}
    wide = user_file(pancreas, superset, tmp_path / "wide.h5ad", rename_batches=new_batch, extra_genes=100)
    user_file(pancreas, model_genes, tmp_path / "narrow.h5ad", rename_batches=new_batch)

    for name in ("wide", "narrow"):
        code = main(["embed", str(tmp_path / f"{name}.h5ad"), "--model", str(model_dir),
                     "--out", str(tmp_path / f"{name}_out.h5ad"), "--batch-key", "batch"])
        assert code == 0
    wide_emb = ad.read_h5ad(tmp_path / "wide_out.h5ad").obsm["X_cellplm"]
    narrow_emb = ad.read_h5ad(tmp_path / "narrow_out.h5ad").obsm["X_cellplm"]
    assert wide_emb.shape == (pancreas.n_obs, N_LATENT)
    np.testing.assert_allclose(wide_emb, narrow_emb, atol=1e-5)
    assert ad.read_h5ad(wide).n_vars == 800  # the input is untouched


def test_pretrain_flags_reach_pretrain_including_num_nodes(tmp_path, monkeypatch):
    seen = {}

    class _Trainer:
        is_global_zero, global_step = True, 0

    class _Model:
        trainer = _Trainer()

    def fake_pretrain(data, out_dir, **kwargs):
        seen.update(kwargs, data=data, out_dir=out_dir)
        return _Model()

    monkeypatch.setattr("scvi_cellplm.pretrain.pretrain", fake_pretrain)
    args = ["pretrain", "--data", "a.h5ad", "--out", str(tmp_path / "run"), "--num-nodes", "2",
            "--devices", "4", "--strategy", "ddp", "--no-progress"]
    assert main(args) == 0
    assert seen["num_nodes"] == 2 and seen["devices"] == 4 and seen["strategy"] == "ddp"
