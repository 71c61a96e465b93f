"""The package's shape, read from its source: no import cycle between corsa's modules (deferred imports
included), and no private name of one module used by another module, a test or a bench script."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def corsa_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / "corsa").rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The corsa modules a file imports anywhere in it; `from pkg import name` counts as pkg.name when that is a
    module, else as pkg."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module in known:
            for a in node.names:
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
    return out


def test_no_import_cycles():
    mods = corsa_modules()
    graph = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    # A package's __init__ importing its own submodules is how `corsa.methods` registers every method; the
    # submodules import their siblings directly, never the package, so that is not a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_names_across_modules():
    mods = corsa_modules()
    files = [*mods.values(), *(REPO / "tests").glob("*.py"), *(REPO / "bench").glob("*.py")]
    found = []
    for path in files:
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> corsa module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corsa"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path.name}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and mods.get(aliases[node.value.id]) != path):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, found
