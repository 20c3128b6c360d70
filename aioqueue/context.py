"""`task_context()`: what a running task knows about itself (a contextvar, also set in threads)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import AioqueueError

__all__ = ["CancelFlag", "TaskContext", "task_context"]


class CancelFlag:
    """Set once when a run is cancelled; read from the event loop or from the run's thread.

    A ``threading.Event`` without its lock and condition (nobody waits on it): setting and
    reading one attribute is atomic under the GIL, and a run makes one of these each.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The running task's identity.

    Attributes:
        id: The task id (the same on every attempt and redelivery).
        name: The registered task name.
        attempt: 1 on the first run, counting up with each retry.
        redelivered: True when RabbitMQ delivered this message before (e.g. a worker died).
        scheduled_at: The slot of a periodic run (aware UTC), else None.
        cancelled: True once the task was cancelled while it runs (``handle.cancel()``). A
            plain-function task cannot be killed: it may check this and return early; an
            ``async def`` task has its coroutine cancelled instead.
    """

    id: str
    name: str
    attempt: int = 1
    redelivered: bool = False
    scheduled_at: datetime | None = None
    _emit: Callable[[Any], Coroutine[Any, Any, None]] | None = field(
        default=None, repr=False, compare=False
    )
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False, compare=False)
    _cancelled: CancelFlag | None = field(default=None, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """Whether the task was cancelled while it runs (safe to read from a thread)."""
        return self._cancelled is not None and self._cancelled.is_set()

    async def progress(self, data: Any) -> None:
        """Tell the caller how far the task got; it receives it from ``handle.events()``.

        ``data`` must be JSON-native. Each update is published (confirmed) to the caller's
        reply queue; a task nobody waits for (``ignore_result``) sends nothing. Progress is a
        latest-state signal: a caller that reads slowly may miss intermediate updates.
        """
        if self._emit is not None:
            await self._emit(data)

    def progress_sync(self, data: Any, *, timeout: float | None = None) -> None:
        """`progress` for a plain-function task, which runs in a worker thread.

        Hands the update to the worker's event loop and blocks this thread until it was
        published (confirmed), exactly like ``await progress(data)``; errors come back here
        (an `EncodeError` for data that is not JSON-native, a `PublishError`). A task nobody
        waits for sends nothing. It needs no event loop in the calling thread.

        Args:
            data: JSON-native progress data.
            timeout: Seconds to wait for the publish at most (default: the publish's own
                deadline, ``settings.publish_timeout``); then the builtin `TimeoutError`.

        Raises:
            RuntimeError: called on the worker's event loop thread (from an ``async def``
                task), where blocking would stop the very loop that publishes: use
                ``await task_context().progress(data)`` there.
        """
        if self._emit is None or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError(
                "task_context().progress_sync() called on the worker's event loop thread, "
                "which it would block: use `await task_context().progress(...)` in async code"
            )
        future = asyncio.run_coroutine_threadsafe(self._emit(data), self._loop)
        try:
            future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


_current: ContextVar[TaskContext] = ContextVar("aioqueue_task_context")


def task_context() -> TaskContext:
    """Return the context of the task running in this coroutine or thread.

    Raises:
        AioqueueError: when called outside a task run by a worker.
    """
    try:
        return _current.get()
    except LookupError:
        raise AioqueueError("task_context() called outside a running task") from None
