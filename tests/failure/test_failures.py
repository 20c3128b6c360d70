"""The failure suite: thousands of tasks through real workers while things break.

Each scenario asserts: nothing lost among confirmed submits, nothing unexpected, every caller
gets its outcome; duplicates only where a crash or a lost connection forced them. The figures
of every scenario are printed (``pytest -s``), written to ``figures.json`` in the test's
directory, and summed up at the end of the session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aioqueue import App
from tests.failure.harness import Scenario, check
from tests.proxy import Proxy
from tests.rabbit import RabbitNode

pytestmark = [pytest.mark.failure, pytest.mark.timeout(300)]


def producer(url: str, queue: str) -> App:
    """The callers' app: it knows the workers' tasks by name only."""
    return App("failure-producer", broker_url=url, default_queue=queue)


async def test_workers_killed_with_sigkill_mid_run(fault_node: RabbitNode, tmp_path: Path) -> None:
    scenario = Scenario("kill-9 x3", fault_node, tmp_path)

    async def faults(s: Scenario) -> None:
        for fraction in (0.2, 0.45, 0.7):
            await s.at(fraction)
            await s.fault("kill -9 worker", lambda: asyncio.to_thread(s.kill_worker))

    await scenario.run(faults, producer(fault_node.url, scenario.queue))
    check(scenario, producer_faults=False)
    assert scenario.figures.worker_crashes == 3


async def test_broker_restarted_then_killed_mid_run(fault_node: RabbitNode, tmp_path: Path) -> None:
    scenario = Scenario("broker restart + kill", fault_node, tmp_path)

    async def faults(s: Scenario) -> None:
        await s.at(0.3)
        await s.fault("stop_app/start_app", s.in_thread(fault_node.restart))
        await s.at(0.65)
        await s.fault("kill -9 of the node", s.in_thread(fault_node.kill))

    await scenario.run(faults, producer(fault_node.url, scenario.queue))
    check(scenario, producer_faults=True)


async def test_all_connections_closed_repeatedly(fault_node: RabbitNode, tmp_path: Path) -> None:
    scenario = Scenario("close_all_connections x3", fault_node, tmp_path)

    async def faults(s: Scenario) -> None:
        for fraction in (0.25, 0.5, 0.75):
            await s.at(fraction)
            await s.fault("close_all_connections", s.in_thread(fault_node.close_all_connections))

    await scenario.run(faults, producer(fault_node.url, scenario.queue))
    check(scenario, producer_faults=True)


async def test_network_reset_blackholed_and_slowed(fault_node: RabbitNode, tmp_path: Path) -> None:
    async with Proxy(fault_node.port) as proxy:
        # a short heartbeat, so that a partition is noticed (and survived) within the run
        url = proxy.url(fault_node.url) + "?heartbeat=3"
        scenario = Scenario("proxy reset/blackhole/delay", fault_node, tmp_path, url=url)

        async def blackhole() -> None:
            proxy.blackhole()
            # the partition's length: longer than the heartbeat bound
            await asyncio.sleep(10)  # sleep-ok
            proxy.passthrough()

        async def slow() -> None:
            proxy.delay(0.02)
            await s_at(0.7)
            proxy.passthrough()

        async def reset() -> None:
            proxy.reset()

        async def faults(s: Scenario) -> None:
            await s.at(0.2)
            await s.fault("reset", reset)
            await s.at(0.4)
            await s.fault("blackhole 10s", blackhole)
            await s.at(0.55)
            await s.fault("delay 20ms per chunk", slow)
            await s.at(0.8)
            await s.fault("reset", reset)

        s_at = scenario.at
        await scenario.run(faults, producer(url, scenario.queue))
    check(scenario, producer_faults=True)


async def test_poison_tasks_crash_workers(fault_node: RabbitNode, tmp_path: Path) -> None:
    # One task in hand per worker: a worker a poison task kills then returns only that task
    # (see docs/guarantees.md on prefetch and poison).
    poison = frozenset({150, 700, 1250})
    scenario = Scenario(
        "poison", fault_node, tmp_path, concurrency=1, tasks=1800, window=60, poison=poison
    )

    async def faults(s: Scenario) -> None:
        await s.at(1.0)

    await scenario.run(faults, producer(fault_node.url, scenario.queue))
    check(scenario, producer_faults=False)
    f = scenario.figures
    assert f.poison_dead_lettered == len(poison)
    assert f.poison_runs == 5 * len(poison)  # max_deliveries: each run killed a worker
    assert f.worker_crashes == f.poison_runs
    stats = await asyncio.to_thread(fault_node.queue_stats)
    assert stats[f"{scenario.queue}.dlq"]["messages"] == len(poison)
    assert stats[scenario.queue]["messages"] == 0
