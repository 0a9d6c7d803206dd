"""The package's shape, read from its own source (the README's "How the pieces fit"): no import circle between its
modules, function-level imports included; at most 14 modules flat in evomerge/, the rest in a folder per stage;
no function over 80 lines but the numba kernels (evomerge/merge/kernels.py)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "evomerge"


def _modules() -> dict[str, ast.Module]:
    out = {}
    # fitness/ and search_spaces/ are links into the package
    files = [Path(d) / f for d, _, fs in os.walk(PACKAGE, followlinks=True) for f in fs if f.endswith(".py")]
    for f in sorted(files):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        if "models" in rel.parts:  # the real zoo's built weights, never source
            continue
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(f.read_text())
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The project's modules `name` imports anywhere in it (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(name.split(".")[: -node.level] + [node.module])
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_circle():
    modules = _modules()
    graph = {n: _imports(n, t, set(modules)) - {"evomerge"} for n, t in modules.items()}  # the root only re-exports
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_stages_in_folders_and_short_functions():
    flat = [f.name for f in PACKAGE.glob("*.py")]
    assert len(flat) <= 14, sorted(flat)
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules().items() if name != "evomerge.merge.kernels"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
