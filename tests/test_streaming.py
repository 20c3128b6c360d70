"""Progress events and generator streams, on RabbitMQ and on the in-memory broker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aioqueue import (
    App,
    EncodeError,
    Retry,
    RetryPolicy,
    Settings,
    TaskContext,
    TaskError,
    task_context,
)
from aioqueue.streams import Progress, Result
from tests.conftest import running_worker, wait_until


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_progress_then_result_in_order(make_any_app: Any, kind: str) -> None:
    app: App = make_any_app()
    threads: list[str] = []

    @app.task(name="s.job")
    async def job(steps: int) -> str:
        for i in range(1, steps + 1):
            await task_context().progress({"done": i, "of": steps})
        return "finished"

    @app.task(name="s.thread_job")
    def thread_job(steps: int) -> str:  # a plain function: progress from a worker thread
        threads.append(threading.current_thread().name)
        for i in range(1, steps + 1):
            task_context().progress_sync({"done": i, "of": steps})  # returns once confirmed
        return "finished"

    async with app, running_worker(app):
        handle = await (job if kind == "async" else thread_job).submit(3)
        events = [event async for event in handle.events()]
    if kind == "thread":
        assert threads[0].startswith("aioqueue-task")  # it ran in the worker's thread pool
    assert events == [
        Progress(1, {"done": 1, "of": 3}),
        Progress(2, {"done": 2, "of": 3}),
        Progress(3, {"done": 3, "of": 3}),
        Result("finished"),
    ]


async def test_progress_sync_reports_an_encode_error_to_the_thread(make_any_app: Any) -> None:
    app: App = make_any_app()
    caught: list[BaseException] = []

    @app.task(name="s.thread_bad")
    def thread_bad() -> str:
        task_context().progress_sync("first")
        try:
            task_context().progress_sync({"not": {1, 2}})  # a set is not JSON-native
        except EncodeError as exc:
            caught.append(exc)
        return "went on"

    async with app, running_worker(app):
        handle = await thread_bad.submit()
        events = [event async for event in handle.events()]
    assert events == [Progress(1, "first"), Result("went on")]
    assert len(caught) == 1 and "progress data" in str(caught[0])


async def test_progress_sync_on_the_event_loop_is_refused(make_any_app: Any) -> None:
    app: App = make_any_app()

    @app.task(name="s.loop_blocker")
    async def loop_blocker() -> None:
        task_context().progress_sync("would block the loop")

    async with app, running_worker(app):
        handle = await loop_blocker.submit()
        with pytest.raises(TaskError, match=r"RuntimeError: .*progress_sync\(\) called on"):
            await handle.result(timeout=30)


def test_progress_sync_outside_a_worker_sends_nothing() -> None:
    TaskContext(id="x", name="local").progress_sync({"ignored": True})


async def test_events_raise_the_task_error_last(make_any_app: Any) -> None:
    app: App = make_any_app()

    @app.task(name="s.half")
    async def half() -> None:
        await task_context().progress("halfway")
        raise ValueError("then it broke")

    async with app, running_worker(app):
        handle = await half.submit()
        seen: list[Any] = []
        with pytest.raises(TaskError, match="then it broke"):
            async for event in handle.events():
                seen.append(event)
    assert seen == [Progress(1, "halfway")]


async def test_generator_items_stream_in_order_and_the_result_is_their_count(
    make_any_app: Any,
) -> None:
    app: App = make_any_app()

    @app.task(name="s.count")
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with app, running_worker(app):
        handle = await count.submit(50)
        assert [item async for item in handle.stream()] == list(range(50))
        assert await handle.result(timeout=30) == 50


async def test_a_fast_generator_cannot_flood_a_slow_reader_nor_stall_other_handles(
    make_any_app: Any,
) -> None:
    app: App = make_any_app(settings=Settings(event_buffer=20))

    @app.task(name="s.flood")
    async def flood(n: int) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            yield {"i": i}

    @app.task(name="s.ping")
    async def ping() -> str:
        return "pong"

    async with app, running_worker(app):
        handle = await flood.submit(1000)
        # Given a reader that has not read anything while the generator produced everything
        await handle.result(timeout=120)
        # Then at most the bound waits in this process, and other handles are not stalled
        assert await (await ping.submit()).result(timeout=30) == "pong"
        reader: Any = handle._stream
        assert reader.max_unacked <= 20
        # and every item still arrives, in order, once
        items = [item["i"] async for item in handle.stream()]
    assert items == list(range(1000))


async def test_a_retried_generator_repeats_nothing(make_any_app: Any) -> None:
    app: App = make_any_app()

    @app.task(name="s.again", retry=RetryPolicy(max_attempts=2, backoff=0.05, jitter=0))
    async def again() -> AsyncIterator[str]:
        for letter in "abc":
            yield letter
        if task_context().attempt == 1:
            raise Retry(delay=0.05)
        for letter in "de":
            yield letter

    async with app, running_worker(app):
        handle = await again.submit()
        assert [x async for x in handle.stream()] == ["a", "b", "c", "d", "e"]
        assert await handle.result(timeout=30) == 5


async def test_a_failing_generator_streams_what_it_yielded_then_raises(
    make_any_app: Any,
) -> None:
    app: App = make_any_app()

    @app.task(name="s.broken")
    async def broken() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise RuntimeError("out of data")

    async with app, running_worker(app):
        handle = await broken.submit()
        got: list[int] = []
        with pytest.raises(TaskError, match="out of data"):
            async for item in handle.stream():
                got.append(item)
    assert got == [1, 2]


async def test_slow_progress_reader_keeps_only_the_newest(make_any_app: Any) -> None:
    app: App = make_any_app(settings=Settings(event_buffer=5))
    release = asyncio.Event()

    @app.task(name="s.chatty")
    async def chatty() -> int:
        for i in range(100):
            await task_context().progress(i)
        await release.wait()
        return 100

    async with app, running_worker(app):
        handle = await chatty.submit()
        sink: Any = handle._sink
        await wait_until(lambda: sink.last_seq == 100, what="all progress received")
        release.set()
        events = [e async for e in handle.events()]
    assert [e.data for e in events if isinstance(e, Progress)] == [95, 96, 97, 98, 99]
    assert events[-1] == Result(100)
