"""The package's import graph, read from the sources (function-level imports included): no module reaches itself
through imports, and the layers only import along the flow pipeline -> quantizer -> format -> op -> kernel, so a
format can be read, stored and loaded without the code that makes or runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vqmobile"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    """Module -> the vqmobile modules it imports. `from . import x` counts as importing the submodule x (the
    package's own __init__ is not run again)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for name in node.names:
                    found = next((c for c in (f"{target}.{name.name}", target) if c in mods), None)
                    if found is not None and found != mod:
                        edges[mod].add(found)
            elif isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name in mods and a.name != mod)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_function_level_imports():
    edges = _graph()
    assert "vqmobile.ops" in edges["vqmobile.layers"]
    assert "vqmobile.finetune" in edges["vqmobile.pipeline"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("layer, forbidden", [
    ("formats", ("ops", "quantizers", "pipeline", "layers", "finetune", "checkpoint", "api", "cli", "bench")),
    ("ops", ("quantizers", "pipeline", "finetune", "api", "cli", "bench")),
    ("quantizers", ("ops", "pipeline", "layers", "finetune", "checkpoint", "api", "cli", "bench")),
])
def test_layers_import_along_the_flow(layer, forbidden):
    bad = sorted(f"{m} -> {t}" for m, ts in _graph().items() if m.startswith(f"vqmobile.{layer}")
                 for t in ts if t.split(".")[1] in forbidden)
    assert not bad, bad
