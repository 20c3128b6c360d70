"""Testing without a broker: an in-memory broker, a virtual clock, and "run until idle".

``App(..., broker_url="memory://")`` (or ``"memory://<name>"``) selects `MemoryBroker`. Everything
else is the real code path — encode → queue → decode → run → settle, replies, retries, the delay
ladder's timing, dead letters — so a test asserts on what production would do, without sleeping:

```python
from aioqueue.testing import VirtualClock, run_until_idle, use_clock

async def test_retry_later():
    clock = use_clock("memory://shop", VirtualClock())
    app = App("shop", broker_url="memory://shop")
    async with app, Worker(app) ...:
        handle = await charge.submit(10)
        await run_until_idle(app)            # runs tasks, jumps the clock over retry delays
        assert await handle.result() == "ok"
```

All `App` objects with the same ``memory://`` URL in one process share one broker. Semantics
follow RabbitMQ where aioqueue relies on them: queues must be declared before a publish reaches
them (else `UnroutableError`), prefetch bounds unacked deliveries per subscription, a rejected
message goes back to the head of its queue marked redelivered, closing a subscription returns
its unacked deliveries. Delays, ``expires`` and ``eta`` use the broker's clock (`MemoryBroker.now`);
task timeouts use wall time.

Schedules (``@app.periodic``, ``app.schedule``) run here too: ``async with app.scheduler():`` holds
an in-memory lease and keeps its slot records in the memory broker, and takes slot time from the
`VirtualClock` when one is installed. `VirtualClock.advance` moves time from timer to timer (each
delayed message, each scheduler's next slot) and lets the work due at each one finish before
moving on, so five minutes of an ``every=60`` schedule are five runs. `run_until_idle` jumps only
to delayed messages (passing the slots on the way), never to a schedule's next slot: schedules
move with ``clock.advance(...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .clock import BrokerClock, SystemClock
from .memory import (
    MemoryBroker,
    VirtualClock,
    let_run,
    memory_broker,
    reset,
    use_clock,
)

if TYPE_CHECKING:
    from .app import App
    from .worker import Worker

# The in-memory broker's wall clock was called RealClock: the same `SystemClock` as the
# scheduler's, kept under that name for tests written against it.
RealClock = SystemClock

__all__ = [
    "BrokerClock",
    "MemoryBroker",
    "RealClock",
    "SystemClock",
    "VirtualClock",
    "memory_broker",
    "reset",
    "run_until_idle",
    "running_worker",
    "use_clock",
]


async def run_until_idle(app: App, *, timeout: float = 30.0, advance_time: bool = True) -> None:
    """Run until no task is queued or running; with a `VirtualClock`, jump over delays too.

    Args:
        app: A connected `App` on a ``memory://`` URL.
        timeout: Wall-clock seconds before giving up with `TimeoutError`.
        advance_time: Move a `VirtualClock` to each next delayed message until none is left.

    A running scheduler counts as work while a slot is due at the current time (it fires it
    first), but its *next* slot does not: a schedule always has one, so time is never moved
    for it here — only to delayed messages (countdowns, ETAs, retry back-off), through every
    slot on the way (`VirtualClock.advance_to`). Move schedules on with ``clock.advance(...)``.
    """
    broker = app.broker
    if not isinstance(broker, MemoryBroker):
        raise TypeError("run_until_idle needs an app on a memory:// broker")
    async with asyncio.timeout(timeout):
        while True:
            await let_run()
            if not broker.idle():
                await asyncio.sleep(0.001)
                continue
            due = broker.next_due()
            if due is None:
                return
            if advance_time and isinstance(broker.clock, VirtualClock):
                await broker.clock.advance_to(due)
            else:
                await asyncio.sleep(min(0.01, max(0.0, due - broker.clock.time())))


@contextlib.asynccontextmanager
async def running_worker(
    app: App, *, scheduler: bool = False, **options: Any
) -> AsyncIterator[Worker]:
    """Run a `Worker` for ``app`` in this event loop for the duration of the block.

    The app must be connected; ``options`` go to `Worker` (e.g. ``concurrency=``). On exit the
    worker stops gracefully (running tasks finish, up to its shutdown timeout).
    ``scheduler=True`` also runs ``app.scheduler()`` beside it, like ``--scheduler`` on the
    worker's command line (stopped first on exit).
    """
    from .worker import Worker

    worker = Worker(app, **options)
    run = asyncio.ensure_future(worker.run())
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        ready.cancel()
        run.result()  # the start-up error
    try:
        if scheduler:
            async with app.scheduler():
                yield worker
        else:
            yield worker
    finally:
        worker.stop()
        await run
