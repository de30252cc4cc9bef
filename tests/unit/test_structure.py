"""The rooms of the code base and what each may import (ARCHITECTURE.md): domain purity, no
cycle between top-level packages, and no app code that imports tests, benchmarks or harness."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# room -> the rooms it may import (ARCHITECTURE.md, "The rooms")
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "db": {"domain"},
    "inference": {"domain"},
    "infra": {"db", "domain"},
    "usecases": {"domain", "db", "inference", "infra"},
    "projections": {"domain", "db", "infra"},
    "service": {"domain", "db", "inference", "infra", "usecases", "projections"},
    "cli": {"domain", "db", "inference", "infra", "usecases", "projections", "service"},
}
NOT_FOR_THE_APP = {"tests", "bench", "harness"}
# Pure means no I/O, no framework and no TensorFlow: the domain's third-party imports are these.
DOMAIN_MAY_IMPORT = {"msgspec", "numpy", "PIL"}


def imports_of(room: str) -> dict[str, set[str]]:
    """Top-level module names each file of `room` imports (lazy imports inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / room).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def room_graph() -> dict[str, set[str]]:
    rooms = set(ALLOWED) | NOT_FOR_THE_APP
    graph: dict[str, set[str]] = {}
    for room in ALLOWED:
        graph[room] = {name for names in imports_of(room).values() for name in names if name in rooms} - {room}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for successor in sorted(graph.get(node, ())):
            if cycle := visit(successor):
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


def test_there_is_no_import_cycle_between_top_level_packages():
    assert find_cycle(room_graph()) is None


def test_each_room_imports_only_the_rooms_below_it():
    offenders = [
        f"{path} imports {name}"
        for room, allowed in ALLOWED.items()
        for path, names in imports_of(room).items()
        for name in sorted(names & ((set(ALLOWED) | NOT_FOR_THE_APP) - allowed - {room}))
    ]
    assert offenders == []


def test_the_domain_is_pure():
    stdlib = set(__import__("sys").stdlib_module_names)
    offenders = [
        f"{path} imports {name}"
        for path, names in imports_of("domain").items()
        for name in sorted(names - stdlib - DOMAIN_MAY_IMPORT - {"domain", "__future__"})
    ]
    assert offenders == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert find_cycle(ALLOWED) is None  # the table itself is a layering
