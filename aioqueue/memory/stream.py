"""A RabbitMQ stream in memory: an append-only log that every consumer reads from an offset.

As on RabbitMQ, a queue declared with ``x-queue-type: stream`` keeps its messages after they
are delivered; each consumer starts where its ``x-stream-offset`` argument says (``"first"``,
``"next"``, ``"last"``, an offset, or a timestamp as a `datetime`) and gets each message with
its offset in the ``x-stream-offset`` header. Old messages are dropped past
``x-max-length-bytes``. Acks only make room under the consumer's prefetch.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pamqp import commands as spec

from ..broker import Delivery, DeliveryCallback, run_callback

__all__ = ["MemoryStream", "StreamConsumer"]


@dataclass(slots=True)
class _Entry:
    offset: int
    time: float
    body: bytes
    properties: spec.Basic.Properties


@dataclass(slots=True)
class MemoryStream:
    """The log of one stream queue."""

    name: str
    max_bytes: int | None = None
    entries: deque[_Entry] = field(default_factory=deque)
    consumers: list[StreamConsumer] = field(default_factory=list)
    next_offset: int = 0
    size: int = 0

    def append(self, body: bytes, properties: spec.Basic.Properties, now: float) -> None:
        stored = copy.copy(properties)
        stored.headers = {**(properties.headers or {}), "x-stream-offset": self.next_offset}
        self.entries.append(_Entry(self.next_offset, now, body, stored))
        self.next_offset += 1
        self.size += len(body)
        while self.max_bytes is not None and self.size > self.max_bytes and len(self.entries) > 1:
            self.size -= len(self.entries.popleft().body)
        for consumer in list(self.consumers):
            consumer.pump()

    def start_offset(self, where: Any) -> int:
        """The offset a consumer asking for ``where`` (``x-stream-offset``) starts at."""
        first = self.entries[0].offset if self.entries else self.next_offset
        if where == "first":
            return first
        if where == "last":
            return self.entries[-1].offset if self.entries else self.next_offset
        if isinstance(where, datetime):
            # RabbitMQ starts at the chunk holding that second: here, at the message
            since = int(where.timestamp())
            return next((e.offset for e in self.entries if e.time >= since), self.next_offset)
        if isinstance(where, int) and not isinstance(where, bool):
            return max(where, first)
        return self.next_offset  # "next", and what RabbitMQ would refuse

    def entry(self, offset: int) -> _Entry | None:
        if not self.entries or offset >= self.next_offset:
            return None
        index = offset - self.entries[0].offset
        return self.entries[index] if index >= 0 else self.entries[0]


class StreamConsumer:
    """One consumer of a `MemoryStream`; also its own settler."""

    def __init__(
        self,
        stream: MemoryStream,
        callback: DeliveryCallback,
        prefetch: int,
        offset: int,
        track: Callable[[asyncio.Task[None]], None],
    ) -> None:
        self._stream = stream
        self.queue = stream.name
        self._callback = callback
        self._prefetch = prefetch
        self._cursor = offset
        self._track = track
        self._tags = itertools.count(1)
        self.unacked: set[int] = set()
        self._active = True

    def pump(self) -> None:
        while self._active and len(self.unacked) < self._prefetch:
            entry = self._stream.entry(self._cursor)
            if entry is None:
                return
            self._cursor = entry.offset + 1
            tag = next(self._tags)
            self.unacked.add(tag)
            delivery = Delivery(entry.body, entry.properties, False, self.queue, tag, self)
            self._track(asyncio.ensure_future(run_callback(self._callback, delivery)))

    def ack(self, tag: int) -> None:
        self.unacked.discard(tag)
        self.pump()

    async def ack_now(self, tag: int) -> None:
        self.ack(tag)

    async def reject(self, tag: int, *, requeue: bool, flush: bool = False) -> None:
        self.ack(tag)  # a stream keeps its messages whatever a consumer says

    async def flush(self) -> None:
        return None

    async def cancel(self) -> None:
        self._active = False
        if self in self._stream.consumers:
            self._stream.consumers.remove(self)

    async def close(self) -> None:
        await self.cancel()
