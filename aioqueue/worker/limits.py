"""Per-task flow control in one worker: ``concurrency_limit`` turns, and which deliveries of a
``rate_limit`` task still need their turn from the pacer (`aioqueue.worker.pacer`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ..broker import Delivery
from ..message import H_PACED
from ..task import Task

__all__ = ["ConcurrencyLimits", "needs_pacing"]


def needs_pacing(task: Task[Any, Any], delivery: Delivery) -> bool:
    """Whether ``delivery`` of ``task`` must go to its holding queue before it may run: the
    task has a rate limit and the pacer has not marked this message (a retry or a message
    published straight to the work queue is unmarked)."""
    if task.options.rate_limit is None:
        return False
    return (delivery.properties.headers or {}).get(H_PACED) is None


class ConcurrencyLimits:
    """At most ``concurrency_limit`` runs of a task at once in this worker.

    A delivery waiting for its turn gives its worker slot (``worker_slots``, the worker's
    ``--concurrency``) back while it waits, so other tasks run meanwhile; it stays in hand
    (unacked, within the prefetch) and takes a worker slot again when its turn comes.
    """

    def __init__(self, worker_slots: asyncio.Semaphore | None = None) -> None:
        self.worker_slots = worker_slots
        self._turns: dict[str, asyncio.Semaphore] = {}

    def turn(self, task: Task[Any, Any]) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold one of ``task``'s turns for the block (at once when it has no limit: a shared
        no-op, nothing built per delivery)."""
        limit = task.options.concurrency_limit
        return _FREE if limit is None else self._limited(task, limit)

    @contextlib.asynccontextmanager
    async def _limited(self, task: Task[Any, Any], limit: int) -> AsyncIterator[None]:
        turns = self._turns.get(task.name)
        if turns is None:
            turns = self._turns[task.name] = asyncio.Semaphore(limit)
        slots = self.worker_slots
        if slots is None or not turns.locked():
            await turns.acquire()
        else:
            slots.release()
            try:
                await turns.acquire()
            finally:
                # the worker releases this slot when the delivery is done (also on a
                # cancellation at shutdown, when the count no longer matters)
                await slots.acquire()
        try:
            yield
        finally:
            turns.release()


_FREE: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
