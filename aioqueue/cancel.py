"""Cancellation: a broadcast of cancelled task ids that every worker reads.

``await app.cancel(task_id)`` (and ``handle.cancel()``, ``aioqueue cancel``) publishes, confirmed,
one message to the stream ``aioqueue.cancellations``: a JSON object ``{"ids": [...], "time": t}``.
Every worker consumes that stream from "now - ``Settings.cancellations_max_age``" on, so a worker
started after the cancel still learns of it while the stream keeps it, and keeps the ids in a
bounded, time-expiring `CancelledIds`. Before consuming its work queues a worker publishes a
marker of its own to the stream and waits (bounded) until it reads it back: every cancellation
published before it started is known by then.

With signing keys (``App(..., signing_keys=...)``) every message to the stream is signed, and a
worker applies only those whose signature verifies: an unsigned or forged cancellation is
ignored, warned and counted (`CancelListener.refused`), so whoever can publish to the broker
but holds no key cannot stop tasks. There is no freshness check: a cancellation is read back
for ``Settings.cancellations_max_age`` by design, and replaying one cancels the same ids again
(its signed ``time`` keeps their expiry).

What a worker does with a cancelled id is in `aioqueue.worker.pipeline`: a queued (or delayed)
delivery is dead-lettered with reason ``cancelled``; a running ``async def`` task has its
coroutine cancelled; a running plain function sees ``task_context().cancelled``. Cancelling an
unknown or finished id changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from pamqp import commands as spec

from .broker import Broker, Consumer, Delivery, settle
from .errors import SignatureError
from .message.signing import SigningKeys, sign, verify
from .topology import CANCELLATIONS_STREAM, cancellations_stream_arguments

__all__ = ["CancelListener", "CancelledIds", "publish_cancellations"]

log = logging.getLogger("aioqueue.cancel")

MAX_IDS_PER_MESSAGE = 1000
MAX_KNOWN = 100_000  # cancelled ids a worker keeps at most (the oldest go first)


async def declare_stream(broker: Broker) -> None:
    arguments = cancellations_stream_arguments(broker.settings.cancellations_max_age)
    await broker.declare_queue(CANCELLATIONS_STREAM, arguments)


def _properties(body: bytes, signing: SigningKeys | None) -> spec.Basic.Properties:
    properties = spec.Basic.Properties(
        content_type="application/json", delivery_mode=2, message_id=uuid.uuid4().hex
    )
    if signing is not None:
        sign(properties, body, signing, due_at=time.time())
    return properties


async def publish_cancellations(
    broker: Broker, task_ids: Iterable[str], signing: SigningKeys | None = None
) -> None:
    """Publish (confirmed) the cancellation of ``task_ids`` to ``aioqueue.cancellations``,
    signed with ``signing``'s first key when given."""
    ids = [str(task_id) for task_id in task_ids]
    for task_id in ids:
        if not task_id or len(task_id) > 255:
            raise ValueError(f"not a task id: {task_id!r}")
    await declare_stream(broker)
    for start in range(0, len(ids), MAX_IDS_PER_MESSAGE):
        chunk = ids[start : start + MAX_IDS_PER_MESSAGE]
        body = json.dumps({"ids": chunk, "time": time.time()}).encode()
        await broker.publish(CANCELLATIONS_STREAM, body, _properties(body, signing))
    log.info("published the cancellation of %d task(s): %s", len(ids), ", ".join(ids[:10]))


class CancelledIds:
    """Cancelled task ids, each kept until ``max_age`` seconds after its cancellation, at most
    ``limit`` of them (the oldest are forgotten first)."""

    def __init__(self, max_age: float, limit: int = MAX_KNOWN) -> None:
        self.max_age = max_age
        self.limit = limit
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> when it is forgotten

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, task_id: str, at: float) -> None:
        self._ids[task_id] = at + self.max_age
        self._ids.move_to_end(task_id)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def __contains__(self, task_id: object) -> bool:
        until = self._ids.get(task_id) if isinstance(task_id, str) else None
        if until is None:
            return False
        if until < time.time():
            del self._ids[task_id]  # type: ignore[arg-type]
            return False
        return True


def _worth_a_warning(count: int) -> bool:
    return count <= 10 or count % 1000 == 0


class CancelListener:
    """A worker's reader of ``aioqueue.cancellations``: fills `ids`, calls ``on_cancel(id)``.

    With ``signing``, only messages whose signature verifies are read (its own marker is
    signed too); `refused` counts the others."""

    def __init__(
        self,
        broker: Broker,
        on_cancel: Callable[[str], None],
        signing: SigningKeys | None = None,
    ) -> None:
        self.broker = broker
        self.signing = signing
        self.refused = 0
        self.ids = CancelledIds(broker.settings.cancellations_max_age)
        self._on_cancel = on_cancel
        self._consumer: Consumer | None = None
        self._marker = f"marker.{uuid.uuid4().hex}"
        self._caught_up = asyncio.Event()
        self._retry: asyncio.Future[None] | None = None

    async def start(self, *, catch_up_timeout: float = 10.0) -> None:
        """Consume the stream from now - max-age, and wait (at most ``catch_up_timeout``
        seconds) until the cancellations published before this call were read.

        A consume the broker refuses (on RabbitMQ 3.10 a node without a replica of the stream
        refuses its consumers: a node that was down when the stream was declared) never stops
        the worker: it runs without cancellations, warned, and tries again in the background.
        """
        await declare_stream(self.broker)
        if await self._subscribe():
            await self._catch_up(catch_up_timeout)
        else:
            self._retry = asyncio.ensure_future(self._subscribe_later())

    async def _subscribe(self) -> bool:
        since = time.time() - self.broker.settings.cancellations_max_age
        try:
            self._consumer = await self.broker.subscribe(
                CANCELLATIONS_STREAM,
                self._on_message,
                prefetch=100,
                arguments={"x-stream-offset": datetime.fromtimestamp(since, UTC)},
            )
        except Exception as exc:
            log.warning(
                "cannot read %s (%s): this worker does not know of cancellations until it can",
                CANCELLATIONS_STREAM,
                exc,
            )
            return False
        return True

    async def _subscribe_later(self) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            if await self._subscribe():
                log.info("reading %s again: cancellations are known again", CANCELLATIONS_STREAM)
                return
            delay = min(delay * 2, 30.0)

    async def _catch_up(self, timeout: float) -> None:
        body = json.dumps({"ids": [], "marker": self._marker, "time": time.time()}).encode()
        await self.broker.publish(CANCELLATIONS_STREAM, body, _properties(body, self.signing))
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout)
        except TimeoutError:
            log.warning(
                "the cancellations stream was not read up to now within %gs: going on", timeout
            )

    async def _on_message(self, delivery: Delivery) -> None:
        try:
            if self.signing is not None:
                verify(delivery.properties, delivery.body, self.signing)
            self._read(delivery.body)
        except SignatureError as exc:
            self.refused += 1
            # warned for the first few, then every thousandth: a stream full of them (keys
            # just turned on) must not flood the log at each worker start
            level = logging.WARNING if _worth_a_warning(self.refused) else logging.DEBUG
            log.log(
                level,
                "ignored a cancellation that is not signed with one of this app's keys "
                "(%s; %d so far): it cancels nothing",
                exc,
                self.refused,
            )
        except Exception as exc:  # a broken message must never stop the reader
            log.warning("skipped an unreadable message of %s: %s", CANCELLATIONS_STREAM, exc)
        await settle(delivery, ack=True)

    def _read(self, body: bytes) -> None:
        if len(body) > self.broker.settings.max_message_size:
            raise ValueError("too large")
        message = json.loads(body)
        if not isinstance(message, dict):
            raise ValueError("not an object")
        if message.get("marker") == self._marker:
            self._caught_up.set()
        at = message.get("time")
        at = float(at) if isinstance(at, int | float) else time.time()
        ids = message.get("ids")
        if not isinstance(ids, list):
            raise ValueError("no list of ids")
        for task_id in ids:
            if isinstance(task_id, str) and task_id:
                self.ids.add(task_id, at)
                self._on_cancel(task_id)

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.close()
