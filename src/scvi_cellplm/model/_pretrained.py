"""``from_pretrained``: one entry point for saved folders, official checkpoints, URLs and known names."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from anndata import AnnData

from .._exceptions import CheckpointError, InputDataError
from ..io._download import check_sha256, download, is_url, unpack
from ..io._official import CONFIG_SUFFIX, WEIGHTS_SUFFIX
from ..io._registry import PRETRAINED
from ._saving import has_saved_model

logger = logging.getLogger(__name__)

MAX_DEPTH = 3
"""How deep a downloaded archive (or a local folder) is searched for a saved model or official pair."""


class PretrainedMixin:
    """``from_pretrained``: load a model from a folder, an official pair, a URL or a known name."""

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        adata: AnnData | None = None,
        *,
        sha256: str | None = None,
        url: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        **kwargs,
    ):
        """Load a pretrained model from a local folder, an official checkpoint, a URL or a known name.

        ``source`` is, in this order:

        1. a folder written by :meth:`save` (also a scvi-hub folder; ``model.pt`` of earlier
           versions too) → :meth:`load`;
        2. an official checkpoint prefix: ``PREFIX.config.json`` and ``PREFIX.best.ckpt`` exist →
           :meth:`from_official` (a folder holding exactly one such pair works too);
        3. a URL (http, https, ftp) of a ``.zip`` or tar archive of either, with its ``sha256``:
           downloaded once into the cache, verified, unpacked and loaded as above;
        4. a name of :data:`scvi_cellplm.io.PRETRAINED` (e.g. ``"20231027_85M"``): downloaded when
           the registry knows its addresses and checksums. For the official checkpoints it knows
           neither: download the pair by hand from the source page and pass its local prefix, or
           pass ``url=`` (an archive of the pair) and ``sha256=``.

        Downloads go through pooch into ``cache_dir``, else the folder named by the environment
        variable ``CELLPLM_CACHE``, else the user cache (``pooch.os_cache("scvi-cellplm")``).

        Parameters
        ----------
        source
            Folder, checkpoint prefix, URL or registry name.
        adata
            AnnData registered with :meth:`setup_anndata` (raw counts; any genes, matched to the
            model's vocabulary by identifier). Required for official checkpoints; for a saved
            folder, ``None`` loads its saved AnnData.
        sha256
            Checksum of the download (URLs; a registry name with ``url``).
        url
            Download address of an archive of the model named by ``source`` (when the registry
            has none).
        cache_dir
            Folder for downloads (overrides ``CELLPLM_CACHE``).
        **kwargs
            Passed to :meth:`load` (e.g. ``accelerator``, ``max_cells_per_batch``) or to
            :meth:`from_official` (keyword arguments of the model).

        Returns
        -------
        The loaded model.

        Raises
        ------
        ~scvi_cellplm.CheckpointError
            Nothing loadable at ``source``, a download that failed (offline, server down,
            truncated transfer) or does not match its checksum, a registry name without a known
            checksum, or a damaged or mismatching model.
        """
        kind, path = _resolve(source, sha256, url, cache_dir)
        if kind == "saved":
            logger.info("Loading the model saved in %s.", path)
            return cls.load(str(path), adata, **kwargs)
        if adata is None:
            raise InputDataError(f"Pass `adata`: {source} is an official checkpoint, which holds no data to "
                                 f"attach the model to (set it up with `{cls.__name__}.setup_anndata`).")
        return cls.from_official(str(path), adata, **kwargs)


def _resolve(source, sha256, url, cache_dir) -> tuple[str, Path]:
    """Return ``("saved", folder)`` or ``("official", prefix)`` for a ``from_pretrained`` source."""
    if not isinstance(source, str | os.PathLike):
        raise CheckpointError(f"`source` must be a folder, a checkpoint prefix, a URL or a model name, "
                              f"got {type(source).__name__}.")
    name = os.fspath(source)
    entry = PRETRAINED.get(name)
    if url is not None:
        if not is_url(url):
            raise CheckpointError(f"`url` must be an http(s) or ftp address, got {url!r:.100}.")
        return _from_archive(url, sha256, cache_dir, _pair_name(entry))
    if is_url(name):
        return _from_archive(name, sha256, cache_dir, None)
    path = Path(name).expanduser()
    if path.is_dir():
        found = _find(path, None, depth=1)
        if found is None:
            raise CheckpointError(f"{path} holds no model: neither a folder written by `save` (metadata.json + "
                                  "model.safetensors, or model.pt) nor one official pair (PREFIX.config.json "
                                  "+ PREFIX.best.ckpt).")
        return found
    if _is_pair(str(path)):
        return "official", path
    if entry is not None:
        return _from_registry(name, entry, cache_dir)
    raise CheckpointError(
        f"{name!r:.200} is not a folder written by `save`, an official checkpoint prefix (PREFIX.config.json + "
        f"PREFIX.best.ckpt), a URL, or a known model name ({', '.join(sorted(PRETRAINED))}).")


def _is_pair(prefix: str) -> bool:
    return os.path.isfile(prefix + CONFIG_SUFFIX) and os.path.isfile(prefix + WEIGHTS_SUFFIX)


def _pair_name(entry: dict | None) -> str | None:
    """Prefix of the official pair a registry entry names, if it is one."""
    if entry is None:
        return None
    for file in entry["files"]:
        if file.endswith(CONFIG_SUFFIX):
            return file[: -len(CONFIG_SUFFIX)]
    return None


def _find(folder: Path, pair: str | None, depth: int = MAX_DEPTH) -> tuple[str, Path] | None:
    """Find one saved model or official pair (``pair``: that one) in ``folder``, ``depth`` levels deep.

    ``folder`` itself, when it is a saved model, is the answer. Hidden files and folders (and the
    ``__MACOSX`` folder of archives made on a Mac) are not looked at.
    """
    if pair is None and has_saved_model(folder):
        return "saved", folder
    saved, pairs = [], []
    for root, dirs, files in os.walk(folder):
        if len(Path(root).relative_to(folder).parts) >= depth:
            dirs.clear()
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__MACOSX")))
        if has_saved_model(root):
            saved.append(Path(root))
        pairs += [Path(root) / f[: -len(CONFIG_SUFFIX)] for f in sorted(files)
                  if f.endswith(CONFIG_SUFFIX) and not f.startswith(".")
                  and _is_pair(os.path.join(root, f[: -len(CONFIG_SUFFIX)]))]
    if pair is not None:
        pairs = [p for p in pairs if p.name == pair]
        saved = [] if pairs else saved
    if len(saved) + len(pairs) > 1:
        found = [str(p) for p in saved + pairs]
        raise CheckpointError(f"{folder} holds several models ({found[:5]}): pass the one to load.")
    if saved:
        return "saved", saved[0]
    if pairs:
        return "official", pairs[0]
    return None


def _from_archive(url: str, sha256, cache_dir, pair: str | None) -> tuple[str, Path]:
    folder = unpack(download(url, check_sha256(sha256, url), cache_dir))
    found = _find(folder, pair)
    if found is None:
        raise CheckpointError(f"The archive at {url} holds no model: neither a folder written by `save` nor "
                              f"an official pair{f' {pair}' if pair else ''} (unpacked into {folder}).")
    return found


def _from_registry(name: str, entry: dict, cache_dir) -> tuple[str, Path]:
    files, hashes = entry["files"], entry.get("sha256") or {}
    if not all(files.values()) or not all(hashes.get(f) for f in files):
        unknown = "addresses and checksums" if not any(files.values()) else "checksums"
        raise CheckpointError(
            f"The {unknown} of {name!r} are not known, so it cannot be downloaded and verified. Download "
            f"{' and '.join(files)} by hand from {entry['source_page']} and pass the local prefix, e.g. "
            f"`from_pretrained('ckpt/{name}', adata)`; or pass `url=` (an archive of the files) and `sha256=`.")
    weights = next((f for f in files if f.endswith(WEIGHTS_SUFFIX)), next(iter(files)))
    subfolder = f"{name}-{check_sha256(hashes[weights], weights)[:16]}"
    paths = [download(files[f], hashes[f], cache_dir, fname=f, subfolder=subfolder) for f in files]
    pair = _pair_name(entry)
    if pair is not None:
        return "official", paths[0].parent / pair
    found = _find(paths[0].parent, None, depth=1)
    if found is None:
        raise CheckpointError(f"The files of {name!r} ({list(files)}) are not a model this package reads.")
    return found
