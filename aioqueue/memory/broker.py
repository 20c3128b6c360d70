"""The in-memory broker: RabbitMQ's semantics that aioqueue relies on, in this process.

``App(..., broker_url="memory://")`` (or ``"memory://<name>"``) selects it; see `aioqueue.testing`
for the clock, the per-URL registry and the helpers that drive it in tests. Queues must be
declared before a publish reaches them (else `UnroutableError`), prefetch bounds unacked
deliveries per subscription, a rejected message goes back to the head of its queue marked
redelivered, closing a subscription returns its unacked deliveries, and delays, ``expires`` and
``eta`` use the broker's clock (`MemoryBroker.now`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands as spec

from ..broker import (
    ConsumeArguments,
    Consumer,
    Delivery,
    DeliveryCallback,
    HeldQueue,
    LostCallback,
    run_callback,
)
from ..clock import BrokerClock, SystemClock
from ..errors import BrokerConnectionError, UnroutableError
from ..settings import Settings
from ..topology import DELAY_LEVELS, DELAY_UNIT, INFRA_PREFIX, QueueType
from .clock import VirtualClock
from .held import HeldMessage
from .stream import MemoryStream, StreamConsumer

__all__ = ["MemoryBroker"]


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

    def __init__(self, url: str, settings: Settings, clock: BrokerClock | None = None) -> None:
        self._url = url
        self.settings = settings
        self.clock: BrokerClock = clock or SystemClock()
        self.queues: dict[str, _Queue] = {}
        self.streams: dict[str, MemoryStream] = {}  # queues declared x-queue-type=stream
        self._delayed: list[tuple[float, int, str, _Message]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._pump_until: float | None = None  # when the delay pump sleeps, until when
        self._users = 0
        self.pending_callbacks: set[asyncio.Task[None]] = set()
        # Grows with every enqueue, delivery and settle: `VirtualClock.settle` watches it.
        self.progress = 0
        # Work in this process besides deliveries (schedulers): True while it has some to do.
        self._activities: set[Callable[[], bool]] = set()
        # Exclusive holders by name (the scheduler's lease), and the events of their loss.
        self._exclusive: dict[str, tuple[object, asyncio.Event]] = {}
        self._released = asyncio.Event()

    def __repr__(self) -> str:
        return f"<MemoryBroker {self._url}>"

    @property
    def url(self) -> str:
        return self._url

    @property
    def connected(self) -> bool:
        return self._users > 0

    def now(self) -> float:
        """The broker's time (its clock's): ``expires`` and ``eta`` are measured on it."""
        return self.clock.time()

    async def connect(self) -> None:
        self._users += 1
        if isinstance(self.clock, VirtualClock):
            self.clock._attach(self)
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
            self._pump_until = None
        if self._users == 0 and isinstance(self.clock, VirtualClock):
            self.clock._detach(self)

    def is_declared(self, name: str) -> bool:
        return name in self.queues or name in self.streams

    async def declare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        if arguments.get("x-queue-type") == "stream":
            if name not in self.streams:
                self.streams[name] = MemoryStream(name, arguments.get("x-max-length-bytes"))
            return
        self.queues.setdefault(name, _Queue(name))

    async def redeclare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        """Declare a deleted queue again (nothing is cached here: as `declare_queue`)."""
        await self.declare_queue(name, arguments)

    async def ensure_delay_route(self, queue: str, queue_type: QueueType) -> None:
        return None

    async def delete_queue(self, name: str) -> None:
        stream = self.streams.pop(name, None)
        for reader in list(stream.consumers if stream else []):
            await reader.cancel()
        queue = self.queues.pop(name, None)
        if queue is not None:
            for consumer in list(queue.consumers):
                await consumer.cancel()

    @contextlib.asynccontextmanager
    async def hold(self, name: str, limit: int) -> AsyncIterator[HeldQueue | None]:
        """See `Broker.hold`: what is not acked goes back to the head of ``name``, in order."""
        queue = self.queues.get(name)
        if queue is None:
            yield None
            return
        ready = len(queue.messages)
        held = [HeldMessage(queue.messages.popleft()) for _ in range(min(limit, ready))]
        try:
            yield HeldQueue(ready, held)
        finally:
            back = [h.message for h in held if not h.acked]
            if back and self.queues.get(name) is queue:
                queue.messages.extendleft(reversed(back))
                self._dispatch(queue)
            self.progress += 1

    def messages(self, queue: str) -> list[tuple[bytes, spec.Basic.Properties]]:
        """What waits in ``queue`` (e.g. a ``.dlq``), oldest first, without consuming it."""
        q = self.queues.get(queue)
        return [(m.body, m.properties) for m in q.messages] if q else []

    def take(self, queue: str) -> list[tuple[bytes, spec.Basic.Properties]]:
        """Remove and return what waits in ``queue``, oldest first (like ``basic.get`` + ack)."""
        q = self.queues.get(queue)
        if q is None:
            raise BrokerConnectionError(f"NOT_FOUND - no queue {queue!r} in the memory broker")
        taken = [(m.body, m.properties) for m in q.messages]
        q.messages.clear()
        self.progress += 1
        return taken

    # -- exclusive ownership (the scheduler's lease) and other in-process work ----------------

    def claim(self, name: str, owner: object) -> asyncio.Event | None:
        """Hold ``name`` exclusively, like an exclusive queue; None if another owner holds it.

        Returns the event set when the hold is lost (`release` by the owner, or `revoke`).
        """
        held = self._exclusive.get(name)
        if held is not None:
            return held[1] if held[0] is owner else None
        lost = asyncio.Event()
        self._exclusive[name] = (owner, lost)
        return lost

    def holder(self, name: str) -> object | None:
        """Who holds ``name`` (see `claim`), if anyone."""
        held = self._exclusive.get(name)
        return held[0] if held is not None else None

    def release(self, name: str, owner: object) -> None:
        """Give up ``name`` if ``owner`` holds it; a waiting claimant can take it."""
        held = self._exclusive.get(name)
        if held is not None and held[0] is owner:
            self.revoke(name)

    def revoke(self, name: str) -> None:
        """Take ``name`` from its holder (as when a leader's connection dies)."""
        held = self._exclusive.pop(name, None)
        if held is not None:
            held[1].set()
            self._released.set()
            self._released = asyncio.Event()

    async def released(self) -> None:
        """Wait until some exclusive hold is given up."""
        await self._released.wait()

    def attach(self, busy: Callable[[], bool]) -> None:
        """Count in-process work (a scheduler) that has something to do while ``busy()``:
        `idle` and `VirtualClock.settle` wait for it."""
        self._activities.add(busy)

    def detach(self, busy: Callable[[], bool]) -> None:
        self._activities.discard(busy)

    def settling(self) -> bool:
        """The delay pump or an attached activity (a scheduler) has work due now."""
        pump = self._pump is not None and not self._pump.done()
        if pump and (self._pump_until is None or self._pump_until <= self.clock.time()):
            return True
        return any(busy() for busy in list(self._activities))

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
        stream = None if exchange else self.streams.get(routing_key)
        if stream is not None:
            self.progress += 1
            stream.append(body, properties, self.clock.time())
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
            self._pump_until = math.inf if wait is None else self._delayed[0][0]
            try:
                if isinstance(self.clock, VirtualClock):  # the exact due time, no rounding
                    await self.clock._sleep(self._pump_until, self._wakeup)
                else:
                    await self.clock.wait(wait, self._wakeup)
            finally:
                self._pump_until = None

    def next_due(self) -> float | None:
        return self._delayed[0][0] if self._delayed else None

    def _enqueue(self, queue: _Queue, message: _Message, *, front: bool = False) -> None:
        self.progress += 1
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
        arguments: ConsumeArguments | None = None,
    ) -> Consumer:
        stream = self.streams.get(queue)
        if stream is not None:
            given = arguments() if callable(arguments) else arguments or {}
            offset = stream.start_offset(given.get("x-stream-offset", "next"))
            reader = StreamConsumer(stream, callback, prefetch, offset, self._track)
            stream.consumers.append(reader)
            reader.pump()
            return reader
        if queue not in self.queues:
            raise BrokerConnectionError(f"NOT_FOUND - no queue {queue!r} in the memory broker")
        subscription = _Subscription(self, self.queues[queue], callback, prefetch)
        self.queues[queue].consumers.append(subscription)
        self._dispatch(self.queues[queue])
        return subscription

    def _track(self, task: asyncio.Task[None]) -> None:
        self.pending_callbacks.add(task)
        task.add_done_callback(self.pending_callbacks.discard)

    def idle(self) -> bool:
        """No delivery in flight, nothing waiting in a queue that has a consumer, and no
        scheduler with a slot due (see `attach`)."""
        if self.pending_callbacks or self.settling():
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
        self._broker.progress += 1
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
        task = asyncio.ensure_future(run_callback(self._callback, delivery))
        self._broker.pending_callbacks.add(task)
        task.add_done_callback(self._broker.pending_callbacks.discard)

    def ack(self, tag: int) -> None:
        if self.unacked.pop(tag, None) is not None:
            self._broker.progress += 1
            self._broker._dispatch(self._queue)

    async def ack_now(self, tag: int) -> None:
        self.ack(tag)

    async def reject(self, tag: int, *, requeue: bool, flush: bool = False) -> None:
        message = self.unacked.pop(tag, None)
        self._broker.progress += 1
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
