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
its unacked deliveries. Delays use the clock; task timeouts and ``expires`` use wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pamqp import commands as spec

from .broker import Consumer, Delivery, DeliveryCallback, LostCallback
from .errors import BrokerConnectionError, UnroutableError
from .settings import Settings
from .topology import DELAY_LEVELS, DELAY_UNIT, INFRA_PREFIX, QueueType

if TYPE_CHECKING:
    from .app import App
    from .worker import Worker

__all__ = [
    "Clock",
    "MemoryBroker",
    "RealClock",
    "VirtualClock",
    "memory_broker",
    "reset",
    "run_until_idle",
    "running_worker",
    "use_clock",
]


class Clock(Protocol):
    """Where the in-memory broker's delays get their time from."""

    def time(self) -> float: ...
    async def wait(self, seconds: float | None, wakeup: asyncio.Event) -> None: ...


class RealClock:
    """Wall time: delays take as long as they say."""

    def time(self) -> float:
        return time.time()

    async def wait(self, seconds: float | None, wakeup: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), seconds)


class VirtualClock:
    """Time that moves only when told: `advance` (or `run_until_idle`) jumps over delays."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._sleepers: set[asyncio.Event] = set()

    def time(self) -> float:
        return self._now

    async def wait(self, seconds: float | None, wakeup: asyncio.Event) -> None:
        self._sleepers.add(wakeup)
        try:
            await wakeup.wait()
        finally:
            self._sleepers.discard(wakeup)

    async def advance(self, seconds: float) -> None:
        """Move time forward and let what became due run."""
        self.set(self._now + seconds)
        await _settle_loop()

    def set(self, now: float) -> None:
        self._now = max(self._now, now)
        for sleeper in self._sleepers:
            sleeper.set()


@dataclass(slots=True)
class _Message:
    body: bytes
    properties: spec.Basic.Properties
    redelivered: bool = False


@dataclass(slots=True)
class _Queue:
    name: str
    messages: deque[_Message] = field(default_factory=deque)
    consumers: list[_Subscription] = field(default_factory=list)
    turn: int = 0


class MemoryBroker:
    """A broker in this process's memory, with the semantics aioqueue relies on."""

    def __init__(self, url: str, settings: Settings, clock: Clock | None = None) -> None:
        self._url = url
        self.settings = settings
        self.clock: Clock = clock or RealClock()
        self.queues: dict[str, _Queue] = {}
        self._delayed: list[tuple[float, int, str, _Message]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._users = 0
        self.pending_callbacks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<MemoryBroker {self._url}>"

    @property
    def url(self) -> str:
        return self._url

    @property
    def connected(self) -> bool:
        return self._users > 0

    async def connect(self) -> None:
        self._users += 1
        if self._pump is None or self._pump.done():
            self._wakeup = asyncio.Event()
            self._pump = asyncio.ensure_future(self._run_delays())

    async def close(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None

    async def declare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        self.queues.setdefault(name, _Queue(name))

    async def ensure_delay_route(self, queue: str, queue_type: QueueType) -> None:
        return None

    async def delete_queue(self, name: str) -> None:
        queue = self.queues.pop(name, None)
        if queue is not None:
            for consumer in list(queue.consumers):
                await consumer.cancel()

    def messages(self, queue: str) -> list[tuple[bytes, spec.Basic.Properties]]:
        """What waits in ``queue`` (e.g. a ``.dlq``), oldest first, without consuming it."""
        q = self.queues.get(queue)
        return [(m.body, m.properties) for m in q.messages] if q else []

    @property
    def delayed(self) -> int:
        """How many messages wait in the delay ladder."""
        return len(self._delayed)

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        exchange: str = "",
        timeout: float | None = None,
    ) -> None:
        if not self.connected:
            raise BrokerConnectionError("the in-memory broker is closed")
        message = _Message(body, properties)
        if exchange.startswith(f"{INFRA_PREFIX}delay."):
            words = routing_key.split(".")
            units = int("".join(words[:DELAY_LEVELS]), 2)
            self._delay(".".join(words[DELAY_LEVELS:]), units * DELAY_UNIT, message)
            return
        if exchange or routing_key not in self.queues:
            raise UnroutableError(f"message to {routing_key!r} was returned unroutable: NO_ROUTE")
        self._enqueue(self.queues[routing_key], message)

    def _delay(self, queue: str, seconds: float, message: _Message) -> None:
        due = self.clock.time() + seconds
        heapq.heappush(self._delayed, (due, next(self._seq), queue, message))
        self._wakeup.set()

    async def _run_delays(self) -> None:
        while True:
            now = self.clock.time()
            while self._delayed and self._delayed[0][0] <= now:
                _, _, queue, message = heapq.heappop(self._delayed)
                if queue in self.queues:  # like RabbitMQ: dropped when nothing is bound
                    self._enqueue(self.queues[queue], message)
            wait = self._delayed[0][0] - now if self._delayed else None
            self._wakeup.clear()
            await self.clock.wait(wait, self._wakeup)

    def next_due(self) -> float | None:
        return self._delayed[0][0] if self._delayed else None

    def _enqueue(self, queue: _Queue, message: _Message, *, front: bool = False) -> None:
        if front:
            queue.messages.appendleft(message)
        else:
            queue.messages.append(message)
        self._dispatch(queue)

    def _dispatch(self, queue: _Queue) -> None:
        while queue.messages:
            ready = [c for c in queue.consumers if c.has_room()]
            if not ready:
                return
            consumer = ready[queue.turn % len(ready)]
            queue.turn += 1
            consumer.deliver(queue.messages.popleft())

    async def subscribe(
        self,
        queue: str,
        callback: DeliveryCallback,
        *,
        prefetch: int,
        on_lost: LostCallback | None = None,
    ) -> Consumer:
        if queue not in self.queues:
            raise BrokerConnectionError(f"NOT_FOUND - no queue {queue!r} in the memory broker")
        subscription = _Subscription(self, self.queues[queue], callback, prefetch)
        self.queues[queue].consumers.append(subscription)
        self._dispatch(self.queues[queue])
        return subscription

    def idle(self) -> bool:
        """No delivery in flight and nothing waiting in a queue that has a consumer."""
        if self.pending_callbacks:
            return False
        return all(
            not q.messages and all(not c.unacked for c in q.consumers)
            for q in self.queues.values()
            if q.consumers
        )


class _Subscription:
    """One consumer of a memory queue; also its own settler."""

    def __init__(
        self, broker: MemoryBroker, queue: _Queue, callback: DeliveryCallback, prefetch: int
    ) -> None:
        self._broker = broker
        self._queue = queue
        self.queue = queue.name
        self._callback = callback
        self._prefetch = prefetch
        self._tags = itertools.count(1)
        self.unacked: dict[int, _Message] = {}
        self._active = True

    def has_room(self) -> bool:
        return self._active and len(self.unacked) < self._prefetch

    def deliver(self, message: _Message) -> None:
        tag = next(self._tags)
        self.unacked[tag] = message
        delivery = Delivery(
            body=message.body,
            properties=message.properties,
            redelivered=message.redelivered,
            queue=self.queue,
            delivery_tag=tag,
            acker=self,
        )
        task = asyncio.ensure_future(self._callback(delivery))
        self._broker.pending_callbacks.add(task)
        task.add_done_callback(self._broker.pending_callbacks.discard)

    def ack(self, tag: int) -> None:
        if self.unacked.pop(tag, None) is not None:
            self._broker._dispatch(self._queue)

    async def ack_now(self, tag: int) -> None:
        self.ack(tag)

    async def reject(self, tag: int, *, requeue: bool, flush: bool = False) -> None:
        message = self.unacked.pop(tag, None)
        if message is not None and requeue:
            message.redelivered = True
            self._broker._enqueue(self._queue, message, front=True)
        self._broker._dispatch(self._queue)

    async def flush(self) -> None:
        return None

    async def cancel(self) -> None:
        self._active = False
        if self in self._queue.consumers:
            self._queue.consumers.remove(self)

    async def close(self) -> None:
        await self.cancel()
        for tag in sorted(self.unacked, reverse=True):  # back to the head, in order
            await self.reject(tag, requeue=True)


_brokers: dict[str, MemoryBroker] = {}
_clocks: dict[str, Clock] = {}


def memory_broker(url: str, settings: Settings) -> MemoryBroker:
    """The process's in-memory broker for ``url`` (one per URL, shared by its apps)."""
    broker = _brokers.get(url)
    if broker is None:
        broker = _brokers[url] = MemoryBroker(url, settings, _clocks.get(url))
    return broker


def use_clock(url: str, clock: Clock) -> Clock:
    """Make the in-memory broker of ``url`` use ``clock`` (call before connecting an app)."""
    _clocks[url] = clock
    _brokers.pop(url, None)
    return clock


def reset(url: str | None = None) -> None:
    """Forget in-memory brokers (all, or one URL's) and their clocks: a fresh start per test."""
    for table in (_brokers, _clocks):
        if url is None:
            table.clear()
        else:
            table.pop(url, None)


async def _settle_loop(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def run_until_idle(app: App, *, timeout: float = 30.0, advance_time: bool = True) -> None:
    """Run until no task is queued or running; with a `VirtualClock`, jump over delays too.

    Args:
        app: A connected `App` on a ``memory://`` URL.
        timeout: Wall-clock seconds before giving up with `TimeoutError`.
        advance_time: Move a `VirtualClock` to each next delayed message until none is left.
    """
    broker = app.broker
    if not isinstance(broker, MemoryBroker):
        raise TypeError("run_until_idle needs an app on a memory:// broker")
    async with asyncio.timeout(timeout):
        while True:
            await _settle_loop()
            if not broker.idle():
                await asyncio.sleep(0.001)
                continue
            due = broker.next_due()
            if due is None:
                return
            if advance_time and isinstance(broker.clock, VirtualClock):
                broker.clock.set(due)
            else:
                await asyncio.sleep(min(0.01, max(0.0, due - broker.clock.time())))


@contextlib.asynccontextmanager
async def running_worker(app: App, **options: Any) -> AsyncIterator[Worker]:
    """Run a `Worker` for ``app`` in this event loop for the duration of the block.

    The app must be connected; ``options`` go to `Worker` (e.g. ``concurrency=``). On exit the
    worker stops gracefully (running tasks finish, up to its shutdown timeout).
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
        yield worker
    finally:
        worker.stop()
        await run
