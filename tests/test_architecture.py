"""The package's shape: layers import only downwards, no import circle, small files.

Read with ``docs/user_guide/architecture.md``. Imports are found statically (every ``import`` and
``from ... import`` statement, module level or inside functions), so a deferred import cannot hide
a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "scvi_cellplm"

LAYERS = {
    # unit -> the units it may import (besides itself); a unit is a subpackage or a top module
    "_constants": set(),
    "_exceptions": set(),
    "_presets": set(),
    "io": {"_constants", "_exceptions"},
    "module": {"_constants", "_exceptions"},
    "datasets": {"_constants", "_exceptions"},
    "data": {"_constants", "_exceptions", "io"},
    "train": {"_constants", "_exceptions", "module"},
    "model": {"_constants", "_exceptions", "_presets", "io", "module", "data", "train"},
    "evaluation": {"_constants", "_exceptions"},
    "spatial": {"_constants", "_exceptions", "data", "model"},
    "pretrain": {"_constants", "_exceptions", "_presets", "io", "data", "train", "model"},
    "_demo": {"_constants", "_exceptions", "evaluation", "datasets", "model", "__init__"},
    "cli": {"_constants", "_exceptions", "_demo", "model", "pretrain", "__init__"},
    "__init__": {"_constants", "_exceptions", "_presets"},  # the rest is imported lazily (PEP 562)
}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: Path) -> set[str]:
    """Units of the package that ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(SRC).parent.parts
    units = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "scvi_cellplm":
                    continue
                target = parts[1:]
            else:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            if not target:  # `from . import x` at the top: x is a unit, or a name of __init__
                units.update(a.name if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()
                             else "__init__" for a in node.names)
            else:
                units.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "scvi_cellplm":
                    units.add(parts[1] if len(parts) > 1 else "__init__")
    return units


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(_imported_units(path) - {unit})
    return graph


def test_every_unit_has_a_layer():
    assert set(_graph()) <= set(LAYERS), set(_graph()) - set(LAYERS)


@pytest.mark.parametrize("unit", sorted(LAYERS))
def test_imports_go_down_the_layers(unit):
    graph = _graph()
    if unit not in graph:
        pytest.skip(f"{unit} does not exist")
    assert graph[unit] <= LAYERS[unit], f"{unit} imports {sorted(graph[unit] - LAYERS[unit])}"


def test_no_import_circle_between_units():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = 1
        for nxt in graph.get(unit, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, unit, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, unit])
        state[unit] = 2

    for unit in graph:
        if unit not in state:
            visit(unit, [])


def test_the_pure_torch_module_never_touches_anndata():
    for path in (SRC / "module").rglob("*.py"):
        text = path.read_text()
        for name in ("anndata", "scanpy", "pandas", "mudata"):
            assert f"import {name}" not in text and f"from {name}" not in text, (path, name)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_file_above_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= 500, f"{path.relative_to(SRC)} has {n} lines"


def test_the_model_class_file_is_well_under_the_limit():
    assert len((SRC / "model" / "_cellplm.py").read_text().splitlines()) < 500
