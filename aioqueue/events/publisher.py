"""`EventPublisher`: task events to the stream ``aioqueue.events``, batched, in the background.

`emit` only appends to a bounded buffer — it never waits, never raises — so a task's path never
waits for an event. A background task sends the buffer as batches: as soon as ``batch_size``
events wait, else ``flush_interval`` after the first one came; one confirmed publish per batch,
up to `IN_FLIGHT` of them awaiting their confirms at once, so that a busy worker's events
keep up with it. They are written in order; those a lost connection makes go again may
arrive in another order (readers already take late events: several workers' interleave). A
batch whose body would be over ``Settings.max_message_size`` (the most a reader accepts) is
sent as halves, as often as needed. A full buffer drops its oldest event; a batch the stream
refuses or cannot take (the stream is missing, the broker nacks it, no confirm in time) is
dropped. Both are counted
(`EventStatistics.dropped`, ``aioqueue_events_dropped_total`` with the metrics extra) and
logged at most once every `LOG_EVERY` seconds. A missing stream is declared again, at most
every `REDECLARE_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pamqp import commands as spec

from ..broker import Broker
from ..errors import UnroutableError
from ..message import CONTENT_TYPE, dumps
from ..message.events import Event, batch_headers, wire_object
from ..message.signing import SigningKeys, sign
from ..topology import EVENTS_STREAM, events_stream_arguments

__all__ = ["EventPublisher", "EventStatistics"]

log = logging.getLogger("aioqueue.events")

LOG_EVERY: Final = 30.0
REDECLARE_EVERY: Final = 10.0
# Batches awaiting their confirms at once. A confirm comes with a later read of the connection,
# so this bounds the events sent per turn of the worker's event loop, and a worker with a
# large prefetch runs hundreds of tasks, three events each, in one turn. One at a time, a
# worker running 8,000-10,000 no-op tasks/s dropped 65 % of its events; 8 at a time, 27 %;
# 32, none (3 bursts of 20,000, --prefetch 1000, docs/design.md).
IN_FLIGHT: Final = 32


@dataclass(frozen=True, slots=True)
class EventStatistics:
    """A snapshot of a publisher's counters."""

    emitted: int
    published: int
    batches: int
    dropped: int
    buffered: int


class EventPublisher:
    """Sends events to the event stream in confirmed batches, from a task of its own.

    Args:
        broker: A connected broker.
        flush_interval: Most seconds an event waits in the buffer before its batch is sent.
        batch_size: Most events per stream message.
        buffer: Most events waiting; past it the oldest are dropped (and counted).
        publish_timeout: Seconds one batch may wait for its confirm before it is dropped.
        signing: The app's signing keys: each batch is signed (docs/security.md).

    Attributes:
        on_dropped: Called with the number of events each time some are dropped (e.g. a
            Prometheus counter's ``inc``); must not block.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        flush_interval: float = 0.1,
        batch_size: int = 256,
        buffer: int = 10_000,
        publish_timeout: float = 5.0,
        signing: SigningKeys | None = None,
    ) -> None:
        self._broker = broker
        self._signing = signing
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        # each event as its object of the wire format (`Event.to_json`), ready to encode
        self._buffer: deque[dict[str, Any]] = deque()
        self._limit = buffer
        self._publish_timeout = publish_timeout
        self._waiting = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # the batches awaiting their confirms, and how many of their events are still to go
        self._sending: dict[asyncio.Task[None], _Unsent] = {}
        self._room = asyncio.Semaphore(IN_FLIGHT)
        self._closing = False
        self._emitted = self._published = self._batches = self._dropped = 0
        self._last_log = -LOG_EVERY
        self._last_declare = -REDECLARE_EVERY
        self.on_dropped: list[Callable[[int], None]] = []

    def statistics(self) -> EventStatistics:
        return EventStatistics(
            self._emitted, self._published, self._batches, self._dropped, len(self._buffer)
        )

    async def start(self) -> None:
        """Declare the stream (a failure is logged: events are dropped until it exists) and
        start sending."""
        await self._declare()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="aioqueue event publisher"
        )

    async def _declare(self) -> None:
        self._last_declare = time.monotonic()
        arguments = events_stream_arguments(self._broker.settings)
        try:
            if self._broker.is_declared(EVENTS_STREAM):
                await self._broker.redeclare_queue(EVENTS_STREAM, arguments)
            else:
                await self._broker.declare_queue(EVENTS_STREAM, arguments)
        except Exception as exc:
            log.warning("cannot declare the event stream %r: %s", EVENTS_STREAM, exc)

    def emit(self, event: Event) -> None:
        """Queue ``event`` for sending; never blocks, never raises."""
        self._append(event.to_json())

    def emit_fields(self, kind: str, at: float, worker: str, fields: dict[str, Any]) -> None:
        """`emit` of ``Event(kind, at, worker, fields)``, without making the `Event`: the
        worker's own events, one per task step. ``fields`` (JSON-native, without ``type``,
        ``time`` or ``worker``) becomes the event's object of the wire format: it is the
        caller's no more."""
        self._append(wire_object(fields, kind, at, worker))

    def _append(self, row: dict[str, Any]) -> None:
        if self._closing and self._task is None:
            self._drop(1, "the publisher is closed")
            return
        self._emitted += 1
        buffer = self._buffer
        buffer.append(row)
        size = len(buffer)
        if size > self._limit:
            buffer.popleft()
            self._drop(1, f"the buffer of {self._limit} events is full")
        if size == 1:  # (`_run` clears it only when the buffer is empty)
            self._waiting.set()
        if size >= self.batch_size and not self._full.is_set():
            self._full.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (for ``timeout`` seconds at most), then stop."""
        self._closing = True
        task, self._task = self._task, None
        if task is None:
            return
        self._waiting.set()
        self._full.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except (TimeoutError, asyncio.CancelledError):
            for sending in (task, *self._sending):
                sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._buffer:
            self._drop(len(self._buffer), "the worker stopped before they were sent")
            self._buffer.clear()

    async def flush(self) -> None:
        """Send everything buffered now, and wait for every batch's confirm (tests,
        shutdown)."""
        while self._buffer:
            await self._send_next()
        await self._sent()

    async def _sent(self) -> None:
        """Wait until no batch awaits its confirm."""
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    await self._sent()
                    return
                self._waiting.clear()
                await self._waiting.wait()
            if not self._closing and len(self._buffer) < self.batch_size:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.flush_interval)
            while self._buffer:
                await self._send_next()

    async def _send_next(self) -> None:
        """Start sending the next batch, once fewer than `IN_FLIGHT` await their confirms."""
        await self._room.acquire()
        if not self._buffer:  # (a `flush` took them while this waited for room)
            self._room.release()
            return
        rows = self._take()
        unsent = _Unsent(len(rows))
        sending = asyncio.get_running_loop().create_task(self._send(rows, unsent))
        self._sending[sending] = unsent
        sending.add_done_callback(self._confirmed)

    def _confirmed(self, sending: asyncio.Task[None]) -> None:
        unsent = self._sending.pop(sending)
        self._room.release()
        if unsent.events:  # cancelled, before or while it was sent
            self._drop(unsent.events, "the publisher was cancelled")

    def _take(self) -> list[dict[str, Any]]:
        count = min(self.batch_size, len(self._buffer))
        return [self._buffer.popleft() for _ in range(count)]

    async def _send(self, batch: list[dict[str, Any]], unsent: _Unsent) -> None:
        """Publish ``batch``; each event leaves ``unsent`` as it is published or dropped."""
        try:
            body = dumps(batch)  # as `encode_batch` writes the same events
        except Exception as exc:  # (an `Event` whose fields are not JSON-native)
            self._give_up(unsent, len(batch), f"{type(exc).__name__}: {exc}")
            return
        if len(body) > self._broker.settings.max_message_size and len(batch) > 1:
            half = len(batch) // 2  # readers refuse a body over the limit: halves, in order
            await self._send(batch[:half], unsent)
            await self._send(batch[half:], unsent)
            return
        try:
            properties = spec.Basic.Properties(
                content_type=CONTENT_TYPE,
                delivery_mode=2,
                headers=batch_headers(len(batch)),
            )
            if self._signing is not None:
                sign(properties, body, self._signing, due_at=self._broker.now())
            await self._broker.publish(
                EVENTS_STREAM, body, properties, timeout=self._publish_timeout
            )
        except UnroutableError:
            self._give_up(unsent, len(batch), f"the stream {EVENTS_STREAM!r} is missing")
            if time.monotonic() - self._last_declare >= REDECLARE_EVERY:
                await self._declare()
        except Exception as exc:  # never the task's problem: count, log, go on
            self._give_up(unsent, len(batch), f"{type(exc).__name__}: {exc}")
        else:
            unsent.events -= len(batch)
            self._published += len(batch)
            self._batches += 1

    def _give_up(self, unsent: _Unsent, count: int, why: str) -> None:
        """``count`` events of a batch in flight are dropped: counted once, here (not again
        by `_confirmed`)."""
        unsent.events -= count
        self._drop(count, why)

    def _drop(self, count: int, why: str) -> None:
        self._dropped += count
        for callback in self.on_dropped:
            with contextlib.suppress(Exception):
                callback(count)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning(
                "dropped %d task event(s): %s (%d dropped so far; tasks are not affected)",
                count,
                why,
                self._dropped,
            )


class _Unsent:
    """How many events of a batch in flight are neither published nor dropped yet: those a
    cancelled send leaves are counted as dropped."""

    __slots__ = ("events",)

    def __init__(self, events: int) -> None:
        self.events = events
