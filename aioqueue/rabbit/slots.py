"""The scheduler's slots in RabbitMQ: what fired last, and firing one, confirmed.

``aioqueue.scheduler.<app>.state.<schedule>`` is a durable queue (quorum with a quorum app) with
``x-max-length=1``
and ``x-overflow=drop-head``: it holds one persistent message, the schedule's `SlotRecord` (the
last slot fired); each new record pushes the old one out. A new leader reads it with
``basic.get`` and puts it back (reject with requeue; drop-head keeps the newer of the two).

A slot fires on the leader's lease connection, with publisher confirms: the new record and the
task message are published together, and each must be confirmed. So

- a leader that lost its connection cannot publish at all (the fence);
- a leader that dies before RabbitMQ took either fired nothing: the record still names the
  previous slot, and the next leader fires this one (within ``grace``, on time);
- a message RabbitMQ refuses (a nack: on 3.10, a quorum queue whose first publish from a channel
  finds its recorded leader's node down or no leader elected; any queue full with
  ``x-overflow=reject-publish``) was not enqueued, so it is published again, alone, until
  confirmed: a refused task cannot run twice, a refused record is the same record again.

Not a transaction: ``tx.commit`` answers ``commit-ok`` although a queue refused its message
while the commit delivered it (``rabbit_channel``, every version to 4.1: the handler sets the
transaction to ``committing`` after the refusal marked it ``failed``; rabbitmq-server #8966).
The scheduler used one: such a slot was recorded as fired and its task silently dropped. What
remains: a leader whose connection is lost after RabbitMQ took one of the two messages and
before it took the other (a node dying between two frames, or a lease lost while a refused one
is published again, logged as an error naming the slot) leaves the record without the task or
the task without the record.

Schedules with ``skip_if_running`` send their runs' outcomes (``reply_to``) to a durable
``aioqueue.scheduler.<app>.done.<schedule>`` queue; `SlotStore.finished` reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiormq.abc
import aiormq.exceptions
from pamqp import commands as spec

from ..errors import DecodeError
from ..message import CONTENT_TYPE, Envelope, refuse_unreadable
from ..message.properties import task_message
from ..message.signing import SigningKeys
from ..scheduler.records import (
    SlotRecord,
    done_queue_name,
    state_queue_arguments,
    state_queue_name,
)
from ..topology import QueueType
from .lease import Lease

__all__ = ["SlotStore"]

log = logging.getLogger("aioqueue.scheduler")


class SlotStore:
    """Reads slot records and fires slots through the leader's lease connection.

    Args:
        lease: The held lease; every operation fails with `LeaseLost` once it is gone.
        app_name: Whose schedules these are (names the queues).
        identity: This instance's name, written into each record.
        queue_type: Type of the state queues (the app's: quorum replicates them).
        signing: The app's signing keys: each fired task message is signed, due now.
    """

    def __init__(
        self,
        lease: Lease,
        app_name: str,
        *,
        identity: str,
        queue_type: QueueType = "classic",
        signing: SigningKeys | None = None,
    ) -> None:
        self._signing = signing
        self._lease = lease
        self._app_name = app_name
        self._identity = identity
        self._state_arguments = state_queue_arguments(queue_type)

    async def declare(self, queue: str, arguments: dict[str, Any]) -> None:
        """Declare a durable queue the fires publish to (so they are never unroutable); one
        that exists with other arguments is used as it is (`Lease.declare`)."""
        self._lease.check()
        await self._lease.declare(queue, arguments)

    async def load(self, schedule_name: str) -> SlotRecord | None:
        """Declare the schedule's state queue and read its record (None if it has none)."""
        await self.declare(state_queue_name(self._app_name, schedule_name), self._state_arguments)
        best, count = await self._current(schedule_name)
        if count > 1 and best is not None:  # the newest message is the one kept
            newest = best
            await self._until_confirmed(lambda: self._record(schedule_name, newest))
        return best

    async def fire(
        self, schedule_name: str, slot: datetime, queue: str, envelope: Envelope
    ) -> None:
        """Record ``slot`` as fired and submit its task to ``queue``, each until RabbitMQ
        confirms it (module docstring)."""
        record = SlotRecord(slot, by=self._identity)
        taken = await asyncio.gather(
            self._record(schedule_name, record), self._task(queue, envelope)
        )
        if all(taken):
            return
        refused = " and ".join(n for n, ok in zip(("record", "task"), taken, strict=True) if not ok)
        log.warning(
            "schedule %r: RabbitMQ refused the %s of slot %s; publishing again",
            schedule_name,
            refused,
            slot.isoformat(),
        )
        try:
            if not taken[0]:
                await self._until_confirmed(lambda: self._record(schedule_name, record))
            if not taken[1]:
                await self._until_confirmed(lambda: self._task(queue, envelope))
        except BaseException:
            log.error(
                "schedule %r: slot %s was not recorded and submitted (RabbitMQ took the %s)",
                schedule_name,
                slot.isoformat(),
                "task" if taken[1] else "record" if taken[0] else "neither",
            )
            raise

    async def finished(self, schedule_name: str, run_id: str) -> bool:
        """Whether the outcome of run ``run_id`` has arrived.

        Outcomes of earlier runs are acked away; the one of ``run_id`` is put back, so that a
        leader dying now leaves it for the next one.
        """
        channel = self._lease.channel
        messages = await self._get_all(channel, done_queue_name(self._app_name, schedule_name))
        found = False
        for message in messages:
            if message.header.properties.correlation_id == run_id:
                found = True
                await channel.basic_reject(_tag(message), requeue=True)
            else:
                await channel.basic_ack(_tag(message))
        return found

    async def _current(self, schedule_name: str) -> tuple[SlotRecord | None, int]:
        """The state queue's newest record (read, then put back) and how many it holds."""
        channel = self._lease.channel
        queue = state_queue_name(self._app_name, schedule_name)
        messages = await self._get_all(channel, queue)
        records = [r for r in (self._decode(queue, m) for m in messages) if r is not None]
        for message in messages:
            await channel.basic_reject(_tag(message), requeue=True)
        return max(records, key=lambda r: r.slot, default=None), len(messages)

    @staticmethod
    async def _until_confirmed(publish: Callable[[], Awaitable[bool]]) -> None:
        """``publish`` again, pausing between tries, until RabbitMQ confirms it or the lease is
        lost (a refused message was not enqueued: publishing it again duplicates nothing)."""
        delay = 0.2
        while not await publish():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _record(self, schedule_name: str, record: SlotRecord) -> bool:
        return await self._publish(
            record.encode(),
            state_queue_name(self._app_name, schedule_name),
            spec.Basic.Properties(
                content_type=CONTENT_TYPE, delivery_mode=2, app_id=self._identity
            ),
        )

    async def _task(self, queue: str, envelope: Envelope) -> bool:
        body, properties = task_message(envelope, self._signing, due_at=time.time())
        return await self._publish(body, queue, properties)

    async def _publish(self, body: bytes, queue: str, properties: spec.Basic.Properties) -> bool:
        """Publish on the lease's confirm channel: True if RabbitMQ confirmed it, False if it
        refused it. A quorum queue electing a leader holds the confirm for seconds: wait for
        it (six lease timeouts) while the connection, so the lease, lives."""
        try:
            confirm = await self._lease.publisher.basic_publish(
                body,
                routing_key=queue,
                properties=properties,
                mandatory=True,
                timeout=self._lease.timeout * 6,
            )
        except aiormq.exceptions.PublishError:
            raise  # returned unroutable: the queue is gone; the next term declares it again
        except aiormq.exceptions.DeliveryError as exc:  # a nack
            if isinstance(exc.frame, spec.Basic.Nack | spec.Basic.Reject):
                return False
            raise
        return isinstance(confirm, spec.Basic.Ack)

    async def _get_all(
        self, channel: aiormq.abc.AbstractChannel, queue: str
    ) -> list[aiormq.abc.DeliveredMessage]:
        """Every ready message of ``queue``, unacked (a state queue holds one, rarely two)."""
        messages: list[aiormq.abc.DeliveredMessage] = []
        while True:
            message = await channel.basic_get(queue, no_ack=False, timeout=self._lease.timeout)
            if isinstance(message.delivery, spec.Basic.GetEmpty):
                return messages
            messages.append(message)

    @staticmethod
    def _decode(queue: str, message: aiormq.abc.DeliveredMessage) -> SlotRecord | None:
        try:
            refuse_unreadable(message.header.properties.headers)  # not written by a scheduler
            return SlotRecord.decode(message.body)
        except DecodeError as exc:
            log.warning("ignoring a message in %r: %s", queue, exc)
            return None


def _tag(message: aiormq.abc.DeliveredMessage) -> int:
    delivery: Any = message.delivery
    return int(delivery.delivery_tag)
