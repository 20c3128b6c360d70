"""The cluster suite's own three RabbitMQ nodes, joined into one cluster, and its figures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.failure.harness import FIGURES
from tests.rabbit import RabbitCluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three private nodes in one cluster, which this suite kills and restarts."""
    nodes = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [f.line() for f in FIGURES if f.scenario.startswith("cluster")]
    if lines:
        terminalreporter.section("aioqueue cluster suite")
        for line in lines:
            terminalreporter.write_line(line)
