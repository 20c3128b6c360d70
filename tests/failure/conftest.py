"""The failure suite's own RabbitMQ node, and its figures at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.failure.harness import FIGURES
from tests.rabbit import RabbitNode


@pytest.fixture(scope="package")
def fault_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A node this suite may stop, kill and cut off without disturbing the other tests."""
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-failure"))
    node.start()
    try:
        yield node
    finally:
        node.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [f.line() for f in FIGURES if not f.scenario.startswith("cluster")]
    if lines:
        terminalreporter.section("aioqueue failure suite")
        for line in lines:
            terminalreporter.write_line(line)
