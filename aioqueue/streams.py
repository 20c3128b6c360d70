"""What a caller receives before the outcome: progress updates, and a generator task's items.

- Progress travels on the client's reply queue. Each handle keeps at most ``bound`` updates; a
  reader that lags loses the oldest (progress is a latest-state signal), so a chatty task can
  never grow the caller's memory.
- Items of an ``async def`` generator task travel on the handle's own stream queue
  (``aioqueue.stream.<task id>``, durable, expiring when unused), consumed with a prefetch of
  ``bound`` and acked as the reader takes them. A fast generator therefore fills RabbitMQ, not
  the caller, and a slow reader stalls only its own stream: the reply queue and every other
  handle go on.
- Both carry sequence numbers from 1 on each run; what a redelivered or retried run repeats is
  dropped, so the reader sees every sequence number once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from .broker import Broker, Consumer, Delivery, settle
from .errors import DecodeError
from .message import H_SEQ, loads, refuse_unreadable
from .message.signing import SigningKeys, verify

__all__ = ["EventSink", "Progress", "Result", "StreamReader"]

log = logging.getLogger("aioqueue.results")


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress update sent by ``await task_context().progress(data)``."""

    seq: int
    data: Any


@dataclass(frozen=True, slots=True)
class Result:
    """The last event of ``handle.events()``: the task's return value."""

    value: Any


def _seq(delivery: Delivery) -> int:
    value = (delivery.properties.headers or {}).get(H_SEQ)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DecodeError(f"event without a valid {H_SEQ!r} header")
    return value


class EventSink:
    """The progress updates of one handle, bounded, newest kept.

    Made for every submit that waits for its outcome, so it stays cheap until used: the
    updates' deque exists once the first one came or somebody looks, the event a reader waits
    on once somebody reads ``handle.events()``.
    """

    __slots__ = ("_bound", "_changed", "_events", "dropped", "last_seq")

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._events: deque[Progress] | None = None
        self._changed: asyncio.Event | None = None
        self.last_seq = 0
        self.dropped = 0

    @property
    def events(self) -> deque[Progress]:
        """The updates not read yet, oldest first (at most ``bound``; the oldest dropped)."""
        if self._events is None:
            self._events = deque(maxlen=self._bound)
        return self._events

    @property
    def changed(self) -> asyncio.Event:
        """Set when an update or the outcome arrived (for a reader to wait on)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def notify(self) -> None:
        """Wake a reader, if one waits."""
        if self._changed is not None:
            self._changed.set()

    def push(self, delivery: Delivery, max_size: int) -> None:
        """Keep one progress event; `DecodeError` if it cannot be read (nothing is kept then).

        The sequence number counts only once the body was read: an unreadable event (say, a
        forged one numbered 50) must not make the real events before it look like repeats.
        """
        seq = _seq(delivery)
        if seq <= self.last_seq:
            return  # a redelivered or retried run repeating itself
        data = loads(delivery.body, max_size=max_size)
        self.last_seq = seq
        events = self.events
        if len(events) == events.maxlen:
            self.dropped += 1
        events.append(Progress(seq, data))
        self.notify()


class StreamReader:
    """Consumes one handle's stream queue; items are acked as the reader takes them."""

    def __init__(
        self, broker: Broker, queue: str, bound: int, *, signing: SigningKeys | None = None
    ) -> None:
        self._broker = broker
        self._signing = signing  # with keys, an unsigned or forged item is dropped
        self.queue = queue
        self._bound = bound
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._consumer: Consumer | None = None
        self.last_seq = 0
        self.max_unacked = 0

    async def start(self) -> None:
        self._consumer = await self._broker.subscribe(
            self.queue, self._on_item, prefetch=self._bound
        )

    async def _on_item(self, delivery: Delivery) -> None:
        self._inbox.put_nowait(delivery)
        self.max_unacked = max(self.max_unacked, self._inbox.qsize())

    async def next_item(self, outcome: asyncio.Future[Any], expected: int | None) -> Any:
        """The next new item; StopAsyncIteration once ``expected`` items were read (or, when
        the outcome carries no count, once it arrived and nothing more is buffered)."""
        while True:
            if expected is not None and self.last_seq >= expected:
                raise StopAsyncIteration
            if self._inbox.empty() and outcome.done() and expected is None:
                raise StopAsyncIteration
            delivery = await self._get(outcome)
            if delivery is None:
                continue
            try:
                seq, item = self._read(delivery)
            except DecodeError as exc:  # forged or broken: never taken for a real item
                log.warning("dropped an unreadable item of stream %r: %s", self.queue, exc)
                await settle(delivery, ack=True)
                continue
            await settle(delivery, ack=True)
            if seq <= self.last_seq:
                continue  # repeated by a redelivered or retried run
            self.last_seq = seq
            return item

    def _read(self, delivery: Delivery) -> tuple[int, Any]:
        refuse_unreadable(delivery.properties.headers)
        if self._signing is not None:
            verify(delivery.properties, delivery.body, self._signing)
        seq = _seq(delivery)
        return seq, loads(delivery.body, max_size=self._broker.settings.max_message_size)

    async def _get(self, outcome: asyncio.Future[Any]) -> Delivery | None:
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        getter = asyncio.ensure_future(self._inbox.get())
        waiter = asyncio.ensure_future(asyncio.shield(outcome)) if not outcome.done() else None
        try:
            await asyncio.wait(
                {getter, *([waiter] if waiter else [])}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if waiter is not None:
                waiter.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def close(self) -> None:
        """Stop consuming and delete the stream queue (what is left is not needed)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.close()
            with contextlib.suppress(Exception):
                await self._broker.delete_queue(self.queue)
