"""A delivery's concurrency slot, and a cancellation that comes while it waits for one.

A worker holds up to ``--prefetch`` deliveries but runs ``--concurrency`` at once: the rest wait
for a slot. A task cancelled before it got one is refused (dead-lettered, reason
``cancelled``; its caller gets `TaskCancelledError`) at once, not once a slot comes free —
behind long tasks that could be minutes. Whether it is cancelled already is asked first; while
it waits, `Pipeline.cancel` wakes its `Waiters` entry and it asks again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..broker import Delivery
from ..message import Envelope

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Waiters", "take_slot"]


class Waiters:
    """The task ids of deliveries waiting for a slot, each with the future a cancel sets."""

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Future[None], str] = {}

    def wake(self, task_id: str) -> None:
        """A cancellation of ``task_id`` came: wake its waiters (and its workflow's steps',
        ``<task id>.<...>``); each asks again whether it is cancelled."""
        for waiter, key in self._waiting.items():
            if (key == task_id or key.startswith(f"{task_id}.")) and not waiter.done():
                waiter.set_result(None)

    async def wait(self, task_id: str, acquiring: asyncio.Future[Any]) -> None:
        """Until ``acquiring`` is done or a cancellation that may be ``task_id``'s came."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[woken] = task_id
        try:
            await asyncio.wait((acquiring, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            del self._waiting[woken]


async def take_slot(
    slots: asyncio.Semaphore, delivery: Delivery, envelope: Envelope, pipeline: Pipeline
) -> bool:
    """Take one of ``slots``; False (and no slot) when the task was refused as cancelled
    before it got one."""
    refusal = pipeline.refusal(delivery, envelope)  # (no coroutine unless cancelled)
    if refusal is not None:
        await refusal
        return False
    if not slots.locked():
        await slots.acquire()  # free: at once
        return True
    acquiring = asyncio.ensure_future(slots.acquire())
    owned = False
    try:
        while True:
            await pipeline.controls.waiters.wait(envelope.id, acquiring)
            if acquiring.done():
                owned = True  # (a cancel that came meanwhile: `Pipeline.process` refuses it)
                return True
            refusal = pipeline.refusal(delivery, envelope)
            if refusal is not None:
                await refusal
                return False
    finally:
        if not owned:  # refused, or this task was cancelled: a slot that comes late goes back

            def give_back(done: asyncio.Future[Any]) -> None:
                if not done.cancelled() and done.exception() is None:
                    slots.release()

            acquiring.cancel()
            acquiring.add_done_callback(give_back)
