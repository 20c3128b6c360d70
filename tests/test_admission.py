"""Submits take a turn before their message is built: at most ``max_inflight_publishes`` at once.

A burst of submits (``asyncio.gather`` of thousands) used to build every message before the
first one left: all of them ran up to the wait for a publish slot in one event-loop iteration.
Now each waits for its turn first (first come, first served, within its publish deadline), so
the first messages reach RabbitMQ while the rest wait unbuilt. Against the real broker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import pytest

from aioqueue import App, PublishError, Settings
from aioqueue import testing as aioqueue_testing
from aioqueue.admission import Deadlines, Slots
from tests.conftest import running_worker
from tests.rabbit import RabbitNode
from tests.waiting import wait_until


def count_builds(app: App) -> dict[str, int]:
    """Wrap the app's ``Producer.publish`` (where a task's message is built and published):
    how many run at once now, and at most."""
    producer = app.producer
    original = producer.publish
    seen = {"now": 0, "peak": 0, "calls": 0}

    async def publish(*args: Any, **kwargs: Any) -> None:
        seen["now"] += 1
        seen["calls"] += 1
        seen["peak"] = max(seen["peak"], seen["now"])
        try:
            await original(*args, **kwargs)
        finally:
            seen["now"] -= 1

    producer.publish = publish  # type: ignore[method-assign]
    return seen


def one_at_a_time(rabbit: RabbitNode, queue_name: str, publish_timeout: float) -> App:
    """An app with one publish in flight at most."""
    return App(
        "tests-client",
        broker_url=rabbit.url,
        default_queue=queue_name,
        settings=Settings(max_inflight_publishes=1, publish_timeout=publish_timeout),
    )


async def warm_then_hold(app: App) -> tuple[dict[str, int], Slots]:
    """One submit to warm up (queue declared), then the builds counted from here and the
    app's one turn held: (the count, the gate)."""
    await app.submit_with_options("tests.x", ignore_result=True)
    seen = count_builds(app)
    return seen, await hold_the_turn(app)


async def hold_the_turn(app: App) -> Slots:
    """Take the app's one turn (as a publish RabbitMQ does not confirm would hold it); the
    gate, to release it."""
    loop = asyncio.get_running_loop()
    gate = app.producer._admission(loop)
    await gate.acquire(loop.time() + 1)
    return gate


async def test_a_burst_beyond_the_cap_waits_its_turn_and_loses_nothing(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given an app whose cap on publishes in flight is 3, with a worker
    app = App(
        "tests",
        broker_url=rabbit.url,
        default_queue=queue_name,
        settings=Settings(max_inflight_publishes=3),
    )

    @app.task(name=f"{queue_name}.double")
    async def double(i: int) -> int:
        return 2 * i

    async with app, running_worker(app):
        await double.submit(0)  # warm: queue declared, replies subscribed
        seen = count_builds(app)
        # When 60 are submitted at once
        handles = await asyncio.gather(*(double.submit(i) for i in range(60)))
        # Then never more than 3 were being built and published at once (and 3 were)
        assert seen == {"now": 0, "peak": 3, "calls": 60}
        # And every one ran, with its own result
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        assert results == [2 * i for i in range(60)]


async def test_a_submit_waiting_for_its_turn_gives_up_at_its_publish_deadline(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given an app with one publish in flight at most, whose turn is held (as by a publish
    # RabbitMQ does not confirm)
    app = one_at_a_time(rabbit, queue_name, publish_timeout=2.0)
    async with app:
        seen, gate = await warm_then_hold(app)
        # When a submit waits for that turn
        started = time.monotonic()
        with pytest.raises(PublishError, match="not confirmed within 2s"):
            await app.submit_with_options("tests.x", ignore_result=True)
        # Then it gives up at its publish deadline, its message never built
        assert 1.5 < time.monotonic() - started < 15
        assert seen["calls"] == 0
        # And once the turn is free the next submit goes through
        gate.release()
        await app.submit_with_options("tests.x", ignore_result=True)
        assert seen == {"now": 0, "peak": 1, "calls": 1}
        assert await app.broker.queue_depth(queue_name) == (2, 0)  # the warm one and this


async def test_a_burst_whose_queue_nacks_ends_within_the_deadline_and_frees_its_turns(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given an app with one publish in flight at most, and a queue that nacks (full)
    full = f"{queue_name}.full"
    args = {"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"}
    app = one_at_a_time(rabbit, queue_name, publish_timeout=2.0)
    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(full, durable=True, arguments=args)
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=full)
        try:
            async with app:
                broker: Any = app.broker
                await broker.declare_queue(full, args)
                # When three submits to it are made at once
                started = time.monotonic()
                done = await asyncio.gather(
                    *(
                        app.submit_with_options("tests.x", queue=full, ignore_result=True)
                        for _ in range(3)
                    ),
                    return_exceptions=True,
                )
                # Then each ends with a PublishError within about its deadline, none hangs
                assert all(isinstance(d, PublishError) for d in done), done
                assert 1.5 < time.monotonic() - started < 15
                # And the turn is free again: a submit to a queue with room goes through
                await app.submit_with_options("tests.x", ignore_result=True)
        finally:
            await queue.delete(if_unused=False, if_empty=False)


async def test_a_submit_beyond_the_cap_checks_its_arguments_in_its_turn_and_gives_it_back(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given an app with one publish in flight at most, whose turn is held
    app = one_at_a_time(rabbit, queue_name, publish_timeout=20.0)

    @app.task(name=f"{queue_name}.one")
    async def one(i: int) -> int:
        return i

    async with app:
        await one.submit(0)  # warm
        seen = count_builds(app)
        gate = await hold_the_turn(app)
        # When a burst waits for it: good submits, one with arguments that do not fit the
        # task, one with an argument that is not JSON, one with a bad countdown
        burst = [one.submit(i) for i in range(1, 4)]
        burst += [
            one.submit("a", "b"),
            one.submit(object()),
            one.submit_with_options((4,), countdown=-1),
        ]
        waiting = asyncio.gather(*burst, return_exceptions=True)
        await asyncio.sleep(0)
        assert seen["calls"] == 0 and not waiting.done()  # all wait, none checked or built
        # Then, once the turn is free, each gets its own outcome in its turn
        gate.release()
        done = await asyncio.wait_for(waiting, 30)
        assert [type(d).__name__ for d in done] == [
            "ResultHandle", "ResultHandle", "ResultHandle", "TypeError", "EncodeError",
            "ValueError",
        ]  # fmt: skip
        assert seen == {"now": 0, "peak": 1, "calls": 3}  # the bad ones were never built
        # And no turn was kept by the refused ones: the next submit goes straight through
        await asyncio.wait_for(one.submit(5), 30)
        assert gate._free == 1


@pytest.mark.parametrize("cap", [1, 1000])
def test_each_event_loop_has_its_own_turns(cap: int) -> None:
    # Given an in-memory app used from two event loops in turn (as tests do)
    url = f"memory://turns-{cap}"
    app = App("tests", broker_url=url, settings=Settings(max_inflight_publishes=cap))

    async def submit_some() -> int:
        async with app:
            handles = await asyncio.gather(
                *(app.submit_with_options("t.x", ignore_result=True) for _ in range(5))
            )
            return len(handles)

    # When each loop submits a burst, Then each goes through (no turn held by a loop gone)
    try:
        for _ in range(2):
            loop = asyncio.new_event_loop()
            try:
                assert loop.run_until_complete(submit_some()) == 5
            finally:
                loop.close()
    finally:
        aioqueue_testing.reset(url)


async def test_a_submit_cancelled_while_waiting_for_its_turn_passes_it_on(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given an app with one publish in flight at most, whose turn is held, and two submits
    # waiting for it in line
    app = one_at_a_time(rabbit, queue_name, publish_timeout=20.0)
    async with app:
        seen, gate = await warm_then_hold(app)
        first = asyncio.ensure_future(app.submit_with_options("tests.x", ignore_result=True))
        second = asyncio.ensure_future(app.submit_with_options("tests.x", ignore_result=True))
        await wait_until(lambda: len(gate._waiters) == 2, timeout=10)
        # When the turn is handed to the first, and its caller cancels it before it runs on
        gate.release()
        first.cancel()
        # Then the first ends cancelled, never built, and the second gets the turn
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 30)
        assert seen == {"now": 0, "peak": 1, "calls": 1}
        # And no turn is kept: the next submit goes straight through, the gate whole again
        await asyncio.wait_for(app.submit_with_options("tests.x", ignore_result=True), 30)
        assert gate._free == 1 and not gate._waiters
        assert await app.broker.queue_depth(queue_name) == (3, 0)


async def test_slots_handed_out_first_come_first_served_without_a_coroutine() -> None:
    # Given a cap of one, taken (`try_acquire` takes a free slot at once, no coroutine)
    loop = asyncio.get_running_loop()
    slots = Slots(1, Deadlines())
    assert slots.try_acquire() is True
    assert slots.try_acquire() is False
    # When two wait in line with `enter`, and a third waits with a deadline already past
    first, second = slots.enter(loop.time() + 30), slots.enter(loop.time() + 30)
    late = slots.enter(loop.time() - 1)
    assert first is not None and second is not None and late is not None
    with pytest.raises(asyncio.CancelledError):
        await late  # its deadline cancels it
    assert slots.timed_out(late) is True
    # Then a release goes to the first in line, and the next to the second
    slots.release()
    assert first.done() and not second.done()
    slots.release()
    assert second.done()
    # And with nobody waiting, a release frees the slot for `try_acquire` or `enter`
    slots.release()
    assert slots.enter(loop.time() + 30) is None
    assert slots.try_acquire() is False
