"""Stream queues in memory (``x-queue-type: stream``): an append-only log every consumer reads.

As on RabbitMQ, each consumer receives every message from the offset it asked for
(``x-stream-offset``: ``"first"``, ``"next"`` (default), or a time as a `datetime` or Unix
seconds) on; settling is accepted and changes nothing, and the log is kept by age
(``x-max-age``, seconds or RabbitMQ's ``"1h"`` form) on the broker's clock.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pamqp import commands as spec

from ..broker import Delivery, DeliveryCallback

__all__ = ["MemoryStream", "StreamSubscription"]

_UNITS = {"Y": 365 * 86400, "M": 30 * 86400, "D": 86400, "h": 3600, "m": 60, "s": 1}


def _max_age(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(\d+)([YMDhms])", value) if isinstance(value, str) else None
    return float(match[1]) * _UNITS[match[2]] if match else None


class MemoryStream:
    """One stream queue's log: (time, body, properties), oldest first."""

    def __init__(
        self,
        name: str,
        arguments: dict[str, Any],
        now: Callable[[], float],
        spawn: Callable[[DeliveryCallback, Delivery], None],
    ) -> None:
        self.name = name
        self.log: deque[tuple[float, bytes, spec.Basic.Properties]] = deque()
        self.consumers: list[StreamSubscription] = []
        self._max_age = _max_age(arguments.get("x-max-age"))
        self._now = now
        self._spawn = spawn

    def append(self, body: bytes, properties: spec.Basic.Properties) -> None:
        now = self._now()
        if self._max_age is not None:
            while self.log and self.log[0][0] < now - self._max_age:
                self.log.popleft()
        self.log.append((now, body, properties))
        for consumer in list(self.consumers):
            consumer.deliver(body, properties)

    def subscribe(
        self, callback: DeliveryCallback, arguments: dict[str, Any] | None
    ) -> StreamSubscription:
        offset = (arguments or {}).get("x-stream-offset", "next")
        if isinstance(offset, datetime):
            offset = offset.timestamp()
        subscription = StreamSubscription(self, callback)
        if offset != "next":
            since = float("-inf") if offset == "first" else float(offset)
            for at, body, properties in list(self.log):
                if at >= since:
                    subscription.deliver(body, properties)
        self.consumers.append(subscription)
        return subscription


class StreamSubscription:
    """One consumer of a memory stream; also its own (no-op) settler."""

    def __init__(self, stream: MemoryStream, callback: DeliveryCallback) -> None:
        self._stream = stream
        self.queue = stream.name
        self._callback = callback
        self._tags = itertools.count(1)
        self._active = True

    def deliver(self, body: bytes, properties: spec.Basic.Properties) -> None:
        if self._active:
            delivery = Delivery(body, properties, False, self.queue, next(self._tags), self)
            self._stream._spawn(self._callback, delivery)

    def ack(self, tag: int) -> None:
        return None

    async def ack_now(self, tag: int) -> None:
        return None

    async def reject(self, tag: int, *, requeue: bool, flush: bool = False) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def cancel(self) -> None:
        self._active = False
        if self in self._stream.consumers:
            self._stream.consumers.remove(self)

    async def close(self) -> None:
        await self.cancel()
        await asyncio.sleep(0)
