"""Rate limits and concurrency limits in one process: option parsing, the pacer's slots, the
in-memory transport, and ``concurrency_limit`` on both brokers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from pamqp import commands as spec

from aioqueue import App, RetryPolicy, task_context
from aioqueue.memory import MemoryBroker
from aioqueue.message import H_DEAD_REASON, H_PROTOCOL, H_RATE_QUEUE, H_TASK
from aioqueue.ratelimit import Rate, SlotClock, holding_queue_name, parse_rate
from aioqueue.testing import run_until_idle
from tests.conftest import running_worker, wait_until


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [("50/s", 50, 1), ("100/m", 100, 60), ("10/h", 10, 3600), (" 2.5 / s ", 2.5, 1)],
)
def test_rates_parse(text: str, count: float, per: float) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.per) == (count, per)
    assert rate.interval == per / count


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("50", "is not"),
        ("50/d", "is not"),
        ("/s", "is not"),
        ("0/s", "must be positive"),
        ("-1/s", "is not"),
        ("abc", "is not"),
        ("5/h", "slower than one run per 600s"),
        (50, "must be a string"),
    ],
)
def test_bad_rates_are_refused_at_decoration(text: Any, why: str) -> None:
    app = App("x", broker_url="memory://rates")
    with pytest.raises(ValueError, match=why):

        @app.task(name="x.t", rate_limit=text)
        async def t() -> None: ...

    assert "x.t" not in app.tasks


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "2"])
def test_bad_concurrency_limits_are_refused(limit: Any) -> None:
    app = App("x", broker_url="memory://rates")
    with pytest.raises(ValueError, match="concurrency_limit"):
        app.task(name="x.t", concurrency_limit=limit)


def test_slots_are_evenly_spaced_and_never_in_the_past() -> None:
    clock = SlotClock(Rate(4, 1.0, "4/s"))
    # Given a burst of messages at t=10: one goes at once, then one each 0.25 s
    assert [clock.reserve(10.0) for _ in range(4)] == [10.0, 10.25, 10.5, 10.75]
    # After an idle spell the next goes at once, not in a catch-up burst
    assert clock.reserve(20.0) == 20.0
    assert clock.reserve(20.0) == 20.25


def test_late_sends_are_caught_up_but_never_bunch_beyond_the_rate() -> None:
    clock = SlotClock(Rate(4, 1.0, "4/s"))
    # Given sends each 0.2 s late: the next is still due one interval after the last was due
    for due in (0.0, 0.25, 0.5, 0.75):
        assert clock.due(due - 0.05 if due else 0.0) == due
        clock.took(due + 0.2)
    # When the next is due at 1.0, four went in the second before it (0.2 .. 0.95)
    # Then it waits until that second has passed: at most 4 in any second of actual sends
    assert clock.due(0.95) == 1.2
    clock.took(1.2)
    assert clock.due(1.3) == 1.45  # the second 0.45 .. 1.2 holds four already
    # And a stall longer than a second starts the schedule afresh instead of a burst
    assert clock.due(5.0) == 5.0
    clock.took(5.0)
    assert clock.due(5.0) == 5.25


def test_a_late_wake_up_is_caught_up() -> None:
    clock = SlotClock(Rate(4, 1.0, "4/s"))
    clock.took(clock.due(0.0))
    # Given the message due at 0.25 is sent at 0.5
    assert clock.due(0.5) == 0.5
    clock.took(0.5)
    # Then the one due at 0.5 goes at once, and the schedule goes on from there
    assert clock.due(0.5) == 0.5
    clock.took(0.5)
    assert clock.due(0.5) == 0.75


def test_holding_queue_is_named_per_task() -> None:
    assert holding_queue_name("shop.charge") == "aioqueue.ratelimit.shop.charge"


async def test_the_memory_transport_paces_a_rate_limited_task(queue_name: str) -> None:
    # Given an app on the in-memory broker with a task limited to 20 a second
    app = App("mem", broker_url=f"memory://{queue_name}", default_queue=queue_name)
    started: list[float] = []

    @app.task(name=f"{queue_name}.limited", rate_limit="20/s")
    async def limited(i: int) -> int:
        started.append(time.monotonic())
        return i

    async with app, running_worker(app) as worker:
        # When 30 are submitted at once
        handles = [await limited.submit(i) for i in range(30)]
        await run_until_idle(app, timeout=60)
        # Then all ran, through the pacer, about 20 a second (at most 21 in any second are
        # paced; the margin is for a busy machine's jitter; without the limit: all 30)
        assert [await h.result(timeout=10) for h in handles] == list(range(30))
        assert worker.pacer is not None and worker.pacer.paced == 30
    assert most_in_a_second(started) <= 26


def most_in_a_second(times: list[float]) -> int:
    times = sorted(times)
    best = first = 0
    for last, t in enumerate(times):
        while t - times[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


async def test_concurrency_limit_holds_and_waiting_runs_give_their_slot_back(
    make_any_app: Any, queue_name: str
) -> None:
    # Given a task allowed 2 runs at once, and a worker with 3 slots
    app: App = make_any_app()
    release = asyncio.Event()
    running = 0
    most = 0

    @app.task(name=f"{queue_name}.narrow", concurrency_limit=2)
    async def narrow(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await release.wait()
        finally:
            running -= 1
        return i

    @app.task(name=f"{queue_name}.other")
    async def other() -> str:
        return "ran"

    async with app, running_worker(app, concurrency=3, prefetch=10):
        handles = [await narrow.submit(i) for i in range(6)]
        await wait_until(lambda: running == 2, what="two runs")
        # When another task comes while four runs wait for a turn
        # Then it runs meanwhile: the waiting ones hold no worker slot
        assert await (await other.submit()).result(timeout=30) == "ran"
        assert running == 2
        release.set()
        assert [await h.result(timeout=30) for h in handles] == list(range(6))
    assert most == 2


async def test_each_retry_of_a_rate_limited_task_waits_for_its_own_turn(queue_name: str) -> None:
    # Given a rate-limited task that fails twice, then succeeds
    app = App("mem", broker_url=f"memory://{queue_name}", default_queue=queue_name)
    attempts: list[int] = []

    @app.task(name=f"{queue_name}.flaky", rate_limit="50/s", retry=RetryPolicy(3, backoff=0.0))
    async def flaky() -> str:
        attempts.append(task_context().attempt)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return "ok"

    async with app, running_worker(app) as worker:
        handle = await flaky.submit()
        assert await handle.result(timeout=30) == "ok"
        # Then every attempt went through the pacer
        assert attempts == [1, 2, 3]
        assert worker.pacer is not None and worker.pacer.paced == 3


async def test_two_workers_in_memory_have_one_pacer(queue_name: str) -> None:
    app = App("mem", broker_url=f"memory://{queue_name}", default_queue=queue_name)

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(i: int) -> int:
        return i

    async with app, running_worker(app) as first, running_worker(app) as second:
        handles = [await limited.submit(i) for i in range(10)]
        assert [await h.result(timeout=30) for h in handles] == list(range(10))
        pacers = [w.pacer for w in (first, second)]
        assert all(p is not None for p in pacers)
        assert sorted(p.leading.is_set() for p in pacers if p) == [False, True]
        assert sum(p.paced for p in pacers if p) == 10


async def test_a_quorum_app_paces_through_a_quorum_holding_queue(
    rabbit: Any, queue_name: str
) -> None:
    app = App("q", broker_url=rabbit.url, default_queue=queue_name, queue_type="quorum")

    @app.task(name=f"{queue_name}.limited", rate_limit="20/s")
    async def limited(i: int) -> int:
        return i

    async with app, running_worker(app):
        handles = [await limited.submit(i) for i in range(5)]
        assert [await h.result(timeout=60) for h in handles] == list(range(5))
    holding = holding_queue_name(f"{queue_name}.limited")
    assert rabbit.queue_stats()[holding]["messages"] == 0
    kinds = json.loads(rabbit.ctl("-q", "list_queues", "name", "type", "--formatter", "json"))
    assert {"name": holding, "type": "quorum"} in kinds


async def test_a_celery_message_of_a_rate_limited_task_is_paced_too(
    rabbit: Any, queue_name: str
) -> None:
    # Given a rate-limited task, and a producer sending Celery's own messages for it
    app = App("c", broker_url=rabbit.url, default_queue=queue_name)

    @app.task(name=f"{queue_name}.limited", rate_limit="20/s")
    async def limited(i: int) -> int:
        return i * 2

    celery_side = app.celery_task(f"{queue_name}.limited", queue=queue_name)
    async with app, running_worker(app) as worker:
        handles = [await celery_side.submit(i) for i in range(5)]
        # Then each runs, through the pacer
        assert [await h.result(timeout=60) for h in handles] == [0, 2, 4, 6, 8]
        # (the pacer counts a copy after its confirm: the run's reply may come first)
        pacer = worker.pacer
        assert pacer is not None
        await wait_until(lambda: pacer.paced == 5, timeout=30, what="five paced copies")


async def test_a_deleted_holding_queue_is_declared_again(rabbit: Any, queue_name: str) -> None:
    # Given a worker pacing a rate-limited task
    app = App("d", broker_url=rabbit.url, default_queue=queue_name)

    @app.task(name=f"{queue_name}.limited", rate_limit="20/s")
    async def limited(i: int) -> int:
        return i

    async with app, running_worker(app):
        assert await (await limited.submit(1)).result(timeout=60) == 1
        # When someone deletes the holding queue
        await asyncio.to_thread(
            rabbit.ctl, "delete_queue", holding_queue_name(f"{queue_name}.limited")
        )
        # Then the next tasks still run: the queue is declared again and paced from
        handles = [await limited.submit(i) for i in range(3)]
        assert [await h.result(timeout=60) for h in handles] == [0, 1, 2]


async def test_with_signing_keys_paced_copies_are_signed_anew(
    make_any_app: Any, queue_name: str
) -> None:
    # Given an app that signs its messages, with a rate-limited task
    app: App = make_any_app(signing_keys={"k1": b"k" * 32})

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(i: int) -> int:
        return i

    async with app, running_worker(app) as worker:
        handles = [await limited.submit(i) for i in range(5)]
        # Then the held and paced copies are accepted (not replays of the originals) and run
        assert [await h.result(timeout=30) for h in handles] == list(range(5))
        # (the pacer counts a copy after its confirm: the run's reply may come first)
        pacer = worker.pacer
        assert pacer is not None
        await wait_until(lambda: pacer.paced == 5, timeout=30, what="five paced copies")


async def test_with_signing_keys_the_pacer_never_signs_a_forged_message(queue_name: str) -> None:
    # Given a signing app with a rate-limited task
    app = App(
        "s", broker_url=f"memory://{queue_name}", default_queue=queue_name,
        signing_keys={"k1": b"k" * 32},
    )  # fmt: skip
    ran: list[int] = []

    @app.task(name=f"{queue_name}.limited", rate_limit="50/s")
    async def limited(i: int) -> int:
        ran.append(i)
        return i

    async with app, running_worker(app):
        # When an unsigned message is dropped straight into the task's holding queue
        forged = spec.Basic.Properties(
            message_id="forged",
            content_type="application/json",
            headers={H_TASK: limited.name, H_PROTOCOL: 1, H_RATE_QUEUE: queue_name},
        )
        body = b'{"args": [666], "kwargs": {}}'
        await app.broker.publish(holding_queue_name(limited.name), body, forged)
        broker = app.broker
        assert isinstance(broker, MemoryBroker)
        # Then the pacer dead-letters it (reason "signature") instead of signing it
        dead = await wait_until(lambda: broker.messages(f"{queue_name}.dlq"), what="a dead letter")
        assert (dead[0][1].headers or {})[H_DEAD_REASON] == "signature"
        # and a genuine submit still runs
        assert await (await limited.submit(1)).result(timeout=30) == 1
    assert ran == [1]
