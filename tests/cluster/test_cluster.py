"""The failure suite on a 3-node RabbitMQ cluster with quorum queues.

Three worker processes, two scheduler processes (one leads, one waits) firing every second,
and a closed-loop producer run against the comma-separated URL of the three nodes while nodes
are killed with ``kill -9`` and restarted. Counted as in ``tests/failure``: nothing lost among
confirmed submits, nothing unexpected, every caller gets its result; the scheduler fires no
slot twice and misses none.
Recovery after each fault is reported, not asserted.

Delayed and retried tasks (the quorum delay ladder) have a test of their own: the node leading
the delay levels in use and the task queue is killed; their results must come within 60 s,
which needs the nodes' 10 s ``dead_letter_worker_publisher_confirm_timeout`` (RabbitMQ 3.10's
180 s default fails it). See docs/deploying.md, "Delays on a cluster".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from aioqueue import App, PublishError, Settings
from tests.conftest import wait_until
from tests.failure.harness import Scenario, check
from tests.rabbit import RabbitCluster

pytestmark = [pytest.mark.cluster, pytest.mark.failure, pytest.mark.timeout(420)]

WORKERS = "aioqueue failure client"  # the connection name of the worker processes' app
CALLER = "aioqueue cluster-producer client"


def producer(url: str, queue: str, **settings: float) -> App:
    return App(
        "cluster-producer",
        broker_url=url,
        default_queue=queue,
        queue_type="quorum",
        settings=Settings(**settings),  # type: ignore[arg-type]
    )


async def busiest(cluster: RabbitCluster, name: str) -> int:
    """The node holding most connections named ``name``."""
    nodes = await asyncio.to_thread(cluster.connection_nodes, name)
    assert nodes, f"no connection named {name!r}"
    return max(set(nodes), key=nodes.count)


async def test_nodes_killed_and_restarted_under_load(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    scenario = Scenario(
        "cluster: kill -9 of nodes, rolling restart",
        None,
        tmp_path,
        url=cluster.url,
        tasks=2000,
        window=200,
        queue_type="quorum",
        schedulers=2,
    )

    async def kill(choose: str, which: int) -> None:
        scenario.figures.timeline.append(f"{choose}: node {which + 1}")
        await asyncio.to_thread(cluster.kill, which)

    async def faults(s: Scenario) -> None:
        await s.at(0.15)
        worker_node = await busiest(cluster, WORKERS)
        await s.fault(
            f"kill -9 of the workers' node ({worker_node + 1})",
            lambda: kill("workers' node", worker_node),
        )
        await s.at(0.35)
        leader = await asyncio.to_thread(cluster.leader_of, s.queue)
        await s.fault(
            f"kill -9 of the task queue's leader ({leader + 1})",
            lambda: kill("queue leader", leader),
        )
        await s.at(0.55)
        await s.fault("rolling restart of all three nodes", s.in_thread(cluster.rolling_restart))
        await s.at(0.8)
        caller = await busiest(cluster, CALLER)
        await s.fault(
            f"kill -9 of the caller's node ({caller + 1}), results on their way",
            lambda: kill("caller's node", caller),
        )

    await scenario.run(faults, producer(cluster.url, scenario.queue))
    check(scenario, producer_faults=True)
    f = scenario.figures
    assert f.ticks > 10, "the scheduler fired nothing"
    assert f.tick_doubles == 0, "a slot was fired twice"
    # Fired in a transaction, a slot whose task a quorum queue refused was recorded and never
    # ran (docs/scheduler.md, "Why not a transaction"); each scheduler's log is in tmp_path
    assert not f.tick_gaps, f"scheduler slots missed: {f.tick_gaps}"


async def test_without_a_majority_submits_fail_in_time_and_nothing_is_lost(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    queue = f"cluster.majority.{time.monotonic_ns()}"
    scenario = Scenario(
        "cluster: two of three nodes down",
        None,
        tmp_path,
        url=cluster.url,
        tasks=600,
        window=100,
        queue_type="quorum",
    )
    scenario.queue = queue
    publish_timeout = 5.0

    async def faults(s: Scenario) -> None:
        await s.at(0.3)
        await s.fault("two of three nodes killed, then started", outage)

    async def outage() -> None:
        survivor = (await asyncio.to_thread(cluster.running))[0]
        down = [i for i in range(3) if i != survivor]
        # a client on the surviving node, its queue declared while the cluster was whole (no
        # worker consumes it: the probe's runs must not count in the tally)
        probe = producer(cluster.urls[survivor], queue, publish_timeout=publish_timeout)
        async with probe:
            await probe.submit_with_options("failure.record", (-1,), queue=f"{queue}.probe")
            for i in down:
                await asyncio.to_thread(cluster.kill, i, restart=False)
            # a submit now cannot be confirmed (no majority): a clear PublishError in time
            started = time.monotonic()
            with pytest.raises(PublishError) as info:
                await probe.submit_with_options("failure.record", (-2,), queue=f"{queue}.probe")
            took = time.monotonic() - started
        scenario.figures.timeline.append(f"submit without a majority: {info.value} ({took:.1f}s)")
        assert took < publish_timeout + 5, took
        await asyncio.gather(*(asyncio.to_thread(cluster.start_node, i) for i in down))

        async def whole() -> bool:
            return len(await asyncio.to_thread(cluster.running)) == 3

        await wait_until(whole, timeout=120, what="all three nodes running")

    await scenario.run(faults, producer(cluster.url, queue, publish_timeout=publish_timeout))
    check(scenario, producer_faults=True)


async def test_delayed_tasks_move_on_when_the_node_leading_the_ladder_is_killed(
    cluster: RabbitCluster, tmp_path: Path
) -> None:
    """The node leading both delay levels in use and the task queue killed: every hop of the
    ladder gets a new dead-letter worker whose first forward is refused (its target's leader
    was on that node); RabbitMQ re-sends a refused hop only after
    ``dead_letter_worker_publisher_confirm_timeout`` (10 s on the suite's nodes, 180 s by
    default on 3.10). Callers give up after 60 s: with the default the test fails."""
    scenario = Scenario(
        "cluster: kill -9 of the node leading the delay ladder",
        None,
        tmp_path,
        url=cluster.url,
        tasks=1500,
        window=100,
        queue_type="quorum",
        mix=True,  # every tenth task delayed 0.3 s, every tenth retried once after 0.2 s
    )
    scenario.result_timeout = 60.0
    # 0.3 s is 3 delay units: levels 1 and 0 of the ladder; a 0.2 s retry is level 1 only
    ladder = ["aioqueue.delay.quorum.1.q", "aioqueue.delay.quorum.0.q"]

    async def faults(s: Scenario) -> None:
        await s.at(0.3)
        node = await asyncio.to_thread(cluster.leader_of, ladder[0])
        for queue in (*ladder, s.queue):
            await asyncio.to_thread(cluster.move_leader, queue, node)
        await s.fault(
            f"kill -9 of the node leading delay levels 1 and 0 and the task queue ({node + 1})",
            s.in_thread(lambda: cluster.kill(node)),
        )

    await scenario.run(faults, producer(cluster.url, scenario.queue))
    check(scenario, producer_faults=True)
