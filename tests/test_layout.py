"""The package's imports go one way: no module imports another that imports it back, and no
module imports inside a function to dodge such a circle (only optional third-party packages
are imported late)."""

from __future__ import annotations

import ast
from pathlib import Path

import gigapatch

ROOT = Path(gigapatch.__file__).parent

#: Packages a layer may not import (engine → memory → methods → tasks → models → data → io → core).
FORBIDDEN = {
    "core": ("io", "data", "synth", "models", "tasks", "methods", "step", "memory", "engine"),
    "io": ("data", "synth", "models", "tasks", "methods", "step", "memory", "engine"),
    "data": ("models", "tasks", "methods", "step", "memory", "engine"),
    "models": ("data", "tasks", "methods", "step", "memory", "engine"),
    "tasks": ("methods", "step", "memory", "engine"),
    "methods": ("step", "memory", "engine"),
    "step": ("methods", "memory", "engine"),
    "memory": ("engine",),
}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("gigapatch", *parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module, top_level: bool) -> set[str]:
    nodes = tree.body if top_level else [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    found: set[str] = set()
    for node in nodes:
        for sub in ast.walk(node) if not top_level else [node]:
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("gigapatch"):
                found.add(sub.module)
            elif isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.startswith("gigapatch")}
    return found


def test_no_import_circles():
    modules = _modules()
    graph = {m: {d for d in _imports(t, True) if d in modules and d != m}
             for m, t in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " → ".join(path[path.index(d):] + [d])
                                     if d in path else f"{m} → {d}")
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_gigapatch_imports_inside_functions():
    late = {m: _imports(t, False) for m, t in _modules().items()}
    assert {m: d for m, d in late.items() if d} == {}


def test_layers_import_downwards_only():
    wrong = []
    for name, tree in _modules().items():
        layer = name.split(".")[1] if name.count(".") else ""
        for dep in _imports(tree, True):
            target = dep.split(".")[1] if dep.count(".") else ""
            if target in FORBIDDEN.get(layer, ()):
                wrong.append(f"{name} imports {dep}")
    assert wrong == []
