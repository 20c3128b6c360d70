"""The core loop against the tests' own RabbitMQ node, with in-process workers."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest

from aioqueue import (
    AioqueueError,
    App,
    DecodeError,
    EncodeError,
    ResultUnavailableError,
    TaskError,
    TaskNotFoundError,
    TaskTimeoutError,
    task_context,
)
from aioqueue.results import ResultHandle
from aioqueue.settings import Settings
from aioqueue.testing import memory_broker
from tests.conftest import running_worker, wait_until
from tests.rabbit import RabbitNode


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, Any]
    message_id: str | None


async def get_dead_letter(url: str, queue: str, timeout: float = 30) -> Any:
    """The first message in ``queue`` (a DLQ), waiting for it with a deadline."""
    if url.startswith("memory://"):
        broker = memory_broker(url, Settings())
        body, props = (await wait_until(lambda: broker.messages(queue), timeout=timeout))[0]
        return DeadLetter(body, dict(props.headers or {}), props.message_id)
    async with await aio_pika.connect(url) as conn:
        channel = await conn.channel()
        q = await channel.get_queue(queue, ensure=True)
        message = await wait_until(
            lambda: q.get(fail=False), timeout=timeout, what=f"a message in {queue}"
        )
        await message.ack()
        return message  # type: ignore[no-any-return]


async def test_round_trip_returns_the_value(make_any_app: Any) -> None:
    # Given an async task and a worker
    app: App = make_any_app()

    @app.task(name="t.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with app, running_worker(app):
        # When it is submitted
        handle = await add.submit(2, 3)
        # Then the handle has an id and the result arrives
        assert isinstance(handle.id, str) and handle.id
        assert await handle.result(timeout=30) == 5
        assert handle.done()


async def test_many_concurrent_round_trips_each_get_their_own_result(make_any_app: Any) -> None:
    app: App = make_any_app()

    @app.task(name="t.square")
    async def square(x: int) -> int:
        return x * x

    async with app, running_worker(app, concurrency=50):
        handles = await asyncio.gather(*(square.submit(i) for i in range(500)))
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        assert results == [i * i for i in range(500)]
        assert len({h.id for h in handles}) == 500


async def test_plain_functions_run_in_threads_with_a_capacity_limit(make_any_app: Any) -> None:
    app: App = make_any_app()
    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    gate = threading.Event()

    @app.task(name="t.blocking")
    def blocking(i: int) -> str:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        gate.wait(30)
        with lock:
            state["now"] -= 1
        return threading.current_thread().name

    async with app, running_worker(app, concurrency=10, threads=3):
        handles = [await blocking.submit(i) for i in range(6)]
        await wait_until(lambda: state["now"] == 3, what="3 threads busy")
        gate.set()
        names = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert state["max"] == 3
    assert all(name.startswith("aioqueue-task") for name in names)


async def test_task_context_in_async_and_thread_tasks(make_any_app: Any) -> None:
    app: App = make_any_app()

    @app.task(name="t.ctx_async")
    async def ctx_async() -> list[Any]:
        c = task_context()
        return [c.id, c.name, c.attempt, c.redelivered, c.scheduled_at]

    @app.task(name="t.ctx_thread")
    def ctx_thread() -> list[Any]:
        c = task_context()
        return [c.id, c.name, c.attempt, c.redelivered, c.scheduled_at]

    async with app, running_worker(app):
        for task in (ctx_async, ctx_thread):
            handle = await task.submit()
            assert await handle.result(timeout=30) == [handle.id, task.name, 1, False, None]
    with pytest.raises(AioqueueError):
        task_context()


async def test_remote_error_carries_type_message_and_traceback(make_any_app: Any) -> None:
    app: App = make_any_app()

    @app.task(name="t.fail")
    async def fail(what: str) -> None:
        raise KeyError(what)

    async with app, running_worker(app):
        handle = await fail.submit("missing-key")
        with pytest.raises(TaskError) as info:
            await handle.result(timeout=30)
    err = info.value
    assert type(err) is TaskError
    assert err.type_name == "KeyError"
    assert "missing-key" in err.message
    assert str(err).startswith("KeyError: 'missing-key'")
    assert "raise KeyError(what)" in err.traceback
    assert (err.task_name, err.task_id) == ("t.fail", handle.id)


async def test_failed_task_is_dead_lettered_with_reason(make_any_app: Any, queue_name: str) -> None:
    app: App = make_any_app()

    @app.task(name="t.explode")
    async def explode() -> None:
        raise RuntimeError("kaboom")

    async with app, running_worker(app):
        handle = await explode.submit()
        with pytest.raises(TaskError):
            await handle.result(timeout=30)
    dead = await get_dead_letter(app.broker_url, f"{queue_name}.dlq")
    assert dead.message_id == handle.id
    assert dead.headers["aioqueue-dead-reason"] == "failed"
    assert dead.headers["aioqueue-dead-error"] == "RuntimeError: kaboom"
    assert dead.headers["aioqueue-dead-queue"] == queue_name
    assert "aioqueue-dead-worker" in dead.headers and "aioqueue-dead-at" in dead.headers


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_task_timeout(make_any_app: Any, kind: str) -> None:
    app: App = make_any_app()
    release = threading.Event()

    if kind == "async":

        @app.task(name="t.slow", timeout=0.3)
        async def slow() -> str:
            await asyncio.sleep(60)  # sleep-ok: outlives its timeout on purpose
            return "late"
    else:

        @app.task(name="t.slow", timeout=0.3)
        def slow() -> str:
            release.wait(60)
            return "late"

    async with app, running_worker(app):
        handle = await slow.submit()
        with pytest.raises(TaskTimeoutError) as info:
            await handle.result(timeout=30)
        release.set()
    assert isinstance(info.value, TaskError)
    assert "timeout of 0.3s" in str(info.value)


async def test_submit_checks_signature_and_json_before_publishing(
    make_app: Any, rabbit: RabbitNode, queue_name: str
) -> None:
    app: App = make_app()

    @app.task(name="t.typed")
    async def typed(x: int, *, flag: bool = False) -> int:
        return x

    async with app:
        with pytest.raises(TypeError):
            await typed.submit()  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            await typed.submit(1, 2)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            await typed.submit(1, nope=3)  # type: ignore[call-arg]
        for bad in (object(), {1: "int key"}, float("nan"), b"bytes", {"deep": [{1, 2}]}):
            with pytest.raises(EncodeError) as info:
                await typed.submit(bad)  # type: ignore[arg-type]
            assert isinstance(info.value, TypeError) and isinstance(info.value, AioqueueError)
        with pytest.raises(EncodeError):
            await app.submit("t.typed", 1, flag=time)
        # a good submit declares the queue; nothing from the bad ones is in it
        await typed.submit(7)
    stats = rabbit.queue_stats()
    assert stats[queue_name]["messages"] == 1


def gated_task(app: App, name: str) -> tuple[Any, asyncio.Event]:
    """A task of ``app`` that returns "done" once the event it comes with is set."""
    gate = asyncio.Event()

    @app.task(name=name)
    async def wait() -> str:
        await gate.wait()
        return "done"

    return wait, gate


async def test_result_timeout_raises_builtin_timeout_and_handle_stays_usable(
    make_any_app: Any,
) -> None:
    app: App = make_any_app()
    wait, gate = gated_task(app, "t.wait")
    async with app, running_worker(app):
        handle = await wait.submit()
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.2)
        assert not handle.done()
        gate.set()
        assert await handle.result(timeout=30) == "done"


async def test_a_cancelled_or_timed_out_result_wait_leaves_the_handle_as_it_was(
    make_any_app: Any,
) -> None:
    """`result` waits as ``wait_for(shield(...))`` would: cancelling a wait, or its timeout,
    neither cancels the handle nor leaves a callback of that wait on the handle's future."""
    app: App = make_any_app()
    wait, gate = gated_task(app, "t.wait_cancelled")
    async with app, running_worker(app):
        handle = await wait.submit()
        outcome = handle._future
        assert outcome is not None

        def listening() -> int:  # callbacks on the handle's future (None when there are none)
            return len(outcome._callbacks or ())

        for _ in range(3):
            waiting = asyncio.ensure_future(handle.result())
            await wait_until(lambda: listening() == 1, what="the wait to listen")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            with pytest.raises(TimeoutError):
                await handle.result(timeout=0.05)
        assert listening() == 0  # no wait left listening
        assert not handle.done()
        waiters = [asyncio.ensure_future(handle.result()) for _ in range(2)]
        await wait_until(lambda: listening() == 2, what="two waits to listen")
        gate.set()
        assert await asyncio.gather(*waiters) == ["done", "done"]
        assert await handle.result() == "done"


async def test_ignore_result_handle_raises_at_once(make_any_app: Any) -> None:
    app: App = make_any_app()
    ran = asyncio.Event()

    @app.task(name="t.notify", ignore_result=True)
    async def notify(user: str) -> None:
        ran.set()

    async with app, running_worker(app):
        handle = await notify.submit("ann")
        with pytest.raises(ResultUnavailableError):
            await handle.result(timeout=30)
        await asyncio.wait_for(ran.wait(), 30)
        # and per call, through submit_with_options
        handle = await app.submit_with_options("t.notify", args=("bob",), ignore_result=True)
        with pytest.raises(AioqueueError):
            await handle.result()


async def test_unknown_task_is_dead_lettered_and_caller_told(
    make_any_app: Any, queue_name: str
) -> None:
    app: App = make_any_app()

    @app.task(name="t.known")
    async def known() -> int:
        return 1

    async with app, running_worker(app) as worker:
        handle = await app.submit("t.unknown", 1, 2)
        with pytest.raises(TaskNotFoundError) as info:
            await handle.result(timeout=30)
        assert "t.unknown" in str(info.value)
        # the worker keeps running
        assert await (await known.submit()).result(timeout=30) == 1
        await wait_until(lambda: worker.statistics().processed == 2, what="2 processed")
    dead = await get_dead_letter(app.broker_url, f"{queue_name}.dlq")
    assert dead.headers["aioqueue-dead-reason"] == "not_found"
    assert dead.headers["aioqueue-task"] == "t.unknown"


async def publish_raw(url: str, queue: str, body: bytes, **props: Any) -> None:
    async with await aio_pika.connect(url) as conn:
        channel = await conn.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, **props), routing_key=queue, mandatory=True
        )


@pytest.mark.parametrize(
    ("body", "headers", "content_type", "fragment"),
    [
        (b"\x80\x03pickle", None, "application/json", "not valid JSON"),
        (b"{not json", None, "application/json", "not valid JSON"),
        (b'{"args": [], "kwargs": {}}', None, "text/plain", "content_type"),
        (b'{"args": 1, "kwargs": {}}', None, "application/json", '"args" must be'),
        (b"[1, 2]", None, "application/json", "exactly"),
        (
            b'{"args": [], "kwargs": {}}',
            {"aioqueue-task": "t.ok", "aioqueue-protocol": 99},
            "application/json",
            "protocol version",
        ),
        (b"[" * 200 + b"]" * 200, None, "application/json", "nested"),
    ],
)
async def test_malformed_messages_are_dead_lettered_and_the_caller_told(
    make_app: Any,
    rabbit: RabbitNode,
    queue_name: str,
    body: bytes,
    headers: dict[str, Any] | None,
    content_type: str,
    fragment: str,
) -> None:
    app: App = make_app()

    @app.task(name="t.ok")
    async def ok() -> str:
        return "ok"

    async with app, running_worker(app):
        # Given a caller waiting on a task id whose message is malformed
        replies = app._replies
        assert replies is not None
        await replies.ensure_started()
        task_id = uuid.uuid4().hex
        handle: ResultHandle[Any] = ResultHandle(task_id, "t.ok", *replies.expect(task_id))
        hdrs = headers if headers is not None else {"aioqueue-task": "t.ok", "aioqueue-protocol": 1}
        await publish_raw(
            rabbit.url,
            queue_name,
            body,
            headers=hdrs,
            content_type=content_type,
            message_id=task_id,
            correlation_id=task_id,
            reply_to=replies.queue,
        )
        # Then it learns promptly, and the worker goes on
        with pytest.raises(DecodeError) as info:
            await handle.result(timeout=30)
        assert fragment in str(info.value)
        assert await (await ok.submit()).result(timeout=30) == "ok"
    dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    assert dead.body == body
    assert dead.headers["aioqueue-dead-reason"] == "decode"
    assert fragment in dead.headers["aioqueue-dead-error"]


async def test_oversized_body_is_refused_before_parsing(make_any_app: Any, queue_name: str) -> None:

    app: App = make_any_app(settings=Settings(max_message_size=1000))

    @app.task(name="t.big")
    async def big(data: str) -> int:
        return len(data)

    async with app, running_worker(app):
        handle = await big.submit("x" * 5000)
        with pytest.raises(DecodeError, match="over the limit"):
            await handle.result(timeout=30)


async def test_message_without_reply_to_is_still_dead_lettered(
    make_app: Any, rabbit: RabbitNode, queue_name: str
) -> None:
    app: App = make_app()
    async with app, running_worker(app):
        await publish_raw(rabbit.url, queue_name, b"garbage")
    dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    assert dead.body == b"garbage"


async def test_prefetch_bounds_unacked_messages(
    make_app: Any, rabbit: RabbitNode, queue_name: str
) -> None:
    app: App = make_app()
    gate = asyncio.Event()
    started: list[int] = []

    @app.task(name="t.hold")
    async def hold(i: int) -> int:
        started.append(i)
        await gate.wait()
        return i

    async with app, running_worker(app, concurrency=10, prefetch=3) as worker:
        handles = [await hold.submit(i) for i in range(10)]
        await wait_until(lambda: len(started) == 3, what="3 tasks started")
        stats = await wait_until(
            lambda: (s := rabbit.queue_stats()[queue_name])["messages_ready"] == 7 and s,
            what="7 ready in the queue",
        )
        assert stats["messages_unacknowledged"] == 3
        gate.set()
        assert await asyncio.gather(*(h.result(timeout=30) for h in handles)) == list(range(10))
        assert worker.statistics().max_in_hand == 3


async def test_submit_before_any_worker_started(make_any_app: Any) -> None:
    # Given no worker and a queue nobody declared yet
    app: App = make_any_app()

    @app.task(name="t.early")
    async def early(x: int) -> int:
        return x + 1

    async with app:
        # When a task is submitted, it is confirmed (not unroutable)
        handle = await early.submit(41)
        # Then a worker started later runs it
        async with running_worker(app):
            assert await handle.result(timeout=30) == 42


async def test_results_survive_a_broker_restart(make_app: Any, rabbit: RabbitNode) -> None:
    app: App = make_app()
    gate = asyncio.Event()

    @app.task(name="t.across")
    async def across(i: int) -> int:
        await gate.wait()
        return i

    async with app, running_worker(app):
        handles = [await across.submit(i) for i in range(20)]
        # When the broker restarts while every result is pending
        await asyncio.to_thread(rabbit.restart)
        gate.set()
        # Then every caller still gets exactly its result
        results = await asyncio.gather(*(h.result(timeout=90) for h in handles))
        assert results == list(range(20))
        # and a fresh submit works on the recovered connection
        assert await (await across.submit(99)).result(timeout=60) == 99
