#!/usr/bin/env python3
"""Run a project task in a local virtual environment, creating it on first use.

    python3 dev.py demo [cellplm demo options]   # pretrain → embed → cluster → plots + .h5ad
    python3 dev.py test [pytest options]         # the test suite (what CI runs)

Needs nothing but Python >= 3.11 (standard library only). The environment lives in ``.venv``; it
is rebuilt when ``pyproject.toml`` changes. Torch is installed first with an exact pin (the CPU
build on Linux/PyPI setups that provide it), then the package with its test extras, then the
official ``cellplm`` package without dependencies (the reference oracle of the parity tests).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
PYTHON = BIN / ("python.exe" if sys.platform == "win32" else "python")
TORCH = "torch==2.13.0"
ORACLE = "cellplm==0.1.0.post2"


def _run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def ensure_environment() -> None:
    """Create ``.venv`` and install the project unless it is up to date."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{digest}"
    if stamp.exists():
        return
    if sys.version_info < (3, 11):  # noqa: UP036  (dev.py runs on any python3)
        sys.exit(f"Python >= 3.11 is required, this is {sys.version.split()[0]}.")
    if not PYTHON.exists():
        print(f"Creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(*pip, TORCH)
    _run(*pip, "-e", ".[test]")
    _run(*pip, "--no-deps", ORACLE)
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()


TASKS = {
    "demo": [str(BIN / "cellplm"), "demo"],
    "test": [str(PYTHON), "-m", "pytest"],
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(__doc__)
        return 2
    ensure_environment()
    command = TASKS[sys.argv[1]] + sys.argv[2:]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
