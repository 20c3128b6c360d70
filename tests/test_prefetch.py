"""``--prefetch`` is a true total per worker process, split exactly across its queues."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from aioqueue import App
from tests.conftest import running_worker, wait_until
from tests.rabbit import RabbitNode

PER_QUEUE = 5  # tasks submitted to each queue: more than any queue's share


def holding_app(make_app: Any, queue_name: str, queue_type: str, queues: int) -> tuple[App, Any]:
    """An app with one task per queue, each blocked until the returned event is set."""
    app: App = make_app(queue_type=queue_type)
    gate = asyncio.Event()
    for i in range(queues):

        async def hold(i: int) -> int:
            await gate.wait()
            return i

        hold.__qualname__ = f"hold{i}"
        app.task(name=f"t.hold{i}", queue=f"{queue_name}.{i}")(hold)
    return app, gate


async def fill_and_drain(
    app: App, gate: asyncio.Event, rabbit: RabbitNode, queues: list[str], **options: Any
) -> tuple[list[int], int]:
    """Submit PER_QUEUE blocked tasks to each queue, wait until the worker holds what its
    prefetch lets it, then release them all. Returns the unacked count RabbitMQ saw on each
    queue while the tasks were blocked, and the most the worker ever held."""
    async with app, running_worker(app, queues=queues, concurrency=100, **options) as worker:
        handles = [
            await app.submit(f"t.hold{i}", i) for i in range(len(queues)) for _ in range(PER_QUEUE)
        ]

        def settled() -> list[int] | None:
            stats = rabbit.queue_stats()
            unacked = [stats[q]["messages_unacknowledged"] for q in queues]
            ready = [stats[q]["messages_ready"] for q in queues]
            # RabbitMQ holds back what the prefetch does not let it deliver
            held = worker.statistics().in_hand
            done = all(u + r == PER_QUEUE for u, r in zip(unacked, ready, strict=True))
            return unacked if done and held == sum(unacked) and held > 0 else None

        unacked = await wait_until(settled, what="the worker to hold its prefetch")
        # and nothing more arrives while they stay blocked
        assert rabbit.queue_stats()[queues[0]]["messages_unacknowledged"] == unacked[0]
        gate.set()
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        assert sorted(results) == sorted(i for i in range(len(queues)) for _ in range(PER_QUEUE))
        return unacked, worker.statistics().max_in_hand


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_prefetch_is_a_total_split_exactly_across_queues(
    make_app: Any, rabbit: RabbitNode, queue_name: str, queue_type: str
) -> None:
    # Given a worker with --prefetch 6 on 4 queues, each with more tasks than it can hold
    app, gate = holding_app(make_app, queue_name, queue_type, 4)
    queues = [f"{queue_name}.{i}" for i in range(4)]
    # When the tasks block
    unacked, most = await fill_and_drain(app, gate, rabbit, queues, prefetch=6)
    # Then RabbitMQ delivered 2 + 2 + 1 + 1 = 6 unacked messages, and never more were held
    assert unacked == [2, 2, 1, 1]
    assert most == 6


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_prefetch_below_the_number_of_queues_is_raised_to_it_with_a_warning(
    make_app: Any,
    rabbit: RabbitNode,
    queue_name: str,
    queue_type: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aioqueue.worker")
    # Given --prefetch 1 on 4 queues (it held 3-4 unacked while calling itself a total of 1)
    app, gate = holding_app(make_app, queue_name, queue_type, 4)
    queues = [f"{queue_name}.{i}" for i in range(4)]
    # When the tasks block
    unacked, most = await fill_and_drain(app, gate, rabbit, queues, prefetch=1)
    # Then each queue holds one, 4 in all, and the worker said so when it started
    assert unacked == [1, 1, 1, 1]
    assert most == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "prefetch 1 is below the number of queues (4)" in w and "up to 4 unacked" in w
        for w in warnings
    ), warnings
