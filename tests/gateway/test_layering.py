"""The core's import graph: no circles (type-only imports included), no inference library."""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
HEAVY = {"llama_cpp", "exllamav2", "exllamav3", "torch", "numpy"}


def _module(path: Path) -> str:
    rel = path.relative_to(GATEWAY.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (inside functions and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in GATEWAY.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in files and m != name}
        for name, path in files.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_core_has_no_import_circle() -> None:
    graph = _graph()
    assert len(graph) > 30  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_no_inference_library() -> None:
    for path in GATEWAY.rglob("*.py"):
        heavy = {m.split(".")[0] for m in _imports(path)} & HEAVY
        assert not heavy, f"{path} imports {heavy}"


def test_sse_framing_knows_no_endpoint_or_job() -> None:
    imported = _imports(GATEWAY / "sse.py")
    assert not {m for m in imported if m.startswith(("gateway.flow", "gateway.endpoints"))}


def test_the_flow_imports_nothing_from_the_endpoints() -> None:
    """Endpoints implement the flow's contract (:mod:`gateway.flow.contract`); the flow never
    names one."""
    for path in (GATEWAY / "flow").rglob("*.py"):
        imported = _imports(path)
        assert not {m for m in imported if m.startswith("gateway.endpoints")}, path


def test_the_app_names_no_endpoint() -> None:
    """The app mounts what the registry lists: it imports the registry, no endpoint module."""
    imported = {m for m in _imports(GATEWAY / "app.py") if m.startswith("gateway.endpoints")}
    assert imported <= {"gateway.endpoints", "gateway.endpoints.endpoints"}
