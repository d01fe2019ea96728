"""The library's modules import each other in one direction: no cycles, not even through imports made only for types."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "cifar_transfer"


def module_imports() -> dict[str, set[str]]:
    """Each library module's imports of other library modules, from its source (those under TYPE_CHECKING and
    inside functions included)."""
    modules = {
        ".".join(("cifar_transfer", *path.relative_to(LIBRARY).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in LIBRARY.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module for alias in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {module for module in found if module in modules and module != name and module != "cifar_transfer"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search, one report per back edge)."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                found.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_the_library_has_no_import_cycles():
    graph = module_imports()
    assert "cifar_transfer.errors" in graph["cifar_transfer.config"]  # the graph sees real imports
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
