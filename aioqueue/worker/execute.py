"""Run one task: ``async def`` on the event loop, plain functions in a bounded thread pool.

A run returns an `Outcome` (the value, or what went wrong); it never raises for a task's own
failure. Timeouts cancel a coroutine (``anyio.move_on_after``); a thread cannot be killed, so a
thread that outlives its timeout keeps its pool slot until it returns and its late result is
discarded.
"""

from __future__ import annotations

import asyncio
import contextvars
import traceback
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import anyio

from ..context import CancelFlag, TaskContext, _current
from ..errors import EncodeError, TaskTimeoutError
from ..message import Envelope, ErrorInfo, Outcome, check_json_native
from ..retry import Retry
from ..task import Task
from .emit import Emitter

__all__ = ["execute"]

MAX_TRACEBACK = 16 * 1024


async def execute(
    task: Task[Any, Any],
    envelope: Envelope,
    *,
    redelivered: bool,
    threads: ThreadPoolExecutor,
    emitter: Emitter,
    cancelled: CancelFlag | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[Outcome, BaseException | None]:
    """Run ``task`` with the envelope's arguments under the task's timeout (``cancelled``:
    what ``task_context().cancelled`` reads; ``loop``: the running loop, if known).

    Returns the outcome and, when the task raised, the exception (for the retry decision).
    """
    scheduled = envelope.scheduled_at
    # (in the delivery's own task: reset after the run, so the hand-off does not see it)
    token = _current.set(
        TaskContext(
            id=envelope.id,
            name=envelope.task,
            attempt=envelope.attempt,
            redelivered=redelivered,
            scheduled_at=datetime.fromtimestamp(scheduled, UTC) if scheduled else None,
            _emit=emitter.progress,
            _loop=loop or asyncio.get_running_loop(),  # for progress_sync() from a thread task
            _cancelled=cancelled,
        )
    )
    try:
        outcome, exc = await _run(task, envelope, threads, emitter)
    finally:
        _current.reset(token)
    if task.is_generator:
        outcome = replace(outcome, items=emitter.items)
    return outcome, exc


async def _run(
    task: Task[Any, Any], envelope: Envelope, threads: ThreadPoolExecutor, emitter: Emitter
) -> tuple[Outcome, BaseException | None]:
    timeout = task.options.timeout
    if envelope.celery is not None and envelope.celery.time_limit is not None:
        timeout = envelope.celery.time_limit  # the message's own time limit, as in Celery
    try:
        if timeout is None:
            value = await _call(task, envelope, threads, emitter)
        else:
            with anyio.move_on_after(timeout) as scope:
                value = await _call(task, envelope, threads, emitter)
            if scope.cancelled_caught:
                return _timed_out(task, envelope, timeout)
        check_json_native(value, "the task's return value")
    except Exception as exc:
        return _error_outcome(envelope, "error", exc), exc
    return Outcome(task_id=envelope.id, task_name=envelope.task, value=value), None


def _call(
    task: Task[Any, Any], envelope: Envelope, threads: ThreadPoolExecutor, emitter: Emitter
) -> Awaitable[Any]:
    """What to await for the task's value: its own coroutine (no other around it), its
    stream, or its thread's result."""
    if task.is_generator:
        return _stream(task, envelope, emitter)
    if task.is_async:
        return cast(Awaitable[Any], task.fn(*envelope.args, **envelope.kwargs))
    context = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(
        threads, lambda: context.run(task.fn, *envelope.args, **envelope.kwargs)
    )
    # Shielded: a timeout stops our wait, not the thread; its late result is dropped.
    future.add_done_callback(_discard)
    return asyncio.shield(future)


async def _stream(task: Task[Any, Any], envelope: Envelope, emitter: Emitter) -> int:
    """An async generator streams its items; its result is how many it yielded."""
    async for item in task.fn(*envelope.args, **envelope.kwargs):
        await emitter.item(item)
    return emitter.items


def _discard(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # mark retrieved: a late failure must not log "never retrieved"


def _timed_out(
    task: Task[Any, Any], envelope: Envelope, timeout: float
) -> tuple[Outcome, BaseException]:
    message = f"task {task.name} exceeded its timeout of {timeout:g}s"
    outcome = Outcome(
        task_id=envelope.id,
        task_name=envelope.task,
        error=ErrorInfo(kind="timeout", type_name="TaskTimeoutError", message=message),
    )
    exc = TaskTimeoutError(
        "TaskTimeoutError", message, task_name=envelope.task, task_id=envelope.id
    )
    return outcome, exc


def _error_outcome(envelope: Envelope, kind: str, exc: BaseException) -> Outcome:
    if isinstance(exc, Retry) and exc.__cause__ is not None:
        exc = exc.__cause__  # out of attempts: report what made the task ask for a retry
    tb = "".join(traceback.format_exception(exc))
    if len(tb) > MAX_TRACEBACK:
        tb = "...\n" + tb[-MAX_TRACEBACK:]
    type_name = "EncodeError" if isinstance(exc, EncodeError) else type(exc).__qualname__
    return Outcome(
        task_id=envelope.id,
        task_name=envelope.task,
        error=ErrorInfo(
            kind=kind,
            type_name=type_name,
            message=str(exc),
            traceback=tb,
            module=type(exc).__module__,
        ),
    )
