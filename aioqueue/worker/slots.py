"""A delivery's concurrency slot, and a cancellation that comes while it waits for one.

A worker holds up to ``--prefetch`` deliveries but runs ``--concurrency`` at once: the rest wait
for a slot. A task cancelled before it got one is refused (dead-lettered, reason
``cancelled``; its caller gets `TaskCancelledError`) at once, not once a slot comes free —
behind long tasks that could be minutes. Whether it is cancelled already is asked first; while
it waits, `RunControls.cancel` wakes its `Waiters` entry (`controls.py`) and it asks again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..broker import Delivery
from ..message import Envelope

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["take_slot"]


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
