"""Events a running task sends its caller: progress updates, and the items a generator yields.

Progress goes to the caller's reply queue; items go to the handle's own stream queue
(``aioqueue.stream.<task id>``), which the caller consumes with a small prefetch so a fast
generator cannot flood a slow reader. Both carry sequence numbers (``aioqueue-seq``, from 1 on
every run), so the caller drops what a redelivered or retried run repeats.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..broker import Broker
from ..errors import UnroutableError
from ..message import Envelope, check_json_native, event_properties
from ..message import dumps as json_dumps
from ..message.signing import SigningKeys, sign
from .events import notify

__all__ = ["Emitter"]

log = logging.getLogger("aioqueue.worker")


class Emitter:
    """Publishes one run's progress and items, each confirmed by RabbitMQ."""

    def __init__(
        self,
        broker: Broker,
        envelope: Envelope,
        *,
        observers: Sequence[object] = (),
        signing: SigningKeys | None = None,
    ) -> None:
        self._broker = broker
        self._signing = signing
        self._envelope = envelope
        self._observers = observers
        self._progress_seq = 0
        self._item_seq = 0
        self._stream_gone = False

    @property
    def items(self) -> int:
        return self._item_seq

    async def progress(self, data: Any) -> None:
        check_json_native(data, "progress data")
        envelope = self._envelope
        notify(self._observers, "progress", envelope.task, envelope.id, envelope.attempt, data)
        if not self._envelope.reply_to or self._envelope.celery is not None:
            return  # a Celery caller's rpc:// queue takes outcomes only
        self._progress_seq += 1
        await self._send(self._envelope.reply_to, "progress", self._progress_seq, data)

    async def item(self, value: Any) -> None:
        check_json_native(value, "a yielded item")
        self._item_seq += 1
        target = self._envelope.stream_to
        if target is None or self._stream_gone:
            return
        try:
            await self._send(target, "item", self._item_seq, value)
        except UnroutableError:
            self._stream_gone = True  # the caller is gone (its stream queue expired)
            log.warning(
                "stream queue %r of task %s is gone; items are discarded",
                target,
                self._envelope.task,
            )

    async def _send(self, queue: str, kind: str, seq: int, data: Any) -> None:
        properties = event_properties(self._envelope.id, kind, seq)
        body = json_dumps(data)
        if self._signing is not None:
            sign(properties, body, self._signing, due_at=self._broker.now())
        await self._broker.publish(queue, body, properties)
