"""The rules of the module layout (docs/design.md), read from the code itself (no broker).

- no runtime import cycle, function-local imports included (``TYPE_CHECKING`` blocks aside);
- nothing in the package imports ``aioqueue.testing`` but ``pytest_plugin``;
- aio-pika and aiormq are imported only in ``aioqueue/rabbit/``;
- no ``aioqueue-`` header literal outside ``aioqueue/message/``;
- modules stay under ~400 lines.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "aioqueue"
MAX_LINES = 420  # "~400"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def runtime_imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The modules of the package that ``name`` imports when it runs."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    for target in _imported(ast.parse(path.read_text()), base, known):
        if target in known and target != name:
            yield target


def _imported(node: ast.AST, base: list[str], known: set[str]) -> Iterator[str]:
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        for child in node.orelse:
            yield from _imported(child, base, known)
        return
    if isinstance(node, ast.ImportFrom):
        parent = base[: len(base) - (node.level - 1)] if node.level else []
        target = ".".join(parent + ([node.module] if node.module else []))
        for alias in node.names:
            candidate = f"{target}.{alias.name}"
            yield candidate if candidate in known else target
    elif isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    for child in ast.iter_child_nodes(node):
        yield from _imported(child, base, known)


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """The modules that import themselves, through any chain of runtime imports."""
    return sorted(node for node in graph if node in _reachable(graph, node))


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_no_runtime_import_cycle() -> None:
    known = modules()
    graph = {name: set(runtime_imports(name, path, set(known))) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c"]


def test_only_the_pytest_plugin_imports_the_testing_module() -> None:
    known = modules()
    importers = {
        name
        for name, path in known.items()
        if "aioqueue.testing" in runtime_imports(name, path, set(known))
    }
    assert importers <= {"aioqueue.pytest_plugin"}


def test_only_the_rabbit_room_speaks_amqp() -> None:
    outside = []
    for name, path in modules().items():
        if name.startswith("aioqueue.rabbit"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            outside += [f"{name}: {n}" for n in names if re.match(r"aio_pika|aiormq", n)]
    assert outside == []


def test_no_header_literal_outside_the_message_room() -> None:
    literals = []
    for name, path in modules().items():
        if name.startswith("aioqueue.message"):
            continue
        tree = ast.parse(path.read_text())
        thread_names = {
            id(k.value)
            for k in ast.walk(tree)
            if isinstance(k, ast.keyword) and k.arg and k.arg.endswith("name_prefix")
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"aioqueue-[a-z-]+", node.value)
                and id(node) not in thread_names
            ):
                literals.append(f"{name}: {node.value!r}")
    assert literals == []


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
