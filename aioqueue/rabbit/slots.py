"""The scheduler's slots in RabbitMQ: what fired last, and firing one in a transaction.

``aioqueue.scheduler.<app>.state.<schedule>`` is a durable queue (quorum with a quorum app) with
``x-max-length=1``
and ``x-overflow=drop-head``: it holds one persistent message, the schedule's `SlotRecord` (the
last slot fired); each new record pushes the old one out. A new leader reads it with
``basic.get`` and puts it back (reject with requeue; drop-head keeps the newer of the two).

A slot fires in one AMQP transaction on the leader's lease connection: the new record and the
task message are published, then ``tx.commit``. So

- a leader that dies before RabbitMQ processed the commit fired nothing: the record still
  names the previous slot, and the next leader fires this one (within ``grace``, on time);
- a commit RabbitMQ processed enqueued both: the next leader sees the slot as fired;
- a leader that lost its connection cannot commit at all (the fence).

No slot is submitted twice, and none is lost to a scheduler crash. What remains: RabbitMQ
makes a transaction over several queues atomic except when the *broker* fails mid-commit, which
could leave the task without the record (the slot may be submitted again) or the record
without the task (the slot is lost).

Schedules with ``skip_if_running`` send their runs' outcomes (``reply_to``) to a durable
``aioqueue.scheduler.<app>.done.<schedule>`` queue; `SlotStore.finished` reads it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import aiormq.abc
from pamqp import commands as spec

from ..errors import DecodeError
from ..message import CONTENT_TYPE, Envelope, refuse_unreadable, task_properties
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
    """

    def __init__(
        self, lease: Lease, app_name: str, *, identity: str, queue_type: QueueType = "classic"
    ) -> None:
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
        channel = self._lease.channel
        queue = state_queue_name(self._app_name, schedule_name)
        await self.declare(queue, self._state_arguments)
        messages = await self._get_all(channel, queue)
        records = [r for r in (self._decode(queue, m) for m in messages) if r is not None]
        best = max(records, key=lambda r: r.slot, default=None)
        for message in messages:
            await channel.basic_reject(_tag(message), requeue=True)
        if len(messages) > 1 and best is not None:
            await self._commit(schedule_name, best)  # the newest message is the one kept
        return best

    async def fire(
        self, schedule_name: str, slot: datetime, queue: str, envelope: Envelope
    ) -> None:
        """Record ``slot`` as fired and submit its task to ``queue``: both or neither."""
        await self._commit(schedule_name, SlotRecord(slot, by=self._identity), (queue, envelope))

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

    async def _commit(
        self, schedule_name: str, record: SlotRecord, task: tuple[str, Envelope] | None = None
    ) -> None:
        tx = self._lease.tx
        timeout = self._lease.timeout
        await tx.basic_publish(
            record.encode(),
            routing_key=state_queue_name(self._app_name, schedule_name),
            properties=spec.Basic.Properties(
                content_type=CONTENT_TYPE, delivery_mode=2, app_id=self._identity
            ),
            mandatory=True,
            timeout=timeout,
        )
        if task is not None:
            queue, envelope = task
            await tx.basic_publish(
                envelope.encode(),
                routing_key=queue,
                properties=task_properties(envelope),
                mandatory=True,
                timeout=timeout,
            )
        await tx.tx_commit(timeout=timeout)

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
