"""The gateway package's modules form a layered graph: no module imports,
directly or through others, a module that imports it.

Type-only imports (under ``if TYPE_CHECKING:``) and imports inside functions
count too: a cycle hidden from the interpreter is still two modules that
each know the other, and neither can be read or changed on its own.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import redis_ws_gateway

PACKAGE = "redis_ws_gateway"
ROOT = Path(redis_ws_gateway.__file__).parent
# Distributions the gateway must run without (the image carries only it).
FORBIDDEN = ("redis_ws_client", "redis_ws_bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imported(name: str, source: str, *, package: bool = False) -> Iterator[str]:
    """Every module name an Import/ImportFrom anywhere in module ``name``
    names, relative ones resolved; ``from pkg import x`` yields ``pkg.x`` as
    well, which is a module when x is one."""
    tree = ast.parse(source, filename=name)
    here = name if package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                assert node.module is not None
                target = node.module
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Edges between the package's modules, and every outside name each
    module imports."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    outside: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target in _imported(name, path.read_text(), package=_is_package(path)):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                outside[name].add(target)
                continue
            # Importing a.b.c runs a and a.b first: each is an edge (a
            # package whose __init__ imports a module can close a cycle).
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in modules and candidate != name:
                    edges[name].add(candidate)
    return edges, outside


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The modules that import each other, as cycles (paths that return to
    their start): within each strongly connected component (Tarjan) of more
    than one module, the shortest cycle through each of its modules, each
    cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for component in components:
        for start in sorted(component):
            cycle = _cycle_through(start, set(component), edges)
            ring = cycle[:-1]
            first = ring.index(min(ring))
            key = tuple(ring[first:] + ring[:first])
            if key not in seen:
                seen.add(key)
                cycles.append([*key, key[0]])
    return sorted(cycles)


def _cycle_through(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from ``start`` back to itself within ``members``."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(members)}")


def test_the_graph_sees_the_package() -> None:
    edges, _ = _graph()
    # A walk that found nothing would pass the tests below vacuously.
    assert f"{PACKAGE}.fanout.hub" in edges
    assert f"{PACKAGE}.fanout.session" in edges[f"{PACKAGE}.fanout.hub"]
    assert f"{PACKAGE}.upstream.pubsub" in edges[f"{PACKAGE}.server"]


def test_the_walk_counts_every_import_and_finds_cycles() -> None:
    # The cycle finder itself, on a graph that has one.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c", "a"]]
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from redis_ws_gateway.fanout import hub\n"
        "def f():\n"
        "    from ..upstream.pubsub import Kind\n"
        "    import redis_ws_gateway.ws.protocol\n"
    )
    names = set(_imported("redis_ws_gateway.fanout.session", source))
    assert "redis_ws_gateway.fanout.hub" in names
    assert "redis_ws_gateway.upstream.pubsub" in names
    assert "redis_ws_gateway.ws.protocol" in names


def test_no_import_cycles() -> None:
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles in the gateway package:\n" + "\n".join(
        " -> ".join(m.removeprefix(PACKAGE + ".") for m in cycle) for cycle in cycles
    )


def test_the_gateway_does_not_import_client_or_bench() -> None:
    _, outside = _graph()
    found = sorted(
        f"{module} imports {target}"
        for module, targets in outside.items()
        for target in targets
        if target.split(".")[0] in FORBIDDEN
    )
    assert not found, "\n".join(found)
