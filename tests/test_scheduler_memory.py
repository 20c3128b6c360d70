"""The scheduler on the in-memory broker and its virtual clock: the same loop, no RabbitMQ.

The mirror of tests/test_scheduler_broker.py: slots fire once each on virtual time, misfire
policies and ``skip_if_running`` behave as there, and a test runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aioqueue import App, task_context
from aioqueue.scheduler import Scheduler
from aioqueue.scheduler.in_memory import MemoryLease
from aioqueue.scheduler.records import state_queue_name
from aioqueue.testing import (
    MemoryBroker,
    VirtualClock,
    memory_broker,
    run_until_idle,
    running_worker,
    use_clock,
)
from tests.conftest import wait_until
from tests.schedules import START, missed_slots, slot


@pytest.fixture
def clock(aioqueue_memory_url: str) -> VirtualClock:
    return use_clock(aioqueue_memory_url, VirtualClock(START))  # type: ignore[return-value]


def ticking(url: str, **schedule: Any) -> tuple[App, list[datetime | None]]:
    """An app with one periodic task, ``m.tick``, that records the slot of each run."""
    app = App("mem", broker_url=url, default_queue="ticks")
    runs: list[datetime | None] = []

    @app.periodic(name="m.tick", **schedule)
    async def tick() -> None:
        runs.append(task_context().scheduled_at)

    return app, runs


async def test_five_virtual_minutes_of_an_every_minute_schedule_are_five_runs(
    aioqueue_memory_url: str, clock: VirtualClock
) -> None:
    app, runs = ticking(aioqueue_memory_url, every=60)
    started = time.monotonic()
    async with app, running_worker(app), app.scheduler() as scheduler:
        # When the virtual clock moves on five minutes
        await clock.advance(300)
        await run_until_idle(app)
        # Then the scheduler took its time from the broker's clock and fired each slot once
        assert scheduler.clock is clock
        assert scheduler.is_leader and scheduler.statistics().fired == 5
    assert runs == [slot(m) for m in (1, 2, 3, 4, 5)]
    assert time.monotonic() - started < 10  # no real waiting for slots


async def test_a_cron_schedule_on_virtual_time(
    aioqueue_memory_url: str, clock: VirtualClock
) -> None:
    app, runs = ticking(aioqueue_memory_url, cron="*/15 * * * *")
    async with app, running_worker(app), app.scheduler():
        await clock.advance(3600)
        await run_until_idle(app)
    assert runs == [slot(15), slot(30), slot(45), slot(0, hour=1)]


async def test_a_cron_schedule_across_a_dst_gap(aioqueue_memory_url: str) -> None:
    # Given 02:30 Berlin time daily, and a clock on the day the clocks go forward (31 March)
    clock = use_clock(aioqueue_memory_url, VirtualClock(datetime(2030, 3, 30, 12, tzinfo=UTC)))
    assert isinstance(clock, VirtualClock)
    app, runs = ticking(aioqueue_memory_url, cron="30 2 * * *", tz="Europe/Berlin")
    async with app, running_worker(app), app.scheduler():
        await clock.advance(2 * 86400)
        await run_until_idle(app)
    # Then 02:30, which does not exist that night, fires once at 03:00 CEST; the next at 02:30
    assert runs == [
        datetime(2030, 3, 31, 1, 0, tzinfo=UTC),
        datetime(2030, 4, 1, 0, 30, tzinfo=UTC),
    ]


@missed_slots
async def test_slots_missed_while_no_scheduler_ran(
    aioqueue_memory_url: str,
    clock: VirtualClock,
    misfire: str,
    window: timedelta | None,
    expected: list[int],
) -> None:
    app, runs = ticking(aioqueue_memory_url, every=60, misfire=misfire, misfire_window=window)
    async with app, running_worker(app):
        # Given a scheduler that fired 00:01 and stopped
        async with app.scheduler():
            await clock.advance(30)
        # When the next one starts at 00:10:30 (00:02 to 00:10 missed) and runs a minute
        await clock.advance(570)
        async with app.scheduler():
            await clock.advance(60)
        await run_until_idle(app)
    # Then the missed slots follow the policy, as on RabbitMQ, and none fires twice
    assert [s.minute for s in runs if s is not None] == expected
    # And the last slot is recorded in the memory broker, where a next scheduler reads it
    state = memory_broker(aioqueue_memory_url, app.settings).messages(
        state_queue_name("mem", "m.tick")
    )
    assert len(state) == 1 and b"2030-01-01T00:11:00" in state[0][0]


async def test_skip_if_running_waits_for_the_previous_run(
    aioqueue_memory_url: str, clock: VirtualClock
) -> None:
    app = App("mem", broker_url=aioqueue_memory_url, default_queue="ticks")
    release = asyncio.Event()
    runs: list[datetime | None] = []

    @app.periodic(every=60, name="m.tick", skip_if_running=True)
    async def tick() -> None:
        runs.append(task_context().scheduled_at)
        await release.wait()

    async with app, running_worker(app):
        async with app.scheduler() as first:
            await clock.advance(30)
            await wait_until(lambda: runs == [slot(1)], what="the first run")
            # When the next slot comes while the run goes on, it is skipped
            await clock.advance(60)
            assert first.statistics().skipped_running == 1
        # And a new leader knows the run is still going (from the broker, not its memory)
        async with app.scheduler() as second:
            await clock.advance(60)
            assert second.statistics().skipped_running == 2  # 00:02 (on time again) and 00:03
            # When the run finishes, the next slot fires
            release.set()
            await run_until_idle(app)
            await clock.advance(60)
            await run_until_idle(app)
    assert runs == [slot(1), slot(4)]


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_runs_that_finish_in_time_are_not_skipped(
    aioqueue_memory_url: str, clock: VirtualClock, kind: str
) -> None:
    # Given skip_if_running on a task that takes a moment of real time (no virtual time)
    app = App("mem", broker_url=aioqueue_memory_url, default_queue="ticks")
    runs: list[datetime | None] = []

    if kind == "async":

        @app.periodic(every=60, name="m.tick", skip_if_running=True)
        async def tick() -> None:
            await asyncio.sleep(0.005)  # sleep-ok: a run that takes a moment
            runs.append(task_context().scheduled_at)

    else:

        @app.periodic(every=60, name="m.tick", skip_if_running=True)
        def tick_in_a_thread() -> None:
            time.sleep(0.005)  # sleep-ok: a run that takes a moment
            runs.append(task_context().scheduled_at)

    async with app, running_worker(app), app.scheduler() as scheduler:
        # When five minutes pass: advance lets each run finish before the next slot
        await clock.advance(300)
        await run_until_idle(app)
        assert scheduler.statistics().skipped_running == 0
    assert runs == [slot(m) for m in (1, 2, 3, 4, 5)]


async def test_run_until_idle_moves_time_only_to_delayed_messages(
    aioqueue_memory_url: str, clock: VirtualClock
) -> None:
    app, runs = ticking(aioqueue_memory_url, every=60)
    later: list[float] = []

    @app.task(name="m.later")
    async def delayed() -> None:
        later.append(clock.time())

    async with app, running_worker(app), app.scheduler():
        # An endless schedule alone: run_until_idle returns at once, time stands still
        await run_until_idle(app, timeout=5)
        assert clock.now() == START and runs == []
        # A message delayed by two minutes: time moves to it, firing the slots on the way
        await delayed.submit_with_options(countdown=120, ignore_result=True)
        await run_until_idle(app, timeout=5)
        assert clock.now() == START + timedelta(minutes=2)
    assert runs == [slot(1), slot(2)]
    assert later == [(START + timedelta(minutes=2)).timestamp()]


async def test_a_worker_that_also_schedules(aioqueue_memory_url: str, clock: VirtualClock) -> None:
    # ``running_worker(app, scheduler=True)``: the in-process ``--scheduler``
    app = App("mem", broker_url=aioqueue_memory_url)
    seen: list[tuple[str, int]] = []

    @app.task(name="m.cleanup")
    def cleanup(days: int) -> None:  # a plain function: runs in the worker's threads
        seen.append((task_context().id, days))

    app.schedule("m.cleanup", name="cleanup-7", every=timedelta(minutes=30), args=(7,))
    async with app, running_worker(app, scheduler=True):
        await clock.advance(3600)
        await run_until_idle(app)
    assert seen == [("cleanup-7@2030-01-01T00:30:00Z", 7), ("cleanup-7@2030-01-01T01:00:00Z", 7)]


async def test_one_scheduler_of_the_process_leads_and_another_takes_over(
    aioqueue_memory_url: str, clock: VirtualClock
) -> None:
    app, runs = ticking(aioqueue_memory_url, every=60)
    async with app, running_worker(app):
        one = app.scheduler(identity="one")
        two = app.scheduler(identity="two")
        async with one, two:
            await clock.advance(90)
            assert one.is_leader != two.is_leader
            leader, follower = (one, two) if one.is_leader else (two, one)
            # When the leader stops, the other takes over and continues after 00:02
            leader.stop()
            await wait_until(lambda: follower.is_leader, what="the follower leading")
            await clock.advance(120)
            await run_until_idle(app)
    assert runs == [slot(1), slot(2), slot(3), slot(4)]
    assert one.statistics().fired + two.statistics().fired == 4


async def test_a_leader_whose_lease_was_taken_fires_nothing(
    aioqueue_memory_url: str, clock: VirtualClock
) -> None:
    app, runs = ticking(aioqueue_memory_url, every=60)
    async with app, running_worker(app), app.scheduler() as scheduler:
        await clock.advance(60)
        broker = memory_broker(aioqueue_memory_url, app.settings)
        lease_name = "aioqueue.scheduler.mem.lease"
        assert isinstance(broker.holder(lease_name), MemoryLease)
        # When the lease is taken away (as when a leader's connection dies) and held by another
        broker.revoke(lease_name)
        broker.claim(lease_name, "someone else")
        await wait_until(lambda: not scheduler.is_leader, what="the lease lost")
        await clock.advance(300)
        await run_until_idle(app)
        # Then it fired nothing more, and waits for the lease
        assert runs == [slot(1)] and not scheduler.is_leader
        broker.release(lease_name, "someone else")
        await wait_until(lambda: scheduler.is_leader, timeout=10, what="leadership again")
        await clock.advance(60)
        await run_until_idle(app)
    assert runs == [slot(1), slot(7)]  # 00:02 to 00:06 missed (misfire=skip)


async def test_an_explicit_clock_still_wins(aioqueue_memory_url: str) -> None:
    app, _ = ticking(aioqueue_memory_url, every=60)
    mine = VirtualClock(START)
    scheduler = Scheduler(app, clock=mine)
    async with app, scheduler:
        assert scheduler.clock is mine
    assert isinstance(memory_broker(aioqueue_memory_url, app.settings), MemoryBroker)


def test_virtual_clock_is_a_scheduler_clock() -> None:
    clock = VirtualClock(START)
    assert clock.now() == START and clock.time() == START.timestamp()
    with pytest.raises(ValueError, match="aware"):
        VirtualClock(datetime(2030, 1, 1))


async def test_sleep_until_wakes_at_the_time_and_advance_steps_through_timers() -> None:
    clock = VirtualClock(START)
    woke: list[datetime] = []

    async def sleeper(when: datetime) -> None:
        await clock.sleep_until(when)
        woke.append(clock.now())

    tasks = [asyncio.ensure_future(sleeper(slot(m))) for m in (3, 1, 2)]
    await wait_until(lambda: len(clock._sleepers) == 3, what="three sleepers")
    assert clock.next_timer == slot(1).timestamp()
    await clock.advance(120)
    assert woke == [slot(1), slot(2)] and clock.now() == slot(2, 30)
    await clock.advance_to(slot(3))
    await asyncio.gather(*tasks)
    assert woke == [slot(1), slot(2), slot(3)]
