"""The shape of the code: no import cycles between modules, and modules of a readable size.

(The layer contract itself is import-linter's, in ``pyproject.toml``; ``make lint`` runs it.)
"""

from __future__ import annotations

from pathlib import Path

import grimp

PACKAGES = ("bot", "adapters", "chat", "ai_model", "storage")
# Modules longer than this are split, unless listed here with the reason.
MAX_LINES = 460
LONGER = {
    # One scheduler loop: admission, the step and sampling share the sequences' state.
    "ai_model/scheduler.py": 560,
}


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph(*PACKAGES)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    assert cycles(graph, modules) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.y", imported="a.z")
    assert cycles(graph, {"a.x", "a.y", "a.z"}) == [["a.x", "a.y"]]


def test_modules_stay_readable() -> None:
    root = Path(__file__).resolve().parent.parent
    long = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = str(path.relative_to(root))
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > LONGER.get(name, MAX_LINES):
                long[name] = lines
    assert long == {}
