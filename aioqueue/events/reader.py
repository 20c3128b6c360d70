"""`EventReader`: the task events of the stream ``aioqueue.events``, from any point in history.

```python
async with EventReader(app, since=time.time() - 3600) as reader:   # or "first", "next"
    async for event in reader:
        print(event.type, event.get("id"), event.worker)
```

A stream consumer (``x-stream-offset``) with a small prefetch, so a slow reader holds at most
``prefetch`` batches in memory; each batch is acknowledged once its events were taken. After a
reconnect it resumes after the last offset it saw. A batch it cannot read is skipped and
counted (`EventReader.skipped`), never raised. With the app's signing keys, an unsigned or
badly signed batch is skipped too (counted in `skipped` and in `unsigned`). On the in-memory
transport (``memory://``) the stream lives in the memory broker, with the same API.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from ..broker import Broker, Consumer, Delivery, settle
from ..errors import DecodeError, SignatureError
from ..message.events import Event, decode_batch
from ..message.signing import verify
from ..topology import EVENTS_STREAM, events_stream_arguments

if TYPE_CHECKING:
    from ..app import App

__all__ = ["EventReader"]

log = logging.getLogger("aioqueue.events")

Since = float | Literal["first", "next"]


class EventReader:
    """An async iterator of the `Event` objects on the event stream.

    Args:
        app: Its connection is used (connected on entry if it is not, closed on exit then).
        since: A Unix time (events at or after it; RabbitMQ starts at the chunk holding that
            second, earlier events are skipped here), ``"first"`` (all the stream keeps), or
            ``"next"`` (only events published from now on).
        prefetch: Most stream messages (batches) held unread.

    Attributes:
        skipped: Batches that could not be read (malformed, or refused by their signature).
        unsigned: Of those, batches refused by their signature (with the app's signing keys).
        last_offset: The stream offset of the last batch taken, None before the first.
    """

    def __init__(self, app: App, *, since: Since | str = "next", prefetch: int = 32) -> None:
        if isinstance(since, str) and since not in ("first", "next"):
            raise ValueError(f"since must be a Unix time, 'first' or 'next', not {since!r}")
        self.app = app
        self.since = since
        self.prefetch = prefetch
        self.skipped = 0
        self.unsigned = 0
        self.last_offset: int | None = None
        self._queued_offset: int | None = None  # of the last batch queued here
        self._batches: deque[tuple[list[Event], Delivery]] = deque()
        self._events: deque[Event] = deque()
        self._arrived = asyncio.Event()
        self._consumer: Consumer | None = None
        self._broker: Broker | None = None  # whose consumer it is
        self._own_connection = False

    async def __aenter__(self) -> EventReader:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect the app if needed, declare the stream, start consuming."""
        if self.app._broker is None:
            await self.app.connect()
            self._own_connection = True
        broker = self._broker = self.app.broker
        await broker.declare_queue(EVENTS_STREAM, events_stream_arguments(self.app.settings))
        self._consumer = await broker.subscribe(
            EVENTS_STREAM, self._on_delivery, prefetch=self.prefetch, arguments=self._arguments
        )

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        # a consumer whose app closed its connection under it is gone with it (closing it
        # again would wait for that connection to come back: for ever)
        if consumer is not None and self.app._broker is self._broker:
            await consumer.close()
        self._batches.clear()
        if self._own_connection:
            self._own_connection = False
            await self.app.close()

    def _arguments(self) -> dict[str, Any]:
        """Where to (re)start: after the last batch seen, else where ``since`` says."""
        where: Any
        if self._queued_offset is not None:  # what is queued here is not asked for again
            where = self._queued_offset + 1
        elif isinstance(self.since, int | float):
            where = datetime.fromtimestamp(int(self.since), UTC)
        else:
            where = self.since
        return {"x-stream-offset": where}

    async def _on_delivery(self, delivery: Delivery) -> None:
        # no await before the append: deliveries arrive in tasks started in stream order
        headers = delivery.properties.headers or {}
        offset = headers.get("x-stream-offset")
        offset = offset if isinstance(offset, int) and not isinstance(offset, bool) else None
        if offset is not None and self._queued_offset is not None and offset <= self._queued_offset:
            self._batches.append(([], delivery))  # a repeat after a reconnect: only acked
            self._arrived.set()
            return
        if offset is not None:
            self._queued_offset = offset
        try:
            if self.app.signing is not None:
                verify(delivery.properties, delivery.body, self.app.signing)
            events = decode_batch(delivery.body, self.app.settings.max_message_size)
        except DecodeError as exc:
            self.skipped += 1
            self.unsigned += isinstance(exc, SignatureError)
            log.warning("skipped an unreadable event batch at offset %s: %s", offset, exc)
            events = []
        since = self.since if isinstance(self.since, int | float) else None
        events = [
            Event(e.type, e.time, e.worker, e.fields, offset)
            for e in events
            if since is None or e.time >= since
        ]
        self._batches.append((events, delivery))
        self._arrived.set()

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> Event:
        while not self._events:
            await self._next_batch(None)
        return self._events.popleft()

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None when none arrives within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._events:
            left = deadline - loop.time()
            if left <= 0 or not await self._next_batch(left):
                return None
        return self._events.popleft()

    async def drain(
        self, idle: float = 1.0, *, until: float | None = None, limit: float = 30.0
    ) -> list[Event]:
        """The events up to now: until none arrives for ``idle`` seconds, or one is stamped
        at or after ``until`` (Unix time; it is included), or ``limit`` seconds passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        events: list[Event] = []
        while (left := deadline - loop.time()) > 0:
            event = await self.get(min(idle, left))
            if event is None:
                break
            events.append(event)
            if until is not None and event.time >= until:
                break
        return events

    async def _next_batch(self, timeout: float | None) -> bool:
        """Move the next batch's events out (acking it); False on ``timeout``."""
        if self._consumer is None:
            raise RuntimeError("the EventReader is not started: use `async with`")
        while not self._batches:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return False
        events, delivery = self._batches.popleft()
        if delivery.properties.headers and isinstance(
            offset := delivery.properties.headers.get("x-stream-offset"), int
        ):
            self.last_offset = offset
        self._events.extend(events)
        await settle(delivery, ack=True)
        return True
