"""`task_context()`: what a running task knows about itself (a contextvar, also set in threads)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import AioqueueError

__all__ = ["TaskContext", "task_context"]


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The running task's identity.

    Attributes:
        id: The task id (the same on every attempt and redelivery).
        name: The registered task name.
        attempt: 1 on the first run, counting up with each retry.
        redelivered: True when RabbitMQ delivered this message before (e.g. a worker died).
        scheduled_at: The slot of a periodic run (aware UTC), else None.
    """

    id: str
    name: str
    attempt: int = 1
    redelivered: bool = False
    scheduled_at: datetime | None = None
    _emit: Callable[[Any], Awaitable[None]] | None = field(default=None, repr=False, compare=False)

    async def progress(self, data: Any) -> None:
        """Tell the caller how far the task got; it receives it from ``handle.events()``.

        ``data`` must be JSON-native. Each update is published (confirmed) to the caller's
        reply queue; a task nobody waits for (``ignore_result``) sends nothing. Progress is a
        latest-state signal: a caller that reads slowly may miss intermediate updates.
        """
        if self._emit is not None:
            await self._emit(data)


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
