"""Checksummed downloads into a user cache (pooch), with errors that say what went wrong.

A file is downloaded once: it is kept under the cache folder with its checksum in its name, and a
later call with the same checksum finds it there without touching the network. A download is
written to a temporary file, verified, and only then moved into place; a wrong checksum, a
truncated transfer or an unreachable server raise :class:`~scvi_cellplm.CheckpointError`.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from .._constants import CACHE_ENV
from .._exceptions import CheckpointError

URL_SCHEMES = ("http", "https", "ftp")
TIMEOUT = 60
"""Seconds without an answer from the server before a download fails."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_url(source) -> bool:
    """Whether ``source`` is a download address (http, https or ftp)."""
    return isinstance(source, str) and urlparse(source).scheme.lower() in URL_SCHEMES


def cache_folder(cache_dir=None) -> Path:
    """Return the folder downloads are kept in.

    ``cache_dir`` if given, else the environment variable ``CELLPLM_CACHE``, else the user cache
    (``pooch.os_cache("scvi-cellplm")``, e.g. ``~/.cache/scvi-cellplm`` on Linux).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import pooch

    return Path(pooch.os_cache("scvi-cellplm"))


def check_sha256(sha256, what: str = "the download") -> str:
    """Return ``sha256`` as 64 lower-case hex digits (an optional ``sha256:`` prefix removed), or raise."""
    if not isinstance(sha256, str):
        raise CheckpointError(f"A sha256 checksum of {what} is required (pass `sha256=`): downloads are "
                              "verified. Compute it with `sha256sum FILE`, or download the file by hand and "
                              "pass its local path.")
    value = sha256.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(value):
        raise CheckpointError(f"{sha256!r:.80} is not a sha256 checksum (64 hexadecimal digits).")
    return value


def _file_name(url: str) -> str:
    name = PurePosixPath(urlparse(url).path).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "download"


def download(url: str, sha256: str, cache_dir=None, *, fname: str | None = None,
             subfolder: str | None = None) -> Path:
    """Download ``url`` into the cache once, verify its sha256 and return the local file.

    Parameters
    ----------
    url
        Address of the file (http, https or ftp).
    sha256
        Its expected sha256 checksum.
    cache_dir
        Cache folder (see :func:`cache_folder`).
    fname
        File name in the cache (default: the checksum's first 16 digits and the URL's file name).
    subfolder
        Folder inside the cache.

    Returns
    -------
    The path of the verified file.
    """
    import pooch

    sha256 = check_sha256(sha256, url)
    folder = cache_folder(cache_dir) / (subfolder or "downloads")
    fname = fname or f"{sha256[:16]}-{_file_name(url)}"
    seen: dict[str, str] = {}
    http = pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=TIMEOUT)

    def downloader(url, output_file, pup, check_only=False):
        result = http(url, output_file, pup, check_only=check_only)
        if not check_only:
            seen["sha256"] = pooch.file_hash(str(output_file), alg="sha256")
        return result

    try:
        return Path(pooch.retrieve(url, known_hash=f"sha256:{sha256}", fname=fname, path=folder,
                                   downloader=downloader if urlparse(url).scheme.startswith("http") else None))
    except Exception as err:
        translated = _download_error(err, url, sha256, seen.get("sha256"), folder)
        if translated is None:
            raise
        raise translated from err


def _download_error(err: Exception, url: str, expected: str, actual: str | None, folder: Path):
    """Return a :class:`CheckpointError` saying what went wrong with a download (``None``: not one)."""
    import requests

    if isinstance(err, ValueError) and "hash" in str(err).lower():
        return CheckpointError(
            f"Checksum mismatch for {url}: expected sha256 {expected}, got {actual or 'another'}. The download "
            "was deleted. The file on the server is not the one the checksum names (changed, or a wrong "
            "URL or checksum).")
    if isinstance(err, requests.exceptions.HTTPError):
        status = err.response.status_code if err.response is not None else "an error"
        return CheckpointError(f"Could not download {url}: the server answered {status}.")
    if isinstance(err, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError):
        return CheckpointError(f"The download of {url} was cut short (truncated transfer); nothing was "
                               f"kept. Try again. ({err})")
    if isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return CheckpointError(
            f"Could not download {url}: no connection (offline, or the server is down). Download it by "
            f"hand and pass the local path. ({err})")
    if isinstance(err, requests.exceptions.RequestException):
        return CheckpointError(f"Could not download {url}: {err}")
    if isinstance(err, OSError):
        return CheckpointError(f"Could not write the download of {url} into {folder}: {err}. Pass "
                               f"`cache_dir=` or set {CACHE_ENV} to a writable folder.")
    return None


def _archive_kind(path: Path) -> str | None:
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    return None


def _check_member(name: str, path: Path) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CheckpointError(f"Refusing to unpack {path}: it holds the path {name!r:.100}, outside its folder.")


def unpack(path: Path) -> Path:
    """Unpack a ``.zip`` or tar archive next to itself (once) and return the folder.

    The archive is unpacked into a temporary folder that is renamed when complete, so an
    interrupted unpacking is never mistaken for a complete one. Members with absolute paths or
    ``..``, and (tar) links and device files, are refused.
    """
    import pooch

    kind = _archive_kind(path)
    if kind is None:
        raise CheckpointError(f"{path} is not a .zip or tar archive: a download must be an archive of a folder "
                              "written by `save`, or of an official checkpoint pair.")
    target = path.with_name(path.name + (".unzip" if kind == "zip" else ".untar"))
    if target.is_dir():  # names are content-addressed: the same archive, already unpacked
        return target
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                _check_member(name, path)
    else:
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                _check_member(member.name, path)
                if not (member.isfile() or member.isdir()):
                    raise CheckpointError(f"Refusing to unpack {path}: {member.name!r:.100} is a link or "
                                          "special file.")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        processor = (pooch.Unzip if kind == "zip" else pooch.Untar)(extract_dir=tmp.name)
        processor(str(path), "download", None)
        os.replace(tmp, target)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        if target.is_dir():  # unpacked meanwhile by another process
            return target
        raise CheckpointError(f"{path} is a damaged archive and cannot be unpacked: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
