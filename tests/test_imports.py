"""No import cycle between tidings' modules: a lower module never imports a higher one.

Read from the source, not by importing it: each module's top-level imports (those run
when it is imported; ``if TYPE_CHECKING:`` blocks and imports inside functions are left
out) are edges of a graph, and a cycle in that graph fails the test with its path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tidings

ROOT = Path(tidings.__file__).parent


def _module_names() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, *, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The imports run when the module is imported; with ``deferred``, those run when
    its functions are called too."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With) or (
            deferred
            and isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.For | ast.While
            )
        ):
            pending.extend(node.body)
    return found


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    """Each tidings module, and the tidings modules its top-level imports name (with
    ``deferred``, its functions' imports too)."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), deferred=deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from package import module`` names the module; else the package.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or ``None``."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path.append(root)
        on_path.add(root)
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = todo.pop()
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(graph[nxt])))
                path.append(nxt)
                on_path.add(nxt)
    return None


def test_no_module_of_tidings_imports_one_that_imports_it_back() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_not_even_through_an_import_inside_a_function() -> None:
    cycle = find_cycle(import_graph(deferred=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_the_protocol_and_the_bus_import_no_backend() -> None:
    backends = {
        name
        for name in _module_names()
        if name.startswith("tidings.backends.") and name.split(".")[2][0] != "_"
    } - {"tidings.backends.base"}
    assert not _reached(import_graph(deferred=True), "tidings.backends.base") & backends
    assert not _reached(import_graph(deferred=True), "tidings.delivery") & backends
    assert not _reached(import_graph(), "tidings.bus") & backends


def test_no_module_imports_a_private_name_of_another() -> None:
    crossing: list[str] = []
    for name, path in _module_names().items():
        for node in _imports(ast.parse(path.read_text(), str(path)), deferred=True):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tidings"):
                crossing.extend(
                    f"{name} imports {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                    and f"{node.module}.{alias.name}" not in _module_names()
                )
    assert crossing == []
