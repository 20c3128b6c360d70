"""Task events on the stream ``aioqueue.events``, against the tests' RabbitMQ node.

The stream is one per vhost: each test reads only the events of its own task ids, or works in
a vhost of its own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from aioqueue import App, RetryPolicy, TaskError, TaskNotFoundError
from aioqueue.events import Event, EventReader
from aioqueue.metrics import PrometheusObserver
from aioqueue.topology import EVENTS_STREAM
from aioqueue.worker.events import TaskLog
from tests.conftest import running_worker
from tests.rabbit import RabbitNode
from tests.waiting import wait_until


@pytest.fixture
def vhost_url(rabbit: RabbitNode) -> Iterator[str]:
    vhost = f"events-{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    try:
        yield f"{rabbit.url}{vhost}"
    finally:
        rabbit.delete_vhost(vhost)


async def events_of(
    app: App, ids: set[str], *, since: float | str, until: Callable[[list[Event]], bool]
) -> list[Event]:
    """The events of tasks ``ids`` read from ``since`` until ``until(events)`` holds."""
    seen: list[Event] = []
    async with EventReader(app, since=since) as reader:
        deadline = time.monotonic() + 30
        while not until(seen):
            assert time.monotonic() < deadline, f"events so far: {[e.type for e in seen]}"
            event = await reader.get(timeout=max(0.1, deadline - time.monotonic()))
            if event is not None and event.get("id") in ids:
                seen.append(event)
    return seen


def types(events: list[Event], task_id: str) -> list[str]:
    return [e.type for e in events if e.get("id") == task_id]


def has_end(task_ids: list[str]) -> Callable[[list[Event]], bool]:
    """Every id has its last event: succeeded, or dead-lettered."""

    def done(events: list[Event]) -> bool:
        ends = {e.get("id") for e in events if e.type in ("task-succeeded", "task-dead-lettered")}
        return all(i in ends for i in task_ids)

    return done


async def test_events_of_succeeded_failed_retried_and_dead_lettered_tasks(
    make_app: Callable[..., App],
) -> None:
    # Given tasks that succeed, fail, fail once then succeed, and a name no worker has
    app = make_app()
    calls: dict[str, int] = {}

    @app.task(name="ev.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="ev.boom")
    async def boom() -> None:
        raise ValueError("boom")

    @app.task(name="ev.flaky", retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=False))
    async def flaky(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        if calls[key] == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    async with app, running_worker(app) as worker:
        since = time.time()
        # When each runs
        ok = await add.submit(2, 3)
        bad = await boom.submit()
        retried = await flaky.submit("k")
        unknown = await app.submit("ev.nobody")
        assert await ok.result(timeout=30) == 5
        with pytest.raises(TaskError):
            await bad.result(timeout=30)
        assert await retried.result(timeout=30) == "ok"
        with pytest.raises(TaskNotFoundError):
            await unknown.result(timeout=30)
        ids = [ok.id, bad.id, retried.id, unknown.id]
        events = await events_of(app, set(ids), since=since, until=has_end(ids))
        # Then each task's events come in order with the contract's fields
        assert types(events, ok.id) == ["task-received", "task-started", "task-succeeded"]
        assert types(events, bad.id) == [
            "task-received",
            "task-started",
            "task-failed",
            "task-dead-lettered",
        ]
        assert types(events, retried.id) == [
            "task-received",
            "task-started",
            "task-retried",
            "task-received",
            "task-started",
            "task-succeeded",
        ]
        assert types(events, unknown.id) == ["task-received", "task-dead-lettered"]
        by = {(e.get("id"), e.type, e.get("attempt")): e for e in events}
        received = by[(ok.id, "task-received", 1)]
        assert received.get("name") == "ev.add"
        assert received.get("queue") == app.default_queue
        assert received.get("args") == "2, 3"
        assert received.worker == worker.identity
        assert since - 1 <= received.time <= time.time()
        succeeded = by[(ok.id, "task-succeeded", 1)]
        assert succeeded.get("result") == "5"
        assert succeeded.get("duration") >= 0
        failed = by[(bad.id, "task-failed", 1)]
        assert failed.get("error") == "ValueError: boom"
        assert "raise ValueError" in failed.get("traceback")
        dead = next(e for e in events if e.type == "task-dead-lettered" and e.get("id") == bad.id)
        assert dead.get("reason") == "failed"
        retry = by[(retried.id, "task-retried", 1)]
        assert retry.get("retry_in") >= 0
        assert retry.get("error") == "RuntimeError: first attempt fails"
        assert by[(retried.id, "task-succeeded", 2)].get("result") == "'ok'"
        nobody = next(e for e in events if e.get("id") == unknown.id and "dead" in e.type)
        assert nobody.get("reason") == "not_found"


async def test_a_task_waiting_for_a_slot_is_received_before_it_starts(
    make_app: Callable[..., App],
) -> None:
    # Given a worker running one task at a time that holds two (concurrency 1, prefetch 2),
    # busy with a task that waits for a gate
    app = make_app()
    gate = asyncio.Event()

    @app.task(name="ev.gated")
    async def gated(key: str) -> str:
        await gate.wait()
        return key

    async with app, running_worker(app, concurrency=1, prefetch=2) as worker:
        since = time.time()
        first = await gated.submit("first")
        await wait_until(lambda: worker.statistics().running == 1, what="the first to run")
        # When a second task is delivered while the slot is taken
        second = await gated.submit("second")
        # Then its task-received is published while it waits: a reader sees it queued
        events = await events_of(
            app, {second.id}, since=since, until=lambda seen: bool(types(seen, second.id))
        )
        assert types(events, second.id) == ["task-received"]
        assert worker.statistics().running == 1 and not gate.is_set()
        # and once the slot is free it starts and succeeds
        gate.set()
        assert [await h.result(timeout=30) for h in (first, second)] == ["first", "second"]
        events = await events_of(app, {second.id}, since=since, until=has_end([second.id]))
        assert types(events, second.id) == ["task-received", "task-started", "task-succeeded"]


async def test_a_reader_started_later_replays_history(make_app: Callable[..., App]) -> None:
    # Given a task that ran before any reader existed
    app = make_app()

    @app.task(name="ev.echo")
    async def echo(value: str) -> str:
        return value

    async with app:
        since = time.time()
        async with running_worker(app):
            handle = await echo.submit("x" * 5000)
            await handle.result(timeout=30)
        # When a reader starts afterwards from a time before it
        events = await events_of(app, {handle.id}, since=since, until=has_end([handle.id]))
        # Then it gets the task's history, with bounded reprs
        assert types(events, handle.id) == ["task-received", "task-started", "task-succeeded"]
        assert len(events[0].get("args")) == 1000
        assert len(events[-1].get("result")) == 1000
        assert all(e.offset is not None for e in events)
        # and a reader from "first" too; one from "next" sees none of it
        first = await events_of(app, {handle.id}, since="first", until=has_end([handle.id]))
        assert [e.type for e in first] == [e.type for e in events]
        async with EventReader(app, since="next") as reader:
            later = await reader.drain(idle=0.5)
        assert all(e.get("id") != handle.id for e in later)


async def test_a_sensitive_task_leaves_args_result_and_progress_out(
    make_app: Callable[..., App],
) -> None:
    app = make_app()

    @app.task(name="ev.login", sensitive=True)
    async def login(password: str) -> str:
        from aioqueue import task_context

        await task_context().progress({"password": password})
        return password

    async with app, running_worker(app):
        since = time.time()
        handle = await login.submit("hunter2")
        assert await handle.result(timeout=30) == "hunter2"
        events = await events_of(app, {handle.id}, since=since, until=has_end([handle.id]))
    assert types(events, handle.id) == [
        "task-received",
        "task-started",
        "task-progress",
        "task-succeeded",
    ]
    for event in events:
        assert "hunter2" not in repr(event.to_json())
        assert not {"args", "result", "progress"} & set(event.fields)


async def test_a_missing_stream_never_fails_a_task_and_counts_drops(vhost_url: str) -> None:
    # Given a worker whose event stream is deleted under it
    app = App("tests", broker_url=vhost_url, default_queue="ev.missing")
    other = App("tests", broker_url=vhost_url)

    @app.task(name="ev.add")
    async def add(x: int, y: int) -> int:
        return x + y

    metrics = PrometheusObserver()
    async with app, other, running_worker(app, observers=[TaskLog(), metrics]) as worker:
        assert worker.events is not None
        await other.broker.delete_queue(EVENTS_STREAM)
        # When tasks run
        handles = [await add.submit(i, i) for i in range(20)]
        # Then each succeeds, and the events that found no stream are counted as dropped
        assert [await h.result(timeout=30) for h in handles] == [2 * i for i in range(20)]
        publisher = worker.events.publisher
        await wait_until(lambda: publisher.statistics().dropped > 0, what="drops counted")
        dropped = metrics.registry.get_sample_value("aioqueue_events_dropped_total")
        assert dropped == publisher.statistics().dropped


async def test_the_reader_skips_and_counts_what_it_cannot_read(
    make_app: Callable[..., App],
) -> None:
    # Given unreadable batches published raw to the stream, then a valid one
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from pamqp import commands as spec

    from aioqueue.message.events import encode_batch

    app = make_app()
    marker = uuid.uuid4().hex
    bodies: list[bytes] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300), st.just(b"[1]"), st.just(b'[{"type": 1}]')))
    def collect(body: bytes) -> None:
        bodies.append(body)

    collect()
    async with app, EventReader(app, since="next") as reader:
        for body in bodies:
            await app.broker.publish(EVENTS_STREAM, body, spec.Basic.Properties())
        valid = Event("task-received", time.time(), "fuzz:1", {"id": marker})
        await app.broker.publish(EVENTS_STREAM, encode_batch([valid]), spec.Basic.Properties())
        # When it reads them
        got: list[Event] = []
        while not any(e.get("id") == marker for e in got):
            event = await reader.get(timeout=30)
            assert event is not None, "the valid batch never came"
            got.append(event)
    # Then it skipped the unreadable ones (some random bytes happen to be an empty array)
    readable = sum(1 for b in bodies if _readable(b))
    assert reader.skipped == len(bodies) - readable
    assert reader.skipped > 0


def _readable(body: bytes) -> bool:
    from aioqueue.errors import DecodeError
    from aioqueue.message.events import decode_batch

    try:
        decode_batch(body, 1 << 20)
    except DecodeError:
        return False
    return True


async def test_memory_transport_has_the_same_reader() -> None:
    import aioqueue.testing as testing

    url = f"memory://events-{uuid.uuid4().hex[:8]}"
    app = App("tests", broker_url=url)

    @app.task(name="ev.mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    try:
        async with app, running_worker(app):
            since = time.time()
            handle = await mul.submit(6, 7)
            await testing.run_until_idle(app)
            assert await handle.result(timeout=5) == 42
            events = await events_of(app, {handle.id}, since=since, until=has_end([handle.id]))
            assert types(events, handle.id) == ["task-received", "task-started", "task-succeeded"]
            assert events[-1].get("result") == "42"
            async with EventReader(app, since="first") as reader:
                kinds = [e.type for e in await reader.drain(idle=0.3)]
            assert kinds[0] == "worker-online"
    finally:
        testing.reset(url)


async def test_events_off_publish_nothing(make_app: Callable[..., App]) -> None:
    app = make_app()

    @app.task(name="ev.quiet")
    async def quiet() -> int:
        return 1

    async with app, running_worker(app, events=False) as worker:
        since = time.time()
        handle = await quiet.submit()
        assert await handle.result(timeout=30) == 1
        assert worker.events is None
        async with EventReader(app, since=since) as reader:
            seen = await reader.drain(idle=0.5)
        assert all(e.get("id") != handle.id for e in seen)


async def test_a_reader_resumes_after_a_broker_restart_without_repeats(
    rabbit: RabbitNode, make_app: Callable[..., App]
) -> None:
    # Given a reader that has read a task's events
    app = make_app()
    reader_app = make_app()

    @app.task(name="ev.twice")
    async def twice(x: int) -> int:
        return 2 * x

    async with app, reader_app, running_worker(app):
        since = time.time()
        first = await twice.submit(1)
        await first.result(timeout=30)
        async with EventReader(reader_app, since=since) as reader:
            seen: list[Event] = []

            async def read_until(task_id: str) -> None:
                while not any(e.type == "task-succeeded" and e.get("id") == task_id for e in seen):
                    event = await reader.get(timeout=60)
                    assert event is not None, f"no events of {task_id}"
                    seen.append(event)

            await read_until(first.id)
            # When the broker restarts, and another task runs
            await asyncio.to_thread(rabbit.restart)
            second = await twice.submit(2)
            assert await second.result(timeout=60) == 4
            # Then the reader goes on with the new events, and repeats none of the old
            await read_until(second.id)
    mine = [(e.type, e.get("id"), e.get("attempt")) for e in seen if e.get("id")]
    assert len(mine) == len(set(mine)), mine
    assert types(seen, second.id) == ["task-received", "task-started", "task-succeeded"]
