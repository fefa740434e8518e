"""Sharing models (#23): safetensors + JSON files, scvi-hub, ``from_pretrained`` and checksummed downloads.

Downloads come from an HTTP server on 127.0.0.1 that the tests start (port 0) and that serves files
the tests make: nothing reaches the internet.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

from scvi_cellplm import CellPLM, CellPLMAnnotator, CheckpointError, InputDataError
from scvi_cellplm.io import PRETRAINED
from scvi_cellplm.model import _saving

needs_hub = pytest.mark.skipif(
    importlib.util.find_spec("huggingface_hub") is None,
    reason="scvi.hub needs huggingface_hub (pip install 'scvi-cellplm[hub]'; the test extra has it)",
)


# ---------------------------------------------------------------- fixtures
def _ensembl(adata, n_genes: int):
    """The first ``n_genes`` genes of ``adata`` that have an Ensembl id (some of the demo's have none)."""
    ids = adata.var["gene_ids"].astype(str)
    return adata[:, np.flatnonzero(ids.str.startswith("ENS").to_numpy())[:n_genes]].copy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pancreas_session):
    """A tiny CellPLM saved with its AnnData (gene symbols as var_names), and its embedding."""
    adata = pancreas_session[::8, :150].copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    model = CellPLM(adata, **TINY)
    folder = tmp_path_factory.mktemp("saved") / "tiny_model"
    model.save(folder, save_anndata=True)
    return folder, model, model.get_latent_representation()


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _archive(folder: Path, out: Path, kind: str = "zip") -> Path:
    """``folder`` (with the folder itself as the top entry) as a .zip or .tar.gz."""
    fmt = {"zip": "zip", "tar.gz": "gztar"}[kind]
    return Path(shutil.make_archive(str(out), fmt, root_dir=folder.parent, base_dir=folder.name))


class _Server:
    """Files over HTTP on 127.0.0.1, with request counts; ``truncated`` paths announce more than they send."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()
        self.requests: collections.Counter = collections.Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests[name] += 1
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) + (4096 if name in server.truncated else 0)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if name in server.truncated else data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def serve(self, name: str, path_or_bytes, truncated: bool = False) -> str:
        data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        self.files[name] = data
        if truncated:
            self.truncated.add(name)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty download cache (``CELLPLM_CACHE``), so no test reads the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CELLPLM_CACHE", str(folder))
    return folder


def _adata_like(model):
    """A copy of the model's AnnData, set up again (another object than the model's)."""
    adata = model.adata.copy()
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    return adata


# ---------------------------------------------------------------- the saved format
def test_save_writes_safetensors_and_json_metadata_only(saved):
    folder, model, _ = saved
    assert sorted(os.listdir(folder)) == ["adata.h5ad", "metadata.json", "model.safetensors"]
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["class"] == "CellPLM" and metadata["gene_vocabulary"] == list(model.gene_vocabulary)
    import safetensors

    with safetensors.safe_open(folder / "model.safetensors", framework="pt") as fh:
        assert fh.metadata()["weights_id"] == metadata["weights_id"]
        assert set(fh.keys()) == set(model.module.state_dict())
    assert oct(os.stat(folder / "model.safetensors").st_mode & 0o044) == oct(0o044 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_load_registry_reads_the_json_without_torch_load(saved, monkeypatch):
    folder, _, _ = saved

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    assert CellPLM.load_registry(folder)["setup_args"]["batch_key"] == "batch"


def test_shared_and_non_contiguous_tensors_are_written_and_read_back(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "tied": base, "row": base[1], "t": base.T, "empty": torch.zeros(0), "n": torch.tensor(3)}
    _saving.write_weights(state, str(tmp_path / "w.safetensors"), {"weights_id": "x"})
    back = _saving.read_weights(str(tmp_path / "w.safetensors"), "x")
    assert set(back) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(back[name], value)
    with pytest.raises(CheckpointError, match="different saves"):
        _saving.read_weights(str(tmp_path / "w.safetensors"), "y")


def test_weights_without_metadata_are_an_incomplete_save(saved, tmp_path):
    folder, model, _ = saved
    (tmp_path / "m").mkdir()
    shutil.copy(folder / "model.safetensors", tmp_path / "m")
    with pytest.raises(CheckpointError, match="no metadata.json"):
        CellPLM.load(tmp_path / "m", adata=_adata_like(model))
    with pytest.raises(CheckpointError, match="No saved model"):
        CellPLM.load(tmp_path, adata=_adata_like(model))


# ---------------------------------------------------------------- from_pretrained: local sources
def test_from_pretrained_loads_a_saved_folder(saved):
    folder, _, latent = saved
    model = CellPLM.from_pretrained(folder)
    np.testing.assert_array_equal(model.get_latent_representation(), latent)
    model = CellPLM.from_pretrained(str(folder.parent))  # a folder holding one saved model
    np.testing.assert_array_equal(model.get_latent_representation(), latent)


def test_from_pretrained_loads_an_official_prefix(tmp_path, pancreas):
    oracle = pytest.importorskip("official_oracle", reason="the official `cellplm` package is not installed")
    adata = _ensembl(pancreas[::10], 200)
    adata.var_names = adata.var["gene_ids"].astype(str).to_numpy()
    config = oracle.small_config(list(adata.var_names), latent_mod="vae")
    prefix = oracle.save_official(oracle.build_official(config), config, str(tmp_path), "small")
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch")
    expected = CellPLM.from_official(prefix, adata).get_latent_representation()
    for source in (prefix, tmp_path):  # the prefix, and a folder holding one pair
        model = CellPLM.from_pretrained(source, adata)
        assert model.is_trained_
        np.testing.assert_array_equal(model.get_latent_representation(), expected)
    with pytest.raises(InputDataError, match="Pass `adata`"):
        CellPLM.from_pretrained(prefix)


def test_unknown_source_names_what_it_accepts(tmp_path):
    with pytest.raises(CheckpointError, match="20231027_85M") as info:
        CellPLM.from_pretrained(tmp_path / "nothing")
    assert "official checkpoint prefix" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no model"):
        CellPLM.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------- from_pretrained: the registry
def test_registry_lists_the_official_checkpoints_with_source_page_and_no_checksum():
    for name, latent in (("20230926_85M", "gmvae"), ("20231027_85M", "vae")):
        entry = PRETRAINED[name]
        assert entry["source_page"] == "https://github.com/OmicsML/CellPLM"
        assert set(entry["files"]) == {f"{name}.config.json", f"{name}.best.ckpt"}
        assert entry["sha256"] is None and entry["latent"] == latent


def test_registry_name_without_checksum_says_how_to_get_it(saved, server, cache):
    _, model, _ = saved
    with pytest.raises(CheckpointError) as info:
        CellPLM.from_pretrained("20231027_85M", _adata_like(model))
    message = str(info.value)
    for words in ("not known", "by hand", "https://github.com/OmicsML/CellPLM", "20231027_85M.best.ckpt",
                  "local prefix", "url=", "sha256="):
        assert words in message
    assert not cache.exists() and not server.requests


def _official_pairs(adata, folder: Path) -> dict[str, np.ndarray]:
    """Two official pairs (to_official of tiny models) in ``folder``; their embeddings of ``adata``."""
    out = {}
    for name, seed in (("20230926_85M", 0), ("20231027_85M", 1)):
        torch.manual_seed(seed)
        model = CellPLM(adata, **TINY, input_target_sum=None)  # the official embedder reads raw counts
        model.to_official(str(folder / name))
        out[name] = CellPLM.from_official(str(folder / name), adata).get_latent_representation()
    return out


def test_registry_name_with_url_and_sha256_picks_its_pair_from_the_archive(saved, server, cache, tmp_path):
    _, model, _ = saved
    adata = _adata_like(model)
    expected = _official_pairs(adata, tmp_path / "ckpt")
    archive = _archive(tmp_path / "ckpt", tmp_path / "both")
    url = server.serve("ckpt.zip", archive)
    loaded = CellPLM.from_pretrained("20231027_85M", adata, url=url, sha256=_sha256(archive))
    np.testing.assert_array_equal(loaded.get_latent_representation(), expected["20231027_85M"])


def test_registry_entry_with_addresses_and_checksums_downloads_the_pair_once(saved, server, cache, tmp_path,
                                                                            monkeypatch):
    _, model, _ = saved
    adata = _adata_like(model)
    expected = _official_pairs(adata, tmp_path / "ckpt")["20231027_85M"]
    files = {f"20231027_85M{suffix}": tmp_path / "ckpt" / f"20231027_85M{suffix}"
             for suffix in (".config.json", ".best.ckpt")}
    entry = {"source_page": "http://127.0.0.1/", "latent": "vae", "description": "test",
             "files": {name: server.serve(name, path) for name, path in files.items()},
             "sha256": {name: _sha256(path) for name, path in files.items()}}
    monkeypatch.setitem(PRETRAINED, "my_model", entry)
    for _ in range(2):
        loaded = CellPLM.from_pretrained("my_model", adata)
        np.testing.assert_array_equal(loaded.get_latent_representation(), expected)
    assert dict(server.requests) == dict.fromkeys(files, 1)


# ---------------------------------------------------------------- from_pretrained: URLs
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_url_of_an_archive_downloads_once_verifies_and_loads(saved, server, cache, tmp_path, kind):
    folder, model, latent = saved
    archive = _archive(folder, tmp_path / "tiny_model", kind)
    url = server.serve(f"models/tiny_model.{kind}", archive)
    for _ in range(2):  # the second call reads the cache: no request
        loaded = CellPLM.from_pretrained(url, _adata_like(model), sha256=_sha256(archive))
        np.testing.assert_array_equal(loaded.get_latent_representation(), latent)
    assert server.requests[f"models/tiny_model.{kind}"] == 1
    assert any(cache.rglob("metadata.json"))


def test_default_cache_is_the_user_cache_unless_the_environment_names_one(monkeypatch, tmp_path):
    import pooch

    from scvi_cellplm.io import cache_folder

    monkeypatch.delenv("CELLPLM_CACHE", raising=False)
    assert cache_folder() == Path(pooch.os_cache("scvi-cellplm"))
    monkeypatch.setenv("CELLPLM_CACHE", str(tmp_path))
    assert cache_folder() == tmp_path
    assert cache_folder(tmp_path / "x") == tmp_path / "x"


def test_cache_dir_argument_overrides_the_environment(saved, server, cache, tmp_path):
    folder, model, latent = saved
    archive = _archive(folder, tmp_path / "tiny_model")
    url = server.serve("m.zip", archive)
    CellPLM.from_pretrained(url, _adata_like(model), sha256=_sha256(archive), cache_dir=tmp_path / "mine")
    assert any((tmp_path / "mine").rglob("model.safetensors")) and not cache.exists()


def test_wrong_checksum_is_refused_naming_both_and_nothing_is_kept(saved, server, cache, tmp_path):
    folder, model, _ = saved
    archive = _archive(folder, tmp_path / "tiny_model")
    url = server.serve("m.zip", archive)
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match="Checksum mismatch") as info:
        CellPLM.from_pretrained(url, _adata_like(model), sha256=wrong)
    assert wrong in str(info.value) and _sha256(archive) in str(info.value)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_truncated_transfer_is_a_checkpoint_error_and_nothing_is_kept(saved, server, cache, tmp_path):
    folder, model, _ = saved
    archive = _archive(folder, tmp_path / "tiny_model")
    url = server.serve("m.zip", archive, truncated=True)
    with pytest.raises(CheckpointError, match="cut short|Checksum mismatch"):
        CellPLM.from_pretrained(url, _adata_like(model), sha256=_sha256(archive))
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_server_down_is_an_offline_checkpoint_error(saved, cache):
    _, model, _ = saved
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(CheckpointError, match="Could not download .*offline"):
        CellPLM.from_pretrained(f"http://127.0.0.1:{port}/m.zip", _adata_like(model), sha256="a" * 64)


def test_missing_file_on_the_server_names_the_status(saved, server, cache):
    _, model, _ = saved
    with pytest.raises(CheckpointError, match="answered 404"):
        CellPLM.from_pretrained(server.serve("x", b"") + "-absent.zip", _adata_like(model), sha256="a" * 64)


def test_url_without_checksum_is_refused_before_any_request(saved, server, cache):
    _, model, _ = saved
    url = server.serve("m.zip", b"anything")
    with pytest.raises(CheckpointError, match="sha256 checksum .* is required"):
        CellPLM.from_pretrained(url, _adata_like(model))
    with pytest.raises(CheckpointError, match="not a sha256 checksum"):
        CellPLM.from_pretrained(url, _adata_like(model), sha256="abc")
    assert not server.requests


def test_archive_escaping_its_folder_is_refused(saved, server, cache, tmp_path):
    _, model, _ = saved
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../../evil.txt", "x")
    url = server.serve("evil.zip", tmp_path / "evil.zip")
    with pytest.raises(CheckpointError, match="Refusing to unpack"):
        CellPLM.from_pretrained(url, _adata_like(model), sha256=_sha256(tmp_path / "evil.zip"))


def test_a_download_that_is_not_an_archive_is_refused(saved, server, cache, tmp_path):
    _, model, _ = saved
    url = server.serve("weights.bin", b"not an archive")
    with pytest.raises(CheckpointError, match="not a .zip or tar archive"):
        CellPLM.from_pretrained(url, _adata_like(model), sha256=hashlib.sha256(b"not an archive").hexdigest())


# ---------------------------------------------------------------- scvi-hub
def _card_helper():
    from scvi_cellplm.model._hub import identifier_type

    return identifier_type


def test_identifier_type_of_a_vocabulary():
    identifier_type = _card_helper()
    assert identifier_type(["ENSG00000175899", "ENSMUSG00000030359"]) == "Ensembl gene ids"
    assert identifier_type(["A2M", "ACTB"]) == "gene symbols"
    assert identifier_type(["ENSG00000175899", "ACTB"]).startswith("mixed (50%")


def test_model_card_describes_the_model(pancreas_session):
    adata = _ensembl(pancreas_session[::8], 150)
    CellPLM.setup_anndata(adata, layer="counts", batch_key="batch", gene_id_key="gene_ids")
    model = CellPLM(adata, **TINY)
    card = model.model_card("cc-by-4.0", metrics={"ARI": 0.712345, "NMI": 0.5},
                            training_data="Baron et al. pancreas (demo subset).")
    for words in ("license: cc-by-4.0", "library_name: scvi-tools", "model_cls_name:CellPLM",
                  "150 genes, Ensembl gene ids", "| preset | custom |", f"| cells | {adata.n_obs:,} |",
                  "| ARI | 0.7123 |", "Baron et al. pancreas", "Wen, H.", "ICLR", "@inproceedings{Wen2024",
                  '"gene_id_key": "gene_ids"'):
        assert words in card, words
    small = CellPLM(adata)  # the defaults are the small preset
    assert "| preset | small |" in small.model_card("mit")


@needs_hub
def test_to_hub_folder_round_trips_through_scvi_hub(saved, tmp_path):
    from scvi.hub import HubModel

    _, model, latent = saved
    hub = model.to_hub(tmp_path / "hub", license_info="cc-by-4.0", metrics={"ARI": 0.5})
    assert isinstance(hub, HubModel)
    assert sorted(os.listdir(tmp_path / "hub")) == ["README.md", "_scvi_required_metadata.json", "adata.h5ad",
                                                    "metadata.json", "model.safetensors"]
    again = HubModel(str(tmp_path / "hub"))  # metadata and card read back from the folder
    assert again.metadata.model_cls_name == "CellPLM"
    assert again.metadata.model_parent_module == "scvi_cellplm"
    assert again.model_card.data.license == "cc-by-4.0"
    assert "model_cls_name:CellPLM" in again.model_card.data.tags
    again.load_model()  # no adata: the folder's adata.h5ad
    assert isinstance(again.model, CellPLM)
    np.testing.assert_array_equal(again.model.get_latent_representation(), latent)
    assert "files" in CellPLM.from_pretrained(tmp_path / "hub").model_card("mit")


@needs_hub
def test_hub_model_built_by_hand_on_a_plain_save_loads_with_adata(saved, tmp_path):
    """The scvi-hub local API on a folder written by plain ``save`` (no AnnData saved)."""
    import anndata
    import scvi
    from huggingface_hub import ModelCard
    from scvi.hub import HubMetadata, HubModel

    _, model, latent = saved
    model.save(tmp_path / "plain")
    metadata = HubMetadata(scvi_version=scvi.__version__, anndata_version=anndata.__version__,
                           model_cls_name="CellPLM", model_parent_module="scvi_cellplm")
    card = ModelCard(model.model_card("mit"))
    hub = HubModel(str(tmp_path / "plain"), metadata=metadata, model_card=card)
    hub.save()
    hub = HubModel(str(tmp_path / "plain"))
    hub.load_model(adata=_adata_like(model))
    np.testing.assert_array_equal(hub.model.get_latent_representation(), latent)


@needs_hub
def test_an_annotator_loads_through_scvi_hub(saved, tmp_path):
    from scvi.hub import HubModel

    _, model, _ = saved
    annotator = CellPLMAnnotator.from_cellplm_model(model, labels_key="cell_type", adata=_adata_like(model),
                                                    n_head_hidden=8)
    annotator.to_hub(tmp_path / "ann", license_info="other")
    hub = HubModel(str(tmp_path / "ann"))
    hub.load_model()
    assert isinstance(hub.model, CellPLMAnnotator)
    np.testing.assert_array_equal(hub.model.predict(soft=True).to_numpy(), annotator.predict(soft=True).to_numpy())


def test_to_hub_without_huggingface_hub_says_what_to_install_and_writes_nothing(saved, tmp_path, monkeypatch):
    _, model, _ = saved
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ImportError, match=r"scvi-cellplm\[hub\]"):
        model.to_hub(tmp_path / "hub", license_info="mit")
    assert not (tmp_path / "hub").exists()
