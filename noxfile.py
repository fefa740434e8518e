"""Developer sessions. Install with pip into venvs (uv would pull a multi-GB CUDA torch).

    nox -s tests         default suite            nox -s tests_slow    heavy tests (-m slow)
    nox -s tests_latest  newest allowed deps       nox -s lint          ruff
    nox -s docs          sphinx, tutorials run     nox -s demo          the quick-start demo
    nox -s bench         benchmarks (needs ../shared/data; CPU)
    nox -s gpu           on a CUDA machine: tests marked gpu, then benchmarks/gpu_table.py (Table 1)

`nox -s gpu` needs a CUDA build of torch: TORCH_SPEC (pip arguments, default the CPU pin below)
chooses it, e.g. TORCH_SPEC="--index-url https://download.pytorch.org/whl/cu128 torch==2.13.0".
"""

from __future__ import annotations

import os
import shlex
import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
ORACLE = "cellplm==0.1.0.post2"


def _install(session: nox.Session, extras: str = "test", upgrade: bool = False, torch: str = TORCH) -> None:
    session.install(*shlex.split(torch))
    args = ["--upgrade", "--upgrade-strategy", "eager"] if upgrade else []
    session.install(*args, "-e", f".[{extras}]")
    session.install("--no-deps", ORACLE)


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite (what CI runs)."""
    _install(session)
    session.run("pytest", *session.posargs)


@nox.session
def tests_slow(session: nox.Session) -> None:
    """Heavy tests marked ``slow``."""
    _install(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def tests_latest(session: nox.Session) -> None:
    """The suite against the newest versions our bounds allow."""
    _install(session, upgrade=True)
    session.run("pip", "list")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py", "dev.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs with warnings as errors; executes the tutorials."""
    _install(session, extras="docs")
    # from scratch: an incremental build does not repeat the warnings of unchanged pages
    for stale in ("docs/_build", "docs/generated"):
        shutil.rmtree(stale, ignore_errors=True)
    session.run("sphinx-build", "-M", "html", "docs", "docs/_build", "-W", "--keep-going")


@nox.session
def demo(session: nox.Session) -> None:
    _install(session)
    session.run("cellplm", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks on ../shared/data (CPU); prints tables of ratios against baselines."""
    _install(session, extras="test,bench")
    for script in (
        "benchmarks/embedding_speed.py",
        "benchmarks/pretrain_memory.py",
        "benchmarks/streaming_inference.py",
        "benchmarks/downstream.py",
        "benchmarks/quality.py",
    ):
        session.run("python", script, *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """On a CUDA machine: the tests marked ``gpu`` (CUDA parity, CPU/CUDA agreement, bf16, training,
    pretraining, host<->device copies per step), then the Table 1 benchmark into ``gpu.json``.

    TORCH_SPEC: pip arguments for a CUDA torch (default: the CPU pin, which fails the CUDA check).
    Arguments after ``--`` go to ``benchmarks/gpu_table.py`` (e.g. ``-- --sizes 48082``).
    CELLPLM_GPU_TESTS_DEVICE=cpu: a dry run of the whole session on the CPU (tests on the CPU,
    ``gpu_table.py --device cpu --quick``); it measures nothing about GPUs.
    """
    _install(session, torch=os.environ.get("TORCH_SPEC", TORCH))
    device = os.environ.get("CELLPLM_GPU_TESTS_DEVICE", "cuda")
    if device.startswith("cuda"):
        session.run("python", "-c", "import torch; assert torch.cuda.is_available(), "
                    "'no CUDA device visible to torch: set TORCH_SPEC to a CUDA build of torch'; "
                    "print(torch.__version__, torch.cuda.get_device_name())")
        bench = ["--device", device, "--json", "gpu.json"]
    else:
        bench = ["--device", "cpu", "--quick", "--json", os.path.join(session.create_tmp(), "gpu_dry_run.json")]
    session.run("pytest", "-m", "gpu", "-rA", "-p", "no:cacheprovider")
    session.run("python", "benchmarks/gpu_table.py", *bench, *session.posargs)
