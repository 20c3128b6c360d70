"""The in-memory broker as a product: virtual time, run until idle, the pytest fixtures.

(The behavioural tests of the core loop and of retries also run on it: see ``broker_kind`` and
``qapp`` in tests/test_core.py and tests/test_retries.py.)
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from aioqueue import (
    App,
    DeadLetteredError,
    Retry,
    RetryPolicy,
    TaskError,
    UnroutableError,
    task_context,
)
from aioqueue.testing import VirtualClock, memory_broker, run_until_idle, running_worker
from tests.conftest import ROOT, wait_until


async def test_virtual_clock_jumps_a_thirty_day_delay_and_long_retries(
    aioqueue_memory_url: str, aioqueue_clock: VirtualClock
) -> None:
    # Given a task delayed by 30 days whose first attempt asks for a retry in an hour
    app = App("mem", broker_url=aioqueue_memory_url)
    seen: list[tuple[int, float]] = []

    @app.task(name="m.monthly", retry=RetryPolicy(max_attempts=2))
    async def monthly() -> str:
        seen.append((task_context().attempt, aioqueue_clock.time()))
        if task_context().attempt == 1:
            raise Retry(delay=3600)
        return "done"

    start = aioqueue_clock.time()
    started = time.monotonic()
    async with app, running_worker(app):
        handle = await monthly.submit_with_options(countdown=30 * 86400)
        # When the test runs until idle
        await run_until_idle(app)
        # Then both attempts ran at their virtual times, in no real time to speak of
        assert await handle.result(timeout=5) == "done"
    assert [a for a, _ in seen] == [1, 2]
    assert seen[0][1] - start == pytest.approx(30 * 86400, abs=0.2)
    assert seen[1][1] - seen[0][1] == pytest.approx(3600, abs=0.2)
    assert time.monotonic() - started < 10


async def test_advance_moves_time_step_by_step(
    aioqueue_memory_url: str, aioqueue_clock: VirtualClock
) -> None:
    app = App("mem", broker_url=aioqueue_memory_url)
    ran = asyncio.Event()

    @app.task(name="m.later")
    async def later() -> None:
        ran.set()

    async with app, running_worker(app):
        await later.submit_with_options(countdown=60, ignore_result=True)
        await aioqueue_clock.advance(59)
        assert not ran.is_set()
        await aioqueue_clock.advance(1.1)
        await asyncio.wait_for(ran.wait(), 5)


async def test_advance_takes_seconds_as_the_readme_says(aioqueue_clock: VirtualClock) -> None:
    # Given the README's schedule example, which advances the clock by 300
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "aioqueue_clock.advance(300)" in x)
    # Then its comment speaks of seconds (it said milliseconds)
    assert "in seconds" in line and "milli" not in line, line
    # and 300 moves the clock by five minutes
    before = aioqueue_clock.now()
    await aioqueue_clock.advance(300)
    assert aioqueue_clock.now() - before == timedelta(minutes=5)


async def test_failures_land_in_the_memory_dlq(aioqueue_memory_url: str) -> None:
    app = App("mem", broker_url=aioqueue_memory_url, default_queue="q")

    @app.task(name="m.fail")
    async def fail() -> None:
        raise ValueError("no")

    async with app, running_worker(app):
        handle = await fail.submit()
        await run_until_idle(app)
        with pytest.raises(TaskError, match="ValueError: no"):
            await handle.result(timeout=5)
        dead = memory_broker(aioqueue_memory_url, app.settings).messages("q.dlq")
        assert len(dead) == 1 and dead[0][1].headers["aioqueue-dead-reason"] == "failed"


async def test_apps_on_one_memory_url_share_the_broker(aioqueue_memory_url: str) -> None:
    producer = App("producer", broker_url=aioqueue_memory_url, default_queue="shared")
    consumer = App("consumer", broker_url=aioqueue_memory_url, default_queue="shared")

    @consumer.task(name="m.echo")
    async def echo(x: int) -> int:
        return x

    async with producer, consumer, running_worker(consumer):
        handle = await producer.submit("m.echo", 7)
        assert await handle.result(timeout=5) == 7


async def test_publishing_to_an_undeclared_queue_is_unroutable(aioqueue_memory_url: str) -> None:
    app = App("mem", broker_url=aioqueue_memory_url)
    async with app:
        with pytest.raises(UnroutableError):
            await app.broker.publish("nowhere", b"{}", properties=None)  # type: ignore[arg-type]


async def test_prefetch_bounds_deliveries_in_memory_too(aioqueue_memory_url: str) -> None:
    app = App("mem", broker_url=aioqueue_memory_url)
    gate = asyncio.Event()
    running = 0
    peak = 0

    @app.task(name="m.hold")
    async def hold() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1

    async with app, running_worker(app, concurrency=10, prefetch=3) as worker:
        handles = [await hold.submit() for _ in range(8)]
        await wait_until(lambda: running == 3, what="3 tasks running")
        assert worker.statistics().in_hand == 3
        gate.set()
        await asyncio.gather(*(h.result(timeout=5) for h in handles))
    assert peak == 3


async def test_expiry_follows_the_virtual_clock(
    aioqueue_memory_url: str, aioqueue_clock: VirtualClock
) -> None:
    app = App("mem", broker_url=aioqueue_memory_url, default_queue="q")
    runs: list[str] = []

    @app.task(name="m.perishable")
    async def perishable(label: str) -> str:
        runs.append(label)
        return label

    async with app, running_worker(app):
        # Given virtual time a day ahead of the wall clock
        await aioqueue_clock.advance(86400)
        now = aioqueue_clock.now()
        # When tasks delayed by a minute expire after 30 s, or after 90 s
        stale = await perishable.submit_with_options(args=("stale",), expires=30, countdown=60)
        stale_at = await perishable.submit_with_options(
            args=("stale_at",), expires=now + timedelta(seconds=30), countdown=60
        )
        fresh = await perishable.submit_with_options(args=("fresh",), expires=90, countdown=60)
        await run_until_idle(app)
        # Then the first two are dead-lettered, as on RabbitMQ, and the third runs
        for handle in (stale, stale_at):
            with pytest.raises(DeadLetteredError) as info:
                await handle.result(timeout=5)
            assert info.value.reason == "expired"
        assert await fresh.result(timeout=5) == "fresh"
    assert runs == ["fresh"]
    dead = memory_broker(aioqueue_memory_url, app.settings).messages("q.dlq")
    assert [props.headers["aioqueue-dead-reason"] for _, props in dead] == ["expired"] * 2


async def test_eta_is_measured_on_the_virtual_clock(
    aioqueue_memory_url: str, aioqueue_clock: VirtualClock
) -> None:
    app = App("mem", broker_url=aioqueue_memory_url)
    ran_at: list[float] = []

    @app.task(name="m.at")
    async def at() -> None:
        ran_at.append(aioqueue_clock.time())

    async with app, running_worker(app):
        await aioqueue_clock.advance(86400)
        eta = aioqueue_clock.now() + timedelta(minutes=5)
        handle = await at.submit_with_options(eta=eta)
        await run_until_idle(app)
        await handle.result(timeout=5)
    assert ran_at == [pytest.approx(eta.timestamp(), abs=1.0)]  # the ladder's 1 s resolution
