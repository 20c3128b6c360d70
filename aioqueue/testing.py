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
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

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
    """Time that moves only when told: `advance` (or `run_until_idle`) jumps over delays.

    Args:
        start: The initial time, as a Unix timestamp or an aware datetime (default: now).

    It is the clock of the in-memory broker (`use_clock`, the ``aioqueue_clock`` fixture) and
    also a scheduler `aioqueue.scheduler.Clock` (`now`, `sleep_until`): a scheduler of an app on
    that broker takes its slot time from it.
    """

    def __init__(self, start: float | datetime | None = None) -> None:
        if isinstance(start, datetime):
            if start.utcoffset() is None:
                raise ValueError("VirtualClock needs an aware start time")
            start = start.timestamp()
        self._now = time.time() if start is None else float(start)
        # Each sleeper's wake-up event and the time it waits for (inf: only its event).
        self._sleepers: dict[asyncio.Event, float] = {}
        self._brokers: set[MemoryBroker] = set()

    def time(self) -> float:
        """The current virtual time, a Unix timestamp."""
        return self._now

    def now(self) -> datetime:
        """The current virtual time, an aware UTC datetime (the scheduler's `Clock`)."""
        return datetime.fromtimestamp(self._now, UTC)

    async def wait(self, seconds: float | None, wakeup: asyncio.Event) -> None:
        """Wait until ``wakeup`` is set; `set`/`advance` set it once ``seconds`` have passed."""
        await self._sleep(math.inf if seconds is None else self._now + seconds, wakeup)

    async def sleep_until(self, when: datetime) -> None:
        """Return once the virtual time has reached ``when`` (the scheduler's `Clock`)."""
        target = when.timestamp()
        if self._now >= target:
            await asyncio.sleep(0)
            return
        while self._now < target:
            await self._sleep(target, asyncio.Event())

    async def _sleep(self, until: float, wakeup: asyncio.Event) -> None:
        self._sleepers[wakeup] = until
        try:
            await wakeup.wait()
        finally:
            self._sleepers.pop(wakeup, None)

    @property
    def next_timer(self) -> float | None:
        """The earliest time a sleeper (a delayed message, a scheduler) waits for, or None."""
        pending = [t for event, t in self._sleepers.items() if not event.is_set()]
        return min((t for t in pending if t != math.inf), default=None)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, timer by timer, letting what is due run at each.

        The work in hand is settled first (a scheduler that was just started reads its
        schedules at the current time). Then the clock moves to each timer on the way — a
        delayed message coming due, a scheduler's next slot — in order, and at each one waits
        until the schedulers fired and the deliveries were settled, or until nothing has moved
        for a moment (a task waiting for something your test controls). So five minutes of an
        ``every=60`` schedule fire five slots, each run finishing before the next slot.
        """
        if seconds < 0:
            raise ValueError("a VirtualClock cannot go back")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float | datetime) -> None:
        """`advance` to the absolute time ``when`` (a timestamp or an aware datetime)."""
        target = when.timestamp() if isinstance(when, datetime) else float(when)
        await self.settle()
        while True:
            timer = self.next_timer
            if timer is None or timer > target:
                break
            self.set(timer)
            await self.settle()
        self.set(target)
        await self.settle()

    def set(self, now: float) -> None:
        """Jump to ``now`` at once (never backwards), waking the sleepers it reached.

        Unlike `advance`, nothing runs at the times jumped over: a scheduler wakes once, at
        ``now``, and treats the slots more than ``grace`` ago as missed.
        """
        self._now = max(self._now, now)
        for sleeper, due in list(self._sleepers.items()):
            if due <= self._now:
                sleeper.set()

    async def settle(self, *, limit: float = 30.0) -> None:
        """Let the work due at the current virtual time run (`advance` calls it at each step).

        Returns once every broker on this clock is idle, or when its schedulers and delay
        queues are at rest and no message moved for 20 ms of wall time (the tasks still in
        hand wait for something else, e.g. an event your test sets later). `TimeoutError`
        after ``limit`` seconds.
        """
        loop = asyncio.get_running_loop()
        await _settle_loop()
        started = quiet_since = loop.time()
        mark: tuple[int, ...] = ()
        quiet = 0  # event-loop rounds without progress
        while True:
            brokers = list(self._brokers)
            if all(b.idle() for b in brokers):
                return
            now = loop.time()
            current = tuple(b.progress for b in brokers)
            if current != mark or any(b.settling() for b in brokers):
                mark, quiet_since, quiet = current, now, 0
            elif quiet >= _SETTLE_ROUNDS and now - quiet_since >= _SETTLE_QUIET:
                return
            if now - started > limit:
                raise TimeoutError(f"the in-memory broker did not settle within {limit:g}s")
            quiet += 1
            # Spin a little, then sleep for real so that task threads get the GIL; counting
            # rounds as well as time keeps a stalled process from ending the wait early.
            await asyncio.sleep(0 if quiet < _SETTLE_ROUNDS // 2 else 0.001)

    def _attach(self, broker: MemoryBroker) -> None:
        self._brokers.add(broker)

    def _detach(self, broker: MemoryBroker) -> None:
        self._brokers.discard(broker)


# How long `VirtualClock.settle` waits for a busy broker that makes no progress: wall seconds,
# and event-loop rounds (half of them spinning, half sleeping a millisecond).
_SETTLE_QUIET: Final = 0.02
_SETTLE_ROUNDS: Final = 40


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
        return name in self.queues

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
    ) -> Consumer:
        if queue not in self.queues:
            raise BrokerConnectionError(f"NOT_FOUND - no queue {queue!r} in the memory broker")
        subscription = _Subscription(self, self.queues[queue], callback, prefetch)
        self.queues[queue].consumers.append(subscription)
        self._dispatch(self.queues[queue])
        return subscription

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
        task = asyncio.ensure_future(self._callback(delivery))
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
            await _settle_loop()
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
