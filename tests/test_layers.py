"""The import layers: each floor imports only floors below it, and no module cycle exists.

Floors, bottom up: ``moments.v1`` (generated API code), ``moments.core`` (settings, keys, records,
errors, job protocol, locks, blob store, token-cache index), ``moments.media`` (probe, sampling plan,
decode), then side by side ``moments.service`` (the front end) and ``moments.workers`` (with
``moments.workers.model`` below the rest of the workers), then ``moments.tools`` (training, tiny
model, synthetic data, fault injection), and ``moments.app`` (CLI, serve, demo, client, eval) on top;
nothing imports ``moments.app``. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"moments": ROOT / "moments", "moments.service": ROOT / "service",
           "moments.workers": ROOT / "workers", "moments.tools": ROOT / "tools"}

ALLOWED = {
    "moments": set(),  # the package's own __init__ imports nothing of it
    "moments.v1": {"moments.v1"},
    "moments.core": {"moments.v1", "moments.core"},
    "moments.media": {"moments.v1", "moments.core", "moments.media"},
    "moments.service": {"moments.v1", "moments.core", "moments.media", "moments.service"},
    "moments.workers.model": {"moments.v1", "moments.core", "moments.media", "moments.workers.model"},
    "moments.workers": {"moments.v1", "moments.core", "moments.media", "moments.workers"},
    "moments.tools": {"moments.v1", "moments.core", "moments.media", "moments.workers", "moments.tools"},
    "moments.app": {"moments"},
}
TOP_LEVEL_ALIASES = ("service", "workers", "tools")
"""Folder names that must never be imported as packages of their own (only as ``moments.*``)."""


def floor(module: str) -> str:
    """The floor a module belongs to: the longest key of ALLOWED that prefixes it."""
    best = ""
    for name in ALLOWED:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best or module


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "moments" and parts and parts[0] in ("service", "workers", "tools"):
                continue
            found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # "from pkg import module"
    return out


@functools.lru_cache(maxsize=1)
def _graph() -> tuple[tuple[str, frozenset[str]], ...]:
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports(name, path):
            if imp.split(".")[0] in TOP_LEVEL_ALIASES:
                targets.add(imp)
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                targets.add(imp)
        edges[name] = frozenset(targets)
    return tuple(edges.items())


def graph() -> dict[str, set[str]]:
    """Module -> the moments modules it imports (a fresh copy: tests may add edges)."""
    return {name: set(targets) for name, targets in _graph()}


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in edges.items():
        allowed = ALLOWED[floor(name)]
        for target in targets:
            if target.split(".")[0] in TOP_LEVEL_ALIASES:
                bad.append(f"{name} imports {target} (use moments.{target})")
            elif target.startswith("moments") and not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{name} ({floor(name)}) imports {target} ({floor(target)})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_floor_imports_only_floors_below_it():
    edges = graph()
    assert len(edges) > 40  # the whole tree was read
    assert layer_violations(edges) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_can_fail():
    """An upward import and a cycle, added on purpose, are both caught."""
    upward = graph()
    upward["moments.core.records"] = upward["moments.core.records"] | {"moments.app.cli"}
    assert "moments.core.records (moments.core) imports moments.app.cli (moments.app)" in layer_violations(upward)
    looped = graph()
    looped["moments.core.errors"] = looped["moments.core.errors"] | {"moments.core.records"}  # records imports errors
    assert any({"moments.core.errors", "moments.core.records"} <= set(c) for c in cycles(looped))
    aliased = graph()
    aliased["moments.workers.main"] = aliased["moments.workers.main"] | {"service.server"}
    assert any("use moments.service.server" in v for v in layer_violations(aliased))
