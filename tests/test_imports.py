"""Rooms that keep to themselves: no import cycle between vldus modules (function-local imports
included) and no ``_private`` name imported from another sub-package.

Every module under vldus/ is parsed with ``ast`` (nothing is imported); every ``import`` /
``from ... import`` statement anywhere in it (module level, in functions, under ``if``) gives an
edge to the vldus module it names (``from vldus.a import b`` names ``vldus.a.b`` when that is a
module, else ``vldus.a``).
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vldus")


def _modules() -> dict[str, str]:
    """module name -> file path, for every .py file under vldus/."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = ["vldus"] + os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: str) -> list[tuple[str, list[str], int]]:
    """(imported vldus module, names imported from it, line) for every import in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return [(m, names, line) for m, names, line in found if m in MODULES and m != module]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _room(module: str) -> str:
    """The sub-package a module belongs to (vldus.detection, ...), or the top-level module itself."""
    parts = module.split(".")
    if len(parts) > 2 or os.path.isdir(os.path.join(ROOT, *parts[1:2])):
        return ".".join(parts[:2])
    return module


def _cycles() -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_function_local_imports():
    """Guards the test itself: a known function-local import is an edge."""
    assert ("vldus.data.readers" in {m for m, _, _ in GRAPH["vldus.detection.inference"]})
    assert len(MODULES) > 40


def test_no_import_cycle():
    cycles = _cycles()
    details = []
    for component in cycles:
        members = set(component)
        details.append(" ; ".join(sorted({f"{m} -> {w} (line {line})" for m in component
                                          for w, _, line in GRAPH[m] if w in members})))
    assert not cycles, "import cycles: " + " | ".join(details)


def test_no_private_name_imported_across_sub_packages():
    bad = [f"{m} imports {name} from {target} (line {line})"
           for m, edges in GRAPH.items() for target, names, line in edges for name in names
           if name.startswith("_") and not name.startswith("__") and _room(m) != _room(target)]
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("source,expected", [
    ("def f():\n    from vldus.detection import zsd\n", ["vldus.detection.zsd"]),
    ("from .zsd import inject_classifier\n", ["vldus.detection.zsd"]),
    ("import vldus.errors\n", ["vldus.errors"]),
])
def test_edges_of_hand_made_modules(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert [m for m, _, _ in _imports("vldus.detection.probe", str(path))] == expected
