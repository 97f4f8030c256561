"""The architecture's import rules, read from the source (ast), not from a running interpreter.

- No cycle among the modules of `server/`, `pipeline/` and `client/`, counting every import: module
  level, inside functions and under `TYPE_CHECKING` (a cycle hidden in a function is still a knot).
- `server/` and `client/` never import torch: no module of theirs imports it, and nothing they import at
  module level reaches it (the engine is loaded lazily, inside `server/responders.py`, in the thread
  that owns it).
- Layers (docs/architecture.md): inside `pipeline/`, nothing below the engine imports `pipeline.engine`;
  in `server/`, the call (`server/call/`) never reaches a transport (`server/webrtc/`,
  `server/websocket/`) nor the libraries they are built on, and the protocol and edge-audio packages
  (`server/realtime/`, `server/audio/`) reach neither the call nor a transport.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "pipeline", "client")
TRANSPORT_LIBRARIES = {"aiortc", "aioice", "aiohttp", "av"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module `name` names (a module, or a package's __init__), else None (third party)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path, module: str, known: dict[str, Path], top_level_only: bool) -> set[str]:
    """Modules imported by `path`: project modules by name, others by their top-level package name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pipeline.lm import model` imports pipeline.lm.model; `from x import func` imports x.
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
            elif target is None and name.split(".")[0] not in PACKAGES:
                found.add(name.split(".")[0])
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(p, m, known, top_level_only) for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(n for n in graph[root] if n in graph)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(n for n in graph[child] if n in graph))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_the_graph_sees_the_packages() -> None:
    graph = _graph(top_level_only=False)
    assert "server.app" in graph and "pipeline.lm.model" in graph
    assert "pipeline.lm.kv_cache" in graph["pipeline.lm.model"]  # a real edge is found
    assert "torch" in graph["pipeline.lm.model"]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph(top_level_only=False))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a planted cycle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _reach(graph: dict[str, set[str]], roots: list[str]) -> dict[str, str]:
    """Everything `roots` import, directly or not: module or library -> the module that imports it."""
    via: dict[str, str] = {}
    todo = list(roots)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for dep in graph.get(module, ()):
            via.setdefault(dep, module)
            if dep in graph:
                todo.append(dep)
    return via


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("package", ["server", "client"])
def test_never_imports_torch(package: str) -> None:
    full = _graph(top_level_only=False)
    direct = sorted(m for m, deps in full.items() if _in(m, package) and "torch" in deps)
    assert not direct, f"{package} modules importing torch: {direct}"
    top = _graph(top_level_only=True)
    via = _reach(top, [m for m in top if _in(m, package)])
    assert "torch" not in via, f"{package}/ reaches torch at import time through {via.get('torch')}"


def test_nothing_below_the_engine_imports_it() -> None:
    full = _graph(top_level_only=False)
    below = [m for m in full if _in(m, "pipeline") and not _in(m, "pipeline.engine")]
    wrong = sorted(f"{m} -> {d}" for m in below for d in full[m] if _in(d, "pipeline.engine"))
    assert not wrong, f"imports of the engine from below it: {wrong}"


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("server.call", ("server.webrtc", "server.websocket", "server.edge", *TRANSPORT_LIBRARIES)),
        ("server.realtime", ("server.call", "server.webrtc", "server.websocket", *TRANSPORT_LIBRARIES)),
        ("server.audio", ("server.call", "server.webrtc", "server.websocket", *TRANSPORT_LIBRARIES)),
    ],
)
def test_server_layers(layer: str, forbidden: tuple[str, ...]) -> None:
    """Counting every import, at any depth: a lazy import is still a dependency."""
    full = _graph(top_level_only=False)
    via = _reach(full, [m for m in full if _in(m, layer)])
    wrong = sorted(f"{dep} (imported by {via[dep]})" for dep in via if _in(dep, *forbidden))
    assert not wrong, f"{layer} reaches {wrong}"


def test_layer_check_sees_a_planted_edge() -> None:
    """The reach used above can fail: an edge two modules away is found with its importer."""
    graph = {"server.call.a": {"server.call.b"}, "server.call.b": {"aiortc"}}
    assert _reach(graph, ["server.call.a"]) == {"server.call.b": "server.call.a", "aiortc": "server.call.b"}
