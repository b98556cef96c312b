"""Imports run one way (issue 22): the package's modules, read with `ast` (imports inside
functions included), form no circle, and no module imports one on a floor above its own.

Floors follow the data: checkpoint -> convert -> MLX shards -> load -> model + pools -> generator
-> chat / server -> CLI. The byte arithmetic and the planner sit between the model and the
generator; the text layer (tokenizer, chat format) is a side floor that the loader and everything
above may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mlx_dsv4"

# Longest prefix wins. The package root (`mlx_dsv4`, which only holds `__version__` and the lazy
# public API) is importable from anywhere.
FLOORS = {
    "mlx_dsv4.config": 0, "mlx_dsv4.launch": 0, "mlx_dsv4.threads": 0, "mlx_dsv4.hub": 0,
    "mlx_dsv4.text": 1,
    "mlx_dsv4.model": 2,
    "mlx_dsv4.convert": 3,
    "mlx_dsv4.sizes": 4, "mlx_dsv4.plan": 5, "mlx_dsv4.plan_report": 6,
    "mlx_dsv4.generation": 7,
    "mlx_dsv4.synthetic": 8, "mlx_dsv4.chat": 8, "mlx_dsv4.serve": 8, "mlx_dsv4.bench": 8,
    "mlx_dsv4.rank": 8,
    "mlx_dsv4.repl": 9, "mlx_dsv4.selftest": 9,
    "mlx_dsv4.cli": 10,
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, source: str, known, package: bool = False) -> set[str]:
    """The package's modules (`known`) that module `name` imports anywhere in `source`."""
    package = name if package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def floor(name: str) -> int | None:
    best = max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len, default=None)
    return FLOORS[best] if best else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path.read_text(encoding="utf-8"), known, path.name == "__init__.py")
            for name, path in known.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (depth-first search for a back edge), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and m != "mlx_dsv4" and (found := visit(m)):
            return found
    return None


def test_every_module_has_a_floor(graph):
    assert [m for m in graph if m != "mlx_dsv4" and floor(m) is None] == []


def test_no_module_imports_one_on_a_floor_above(graph):
    up = [f"{a} ({floor(a)}) imports {b} ({floor(b)})" for a, targets in graph.items() for b in targets
          if b != "mlx_dsv4" and a != "mlx_dsv4" and floor(b) > floor(a)]
    assert up == []


def test_no_import_circle(graph):
    assert find_circle(graph) is None


def test_the_check_sees_a_circle_through_a_function_level_import():
    known = {"mlx_dsv4.a", "mlx_dsv4.b", "mlx_dsv4.c"}
    sources = {"mlx_dsv4.a": "from . import b\n", "mlx_dsv4.b": "from .c import y\n",
               "mlx_dsv4.c": "def f():\n    from .a import x\n"}
    graph = {name: imports(name, src, known) for name, src in sources.items()}
    assert find_circle(graph) == ["mlx_dsv4.a", "mlx_dsv4.b", "mlx_dsv4.c", "mlx_dsv4.a"]
    sources["mlx_dsv4.c"] = "import os\n"
    graph = {name: imports(name, src, known) for name, src in sources.items()}
    assert find_circle(graph) is None
