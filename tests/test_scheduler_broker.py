"""The scheduler loop against the real broker, on a fake clock: slots, misfires, leadership.

Each test has its own app name (so its own lease and state queues) and its own work queue, which
no worker consumes unless the test runs one: the task messages are counted where they land.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import Any

import aiormq
import pytest
from pamqp import commands as spec

from aioqueue import App, task_context
from aioqueue.message import Envelope
from aioqueue.scheduler import FakeClock, Scheduler
from aioqueue.scheduler.records import done_queue_name, state_queue_name
from tests.conftest import running_worker, wait_until
from tests.rabbit import RabbitNode
from tests.schedules import START, missed_slots, slot


async def drain(url: str, queue: str) -> list[Envelope]:
    """Take every message out of ``queue``, oldest first, as the worker would read it."""
    messages: list[Envelope] = []
    async with aiormq.connect(url) as connection:
        channel = await connection.channel()
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return messages  # nothing was ever published there
        while True:
            got = await channel.basic_get(queue, no_ack=True)
            if isinstance(got.delivery, spec.Basic.GetEmpty):
                return messages
            props = got.header.properties
            envelope = Envelope.decode(
                got.body,
                message_id=props.message_id,
                headers=props.headers,
                reply_to=props.reply_to,
                content_type=props.content_type,
                max_size=1 << 20,
            )
            messages.append(envelope)


def minutes(messages: list[Envelope], schedule: str = "tests.tick") -> list[int]:
    """The minute of each message's slot, checking its id is ``<schedule>@<slot>``."""
    result = []
    for message in messages:
        name, _, when = message.id.partition("@")
        assert name == schedule and message.task == schedule
        slot_time = datetime.fromisoformat(when)
        assert message.scheduled_at == slot_time.timestamp()
        result.append(slot_time.minute)
    return result


def new_app(rabbit: RabbitNode, queue: str, name: str | None = None, **schedule: Any) -> App:
    app = App(name or f"sched-{uuid.uuid4().hex[:10]}", broker_url=rabbit.url, default_queue=queue)
    if schedule:
        app.schedule("tests.tick", **schedule)
    return app


async def ready(app: App, queue: str) -> int:
    """Messages ready in ``queue``."""
    return (await app.broker.queue_depth(queue))[0]


async def asleep_until(clock: FakeClock, when: datetime) -> None:
    """Wait until the leader has fired what was due and sleeps until ``when``."""
    await wait_until(lambda: clock.sleeping_until == when, what=f"the leader asleep until {when}")


async def step(clock: FakeClock, when: datetime, then: datetime) -> None:
    clock.set(when)
    await asleep_until(clock, then)


async def close_lease_connection(rabbit: RabbitNode, scheduler: Scheduler) -> None:
    """Have the broker close a scheduler's lease connection (as if its network failed)."""
    name = f"scheduler lease {scheduler.identity}"
    out = await asyncio.to_thread(rabbit.ctl, "-q", "list_connections", "pid", "client_properties")
    pids = [line.split("\t")[0] for line in out.splitlines() if name in line]
    assert len(pids) == 1, out
    await asyncio.to_thread(rabbit.ctl, "close_connection", pids[0], "scheduler test")


async def test_each_slot_fires_once_with_its_id_time_and_arguments(
    rabbit: RabbitNode, queue_name: str
) -> None:
    app = new_app(rabbit, queue_name, every=60, args=(7,), kwargs={"full": True})
    clock = FakeClock(START)
    async with app, app.scheduler(clock=clock) as scheduler:
        await asleep_until(clock, slot(1))
        assert scheduler.is_leader
        # When the clock passes three slots (the second one 4 s late: still on time)
        await step(clock, slot(1), slot(2))
        await step(clock, slot(2, 4), slot(3))
        await step(clock, slot(3), slot(4))
        assert scheduler.statistics().fired == 3
    # Then each slot was submitted once, with a deterministic id and its slot time
    messages = await drain(rabbit.url, queue_name)
    assert minutes(messages) == [1, 2, 3]
    assert messages[0].id == "tests.tick@2030-01-01T00:01:00Z"
    assert all(m.args == (7,) and m.kwargs == {"full": True} for m in messages)
    assert all(m.reply_to is None for m in messages)


async def test_a_periodic_run_knows_its_slot(rabbit: RabbitNode, queue_name: str) -> None:
    app = new_app(rabbit, queue_name)
    seen: list[datetime | None] = []

    @app.periodic(every=timedelta(minutes=1), name="tests.tick")
    async def tick() -> None:
        seen.append(task_context().scheduled_at)

    clock = FakeClock(START)
    async with app, running_worker(app), app.scheduler(clock=clock):
        await asleep_until(clock, slot(1))
        clock.set(slot(1, 3))
        await wait_until(lambda: seen, what="the periodic run")
        # An ordinary submit of the same task has no slot
        await tick.submit()
        await wait_until(lambda: len(seen) == 2, what="the ordinary run")
    assert seen == [slot(1), None]


@missed_slots
async def test_slots_missed_while_no_scheduler_ran(
    rabbit: RabbitNode,
    queue_name: str,
    misfire: str,
    window: timedelta | None,
    expected: list[int],
) -> None:
    name = f"sched-{uuid.uuid4().hex[:10]}"
    options: dict[str, Any] = {"every": 60, "misfire": misfire, "misfire_window": window}
    # Given a scheduler that fired 00:01 and stopped
    first = new_app(rabbit, queue_name, name, **options)
    clock = FakeClock(START)
    async with first, first.scheduler(clock=clock):
        await asleep_until(clock, slot(1))
        await step(clock, slot(1), slot(2))
    # When the next one starts at 00:10:30 (slots 00:02 to 00:10 missed)
    second = new_app(rabbit, queue_name, name, **options)
    clock = FakeClock(slot(10, 30))
    async with second, second.scheduler(clock=clock):
        await asleep_until(clock, slot(11))
        await step(clock, slot(11), slot(12))
    # Then the missed slots follow the policy, and none fires twice
    assert minutes(await drain(rabbit.url, queue_name)) == expected


async def test_a_new_schedule_starts_with_its_next_slot(
    rabbit: RabbitNode, queue_name: str
) -> None:
    app = new_app(rabbit, queue_name, every=60, misfire="once")
    clock = FakeClock(slot(5, 30))
    async with app, app.scheduler(clock=clock):
        await asleep_until(clock, slot(6))
    assert await drain(rabbit.url, queue_name) == []


async def test_state_survives_a_broker_restart(rabbit: RabbitNode, queue_name: str) -> None:
    app = new_app(rabbit, queue_name, every=60, misfire="once")
    clock = FakeClock(START)
    async with app, app.scheduler(clock=clock, poll_interval=0.1) as scheduler:
        await asleep_until(clock, slot(1))
        await step(clock, slot(1), slot(2))
        # When the broker restarts while time moves on to 00:05:30
        await asyncio.to_thread(rabbit.restart)
        clock.set(slot(5, 30))
        # Then the scheduler leads again, knows 00:01 fired, and fires 00:05 once (misfire once)
        await wait_until(
            lambda: scheduler.statistics().terms == 2 and clock.sleeping_until == slot(6),
            timeout=60,
            what="leadership after the restart",
        )
        await step(clock, slot(6), slot(7))
    assert minutes(await drain(rabbit.url, queue_name)) == [1, 5, 6]


async def test_one_of_two_schedulers_fires_and_the_other_takes_over(
    rabbit: RabbitNode, queue_name: str
) -> None:
    name = f"sched-{uuid.uuid4().hex[:10]}"
    a = new_app(rabbit, queue_name, name, every=60)
    b = new_app(rabbit, queue_name, name, every=60)
    clock = FakeClock(START)
    async with a, b:
        one = a.scheduler(clock=clock, poll_interval=0.1)
        two = b.scheduler(clock=clock, poll_interval=0.1)
        async with one, two:
            await asleep_until(clock, slot(1))
            assert one.is_leader != two.is_leader
            for minute in (1, 2, 3):
                await step(clock, slot(minute), slot(minute + 1))
            # When the broker cuts the leader's lease connection (the fence)
            leader = one if one.is_leader else two
            await close_lease_connection(rabbit, leader)
            await wait_until(lambda: one.statistics().terms + two.statistics().terms == 2)
            # Then exactly one leads again and continues after 00:03
            await asleep_until(clock, slot(4))
            assert one.is_leader != two.is_leader
            for minute in (4, 5):
                await step(clock, slot(minute), slot(minute + 1))
            # When the leader stops, the other takes over
            leader = one if one.is_leader else two
            leader.stop()
            follower = two if leader is one else one
            await wait_until(lambda: follower.is_leader, what="the follower leading")
            await asleep_until(clock, slot(6))
            await step(clock, slot(6), slot(7))
    assert minutes(await drain(rabbit.url, queue_name)) == [1, 2, 3, 4, 5, 6]
    fired = one.statistics().fired + two.statistics().fired
    assert fired == 6


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_task_refused_at_the_fire_is_submitted_again_once(
    rabbit: RabbitNode, queue_name: str, queue_type: str
) -> None:
    """RabbitMQ refuses the slot's task (here a full ``reject-publish`` queue; on a 3.10
    cluster, a quorum queue whose recorded leader's node is down) and takes its record. In a
    transaction, a classic queue's refusal failed the commit (``partial tx completion``) and a
    quorum queue's was dropped under a ``commit-ok`` (rabbitmq-server #8966): either way the slot
    was recorded and never ran. With confirms, the refused task is published again: it runs,
    once."""
    async with aiormq.connect(rabbit.url) as connection:
        channel = await connection.channel()  # with confirms
        full = {"x-queue-type": queue_type, "x-max-length": 1, "x-overflow": "reject-publish"}
        await channel.queue_declare(queue_name, durable=True, arguments=full)
        for _ in range(5):  # fill it until RabbitMQ refuses a message
            try:
                await channel.basic_publish(b"in the way", routing_key=queue_name)
            except aiormq.exceptions.DeliveryError:
                break
        else:
            raise AssertionError("the queue never refused a message")
    app = new_app(rabbit, queue_name, every=60)
    state = state_queue_name(app.name, "tests.tick")
    clock = FakeClock(START)
    async with app, app.scheduler(clock=clock):
        await asleep_until(clock, slot(1))
        clock.set(slot(1))

        async def recorded() -> bool:
            return await ready(app, state) == 1

        # When the record of slot 1 is kept and its task refused, then room is made
        await wait_until(recorded, what="the record of slot 1")
        async with aiormq.connect(rabbit.url) as connection:
            channel = await connection.channel()
            await channel.queue_purge(queue_name)  # the task of slot 1 was refused: not in it
        # Then slot 1 is submitted (once), and the next slot fires as usual
        await asleep_until(clock, slot(2))
        assert minutes(await drain(rabbit.url, queue_name)) == [1]
        await step(clock, slot(2), slot(3))
    assert minutes(await drain(rabbit.url, queue_name)) == [2]


async def test_skip_if_running_waits_for_the_previous_run(
    rabbit: RabbitNode, queue_name: str
) -> None:
    app = new_app(rabbit, queue_name)
    release = asyncio.Event()
    runs: list[datetime | None] = []

    @app.periodic(every=60, name="tests.tick", skip_if_running=True)
    async def tick() -> None:
        runs.append(task_context().scheduled_at)
        await release.wait()

    clock = FakeClock(START)
    async with app, running_worker(app):
        async with app.scheduler(clock=clock) as first:
            await asleep_until(clock, slot(1))
            await step(clock, slot(1), slot(2))
            await wait_until(lambda: runs == [slot(1)], what="the first run")
            # When the next slot comes while the run goes on, it is skipped
            await step(clock, slot(2), slot(3))
            assert first.statistics().skipped_running == 1
        # And a new leader knows the run is still going (from RabbitMQ, not from memory)
        async with app.scheduler(clock=clock) as second:
            await asleep_until(clock, slot(3))
            await step(clock, slot(3), slot(4))
            assert second.statistics().skipped_running == 2  # 00:02 (on time again) and 00:03
            # When the run finishes, the next slot fires
            release.set()
            done = done_queue_name(app.name, "tests.tick")
            await wait_until(lambda: ready(app, done), what="the outcome in the done queue")
            await step(clock, slot(4), slot(5))
            await wait_until(lambda: len(runs) == 2, what="the second run")
    assert runs == [slot(1), slot(4)]
