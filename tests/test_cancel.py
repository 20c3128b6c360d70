"""Cancellation (issue 17): a queued, delayed or running task cancelled by id.

``handle.cancel()`` / ``app.cancel(id)`` / ``aioqueue cancel`` publish the id to the stream
``aioqueue.cancellations``; every worker reads it (a worker started later too) and refuses or
stops the task; its caller gets `TaskCancelledError` and ``Q.dlq`` keeps it (reason
``cancelled``). The shared behaviour runs on RabbitMQ and on the in-memory broker.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from aioqueue import (
    App,
    BrokerConnectionError,
    RetryPolicy,
    TaskCancelledError,
    TaskError,
    task_context,
)
from aioqueue.message import ErrorInfo, Outcome
from aioqueue.message.celery import encode_reply
from aioqueue.testing import reset
from aioqueue.worker.events import TaskLog
from tests.conftest import ROOT, WorkerProcess, running_worker, wait_until
from tests.rabbit import RabbitNode
from tests.test_core import get_dead_letter


class Recorder(TaskLog):
    """TaskLog that also records the `cancelled` hook."""

    def __init__(self) -> None:
        self.cancelled_runs: list[tuple[str, str, int]] = []

    def cancelled(self, task: str, task_id: str, attempt: int) -> None:
        super().cancelled(task, task_id, attempt)
        self.cancelled_runs.append((task, task_id, attempt))


async def test_a_queued_task_never_runs_even_on_a_worker_started_after_the_cancel(
    make_any_app: Any, queue_name: str
) -> None:
    app: App = make_any_app()
    ran: list[int] = []

    @app.task(name="t.queued")
    async def queued(x: int) -> int:
        ran.append(x)
        return x

    async with app:
        # Given a task submitted while no worker runs, and cancelled
        handle = await queued.submit(1)
        await handle.cancel()
        # When a worker starts afterwards
        recorder = Recorder()
        async with running_worker(app, observers=[recorder]):
            # Then it refuses the task: the caller gets TaskCancelledError
            with pytest.raises(TaskCancelledError) as info:
                await handle.result(timeout=30)
            assert isinstance(info.value, TaskError)
            assert info.value.task_id == handle.id
            # and the worker goes on running other tasks
            assert await (await queued.submit(2)).result(timeout=30) == 2
        assert ran == [2]
        assert recorder.cancelled_runs == [("t.queued", handle.id, 1)]
    dead = await get_dead_letter(app.broker_url, f"{queue_name}.dlq")
    assert dead.headers["aioqueue-dead-reason"] == "cancelled"


async def test_a_running_async_task_is_cancelled_and_not_retried(
    make_any_app: Any, queue_name: str
) -> None:
    app: App = make_any_app()
    attempts: list[int] = []
    saw_cancel = asyncio.Event()
    never = asyncio.Event()

    # (under a timeout too: the cancel is not taken for the timeout's own)
    @app.task(name="t.long", timeout=60, retry=RetryPolicy(max_attempts=3, backoff=0.1, jitter=0.0))
    async def long() -> None:
        attempts.append(task_context().attempt)
        try:
            await never.wait()
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    async with app, running_worker(app) as worker:
        handle = await long.submit()
        await wait_until(lambda: attempts, what="the task to start")
        # When it is cancelled while running
        await handle.cancel()
        # Then its coroutine is cancelled, and its caller gets TaskCancelledError
        with pytest.raises(TaskCancelledError):
            await handle.result(timeout=30)
        assert saw_cancel.is_set()
        dead = await get_dead_letter(app.broker_url, f"{queue_name}.dlq")
        assert dead.headers["aioqueue-dead-reason"] == "cancelled"
        # and it was not retried, though its policy allows 3 attempts
        assert attempts == [1]
        await wait_until(lambda: worker.statistics().running == 0, what="the run to end")


async def test_a_running_thread_task_sees_task_context_cancelled(make_any_app: Any) -> None:
    app: App = make_any_app()
    started = threading.Event()
    stop = threading.Event()  # only the test's safety net: never set in a passing run
    seen: list[bool] = []

    @app.task(name="t.thread")
    def crunch() -> str:
        started.set()
        ctx = task_context()
        while not ctx.cancelled and not stop.wait(0.01):
            pass
        seen.append(ctx.cancelled)
        return "finished anyway"

    async with app, running_worker(app):
        handle = await crunch.submit()
        try:
            await wait_until(started.is_set, what="the thread task to start")
            await handle.cancel()
            # Then the function sees the flag and returns; the caller still gets cancelled
            with pytest.raises(TaskCancelledError):
                await handle.result(timeout=30)
            assert seen == [True]
        finally:
            stop.set()


async def test_a_delayed_task_is_cancelled_when_it_comes_out_of_the_ladder(
    make_any_app: Any,
) -> None:
    app: App = make_any_app()
    ran: list[int] = []

    @app.task(name="t.later")
    async def later() -> None:
        ran.append(1)

    async with app, running_worker(app):
        handle = await later.submit_with_options(countdown=0.5)
        await handle.cancel()
        with pytest.raises(TaskCancelledError):
            await handle.result(timeout=30)
    assert ran == []


async def test_cancelling_an_unknown_or_finished_id_is_harmless(make_any_app: Any) -> None:
    app: App = make_any_app()

    @app.task(name="t.echo")
    async def echo(x: int) -> int:
        return x

    async with app, running_worker(app):
        done = await echo.submit(1)
        assert await done.result(timeout=30) == 1
        await done.cancel()  # finished: nothing happens
        await app.cancel("no-such-task-id", "another-unknown-id")
        assert await (await echo.submit(2)).result(timeout=30) == 2
        assert await done.result() == 1


def test_a_cancelled_celery_task_replies_revoked() -> None:
    error = ErrorInfo("cancelled", "TaskCancelledError", "task t was cancelled before it ran")
    body, _props = encode_reply(Outcome("id-1", "t", error=error))
    assert b'"REVOKED"' in body and b"TaskRevokedError" in body


async def test_the_cancel_command_cancels_a_task_running_in_a_worker_process(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    worker: WorkerProcess = spawn_worker()
    await worker.wait_ready()
    async with App("tests-client", broker_url=rabbit.url, default_queue=queue_name) as app:
        handle = await app.submit("tests.gated", "c")
        await wait_until((tmp_path / "started-c").exists, what="the task to start")
        # When `aioqueue cancel` names it
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aioqueue",
            "cancel",
            "tests.apps.basic:app",
            handle.id,
            "--broker-url",
            rabbit.url,
            cwd=ROOT,
            env={**os.environ, "AIOQUEUE_TEST_QUEUE": queue_name},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert f"cancelled {handle.id}" in out.decode()
        # Then the worker cancels the running coroutine and the caller hears of it
        with pytest.raises(TaskCancelledError):
            await handle.result(timeout=30)
    assert "cancelled" in worker.output()


async def test_a_cancel_is_one_task_cancelled_event_then_its_dead_letter(
    make_any_app: Any,
) -> None:
    from tests.test_events import events_of, has_end, types

    app: App = make_any_app()
    started = asyncio.Event()

    @app.task(name="t.ev")
    async def ev() -> None:
        started.set()
        await asyncio.Event().wait()

    async with app:
        since = app.broker.now() - 1
        queued = await ev.submit()
        await queued.cancel()
        async with running_worker(app):
            with pytest.raises(TaskCancelledError):
                await queued.result(timeout=30)
            running = await ev.submit()
            await wait_until(started.is_set, what="the task to start")
            await running.cancel()
            with pytest.raises(TaskCancelledError):
                await running.result(timeout=30)
        ids = [queued.id, running.id]
        events = await events_of(app, set(ids), since=since, until=has_end(ids))
    assert types(events, queued.id) == ["task-received", "task-cancelled", "task-dead-lettered"]
    assert types(events, running.id) == [
        "task-received",
        "task-started",
        "task-cancelled",
        "task-dead-lettered",
    ]


async def test_a_worker_that_cannot_read_the_stream_still_runs_tasks(
    monkeypatch: pytest.MonkeyPatch, queue_name: str
) -> None:
    # (RabbitMQ 3.10 refuses a stream's consumer on a node without a replica of it)
    url = f"memory://{queue_name}"
    app = App("tests", broker_url=url, default_queue=queue_name)

    @app.task(name="t.ok")
    async def ok() -> int:
        return 1

    try:
        async with app:
            subscribe = app.broker.subscribe

            async def refusing(queue: str, *args: Any, **kwargs: Any) -> Any:
                if queue == "aioqueue.cancellations":
                    raise BrokerConnectionError("refused")
                return await subscribe(queue, *args, **kwargs)

            monkeypatch.setattr(app.broker, "subscribe", refusing)
            async with running_worker(app):
                assert await (await ok.submit()).result(timeout=30) == 1
    finally:
        reset(url)


def holding_task(app: App) -> tuple[Any, asyncio.Event, list[str]]:
    """A task ``t.hold(name)`` that records its start and returns ``name`` once ``release``
    is set: (the task, ``release``, the names started so far)."""
    release = asyncio.Event()
    started: list[str] = []

    @app.task(name="t.hold")
    async def hold(name: str) -> str:
        started.append(name)
        await release.wait()
        return name

    return hold, release, started


async def test_with_signing_keys_only_a_signed_cancellation_cancels(
    make_any_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import time

    from pamqp import commands as spec

    from aioqueue.message.signing import SigningKeys, sign
    from aioqueue.topology import CANCELLATIONS_STREAM

    app: App = make_any_app(signing_keys={"k1": b"1" * 32})
    held, release, started = holding_task(app)

    async def forge(task_id: str, keys: SigningKeys | None) -> None:
        """Publish a cancellation of ``task_id`` straight to the stream, as someone without
        this app's keys could: unsigned, or signed with a key of their own."""
        body = json.dumps({"ids": [task_id], "time": time.time()}).encode()
        properties = spec.Basic.Properties(content_type="application/json", delivery_mode=2)
        if keys is not None:
            sign(properties, body, keys, due_at=time.time())
        await app.broker.publish(CANCELLATIONS_STREAM, body, properties)

    async with app, running_worker(app):
        # Given two tasks running in a worker of an app with signing keys
        target = await held.submit("target")
        witness = await held.submit("witness")
        await wait_until(lambda: len(started) == 2, what="both tasks to start")
        # When the target's cancellation is published unsigned, then signed with another key
        # (other tests' unsigned cancellations in the stream were read, and ignored, as the
        # worker started: only what comes after counts here)
        caplog.clear()
        caplog.set_level("DEBUG", logger="aioqueue.cancel")  # past the first ten: debug
        await forge(target.id, None)
        await forge(target.id, SigningKeys({"other": b"9" * 32}))
        # and then the witness is cancelled the ordinary way (signed), after both on the stream
        await witness.cancel()
        with pytest.raises(TaskCancelledError):
            await witness.result(timeout=30)
        # Then the worker read the forged ones first and ignored them, saying so
        ignored = [r for r in caplog.records if "ignored a cancellation" in r.getMessage()]
        assert len(ignored) == 2
        assert "not signed" in ignored[0].getMessage()
        assert "unknown key id 'other'" in ignored[1].getMessage()
        # and the target runs on to its result
        release.set()
        assert await target.result(timeout=30) == "target"


def test_ignored_cancellations_are_warned_ten_times_then_every_thousandth() -> None:
    from aioqueue.cancel import _worth_a_warning

    warned = [n for n in range(1, 3001) if _worth_a_warning(n)]
    assert warned == [*range(1, 11), 1000, 2000, 3000]


async def test_a_task_cancelled_before_it_has_a_slot_is_refused_without_waiting_for_one(
    make_any_app: Any,
) -> None:
    app: App = make_any_app()
    hold, release, started = holding_task(app)

    # Given a worker that runs one task at a time and holds two messages
    async with app, running_worker(app, concurrency=1, prefetch=2) as worker:
        # its one slot taken by a long task, the second message in hand waiting for it,
        long = await hold.submit("long")
        await wait_until(lambda: started == ["long"], what="the long task to start")
        waiting = await hold.submit("waiting")
        await wait_until(lambda: worker.statistics().in_hand == 2, what="a second in hand")
        # and a third message not delivered yet (the prefetch is full)
        queued = await hold.submit("queued")
        # When the third is cancelled, then the one waiting for the slot
        await queued.cancel()
        await waiting.cancel()
        # Then both are refused while the long task still holds the slot: the waiting one
        # when its cancel came, the third as it was delivered (its cancel known by then)
        for handle in (waiting, queued):
            with pytest.raises(TaskCancelledError):
                await handle.result(timeout=30)
        assert not release.is_set() and started == ["long"]
        # and the slot still works: the long task finishes, the next one runs
        release.set()
        assert await long.result(timeout=30) == "long"
        assert await (await hold.submit("next")).result(timeout=30) == "next"
        await wait_until(lambda: worker.statistics().running == 0, what="the runs to end")


async def test_a_task_that_swallows_its_cancellation_is_still_reported_cancelled(
    make_any_app: Any, queue_name: str
) -> None:
    # A run executes in its delivery's own task: a cancellation the task's code catches and
    # ignores must not stay pending there, nor stop the hand-off that follows.
    app: App = make_any_app()
    started = asyncio.Event()

    @app.task(name="t.stubborn")
    async def stubborn() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # swallowed
        await asyncio.sleep(0)  # and it goes on awaiting
        return "finished anyway"

    @app.task(name="t.next")
    async def after(x: int) -> int:
        await asyncio.sleep(0)
        return x

    async with app, running_worker(app) as worker:
        handle = await stubborn.submit()
        await asyncio.wait_for(started.wait(), 30)
        await handle.cancel()
        # Then whatever the run did after its cancellation, its caller learns it was cancelled
        with pytest.raises(TaskCancelledError):
            await handle.result(timeout=30)
        dead = await get_dead_letter(app.broker_url, f"{queue_name}.dlq")
        assert dead.headers["aioqueue-dead-reason"] == "cancelled"
        # and the worker goes on running tasks
        assert await (await after.submit(7)).result(timeout=30) == 7
        await wait_until(lambda: worker.statistics().running == 0, what="the runs to end")


async def test_a_run_control_tells_its_own_cancellation_from_a_shutdown() -> None:
    from aioqueue.worker.controls import RunControls

    controls = RunControls()
    results: dict[str, object] = {}
    entered = asyncio.Event()

    async def run(key: str, *, swallow: bool = False, cancellable: bool = True) -> None:
        control = controls.start(key, cancellable=cancellable)
        try:
            try:
                entered.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if not swallow:
                    raise
            finally:
                controls.end(key, control)
                ours = control.ours()
        except asyncio.CancelledError:
            results[key] = ("raised", ours, asyncio.current_task().cancelling())  # type: ignore[union-attr]
            raise
        results[key] = ("returned", ours, asyncio.current_task().cancelling())  # type: ignore[union-attr]

    async def case(key: str, *, shutdown: bool, **options: bool) -> asyncio.Task[None]:
        entered.clear()
        task = asyncio.ensure_future(run(key, **options))
        await entered.wait()
        controls.cancel(key)
        if shutdown:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task

    # our cancellation alone: ours, and taken back (nothing pending in the task)
    await case("a", shutdown=False)
    assert results["a"] == ("raised", True, 0)
    # ours and the worker's shutdown together: not ours alone, the shutdown stays pending
    await case("b", shutdown=True)
    assert results["b"] == ("raised", False, 1)
    # a coroutine that swallows ours: taken back all the same
    await case("c", shutdown=False, swallow=True)
    assert results["c"] == ("returned", True, 0)
    # a thread task is never cancelled by us: a CancelledError there is the shutdown's
    await case("d", shutdown=True, cancellable=False)
    assert results["d"] == ("raised", False, 1)
    # a cancellation after the run ended stops nothing
    controls.cancel("a")


async def test_a_worker_stopping_while_a_cancelled_task_lingers_returns_it_to_its_queue(
    make_app: Any, queue_name: str, rabbit: RabbitNode
) -> None:
    # A run's own cancellation and the worker's shutdown both cancel the delivery's task: the
    # shutdown must win (the message goes back to its queue), not pass for the cancellation.
    from aioqueue.worker import Worker

    app: App = make_app()
    started, swallowed = asyncio.Event(), asyncio.Event()

    @app.task(name="t.lingering")
    async def lingering() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()  # it goes on after its cancellation, until the shutdown
        return "never"

    async with app:
        worker = Worker(app, shutdown_timeout=0.5)
        run = asyncio.ensure_future(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 30)
        handle = await lingering.submit()
        await asyncio.wait_for(started.wait(), 30)
        await handle.cancel()
        await asyncio.wait_for(swallowed.wait(), 30)
        # When the worker stops, its shutdown timeout passing with the task still running
        worker.stop()
        await asyncio.wait_for(run, 60)

    # Then the message is back in its queue, and nothing was dead-lettered as cancelled
    def settled() -> dict[str, dict[str, int]] | None:
        stats = rabbit.queue_stats()
        back = stats.get(queue_name, {}).get("messages_ready") == 1
        return stats if back else None

    stats = await wait_until(settled, timeout=30, what="the message back in its queue")
    assert stats.get(f"{queue_name}.dlq", {}).get("messages", 0) == 0
