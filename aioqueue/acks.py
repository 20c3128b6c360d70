"""Acks batched per channel with ``multiple=True``, over unbroken runs of settled deliveries.

Delivery tags on a channel count up from 1. Once every tag up to ``T`` is settled (acked or
rejected), one ``basic.ack(T, multiple=True)`` acks all of them that are still outstanding.
Settlements are collected during one event-loop iteration and flushed at its end, so a burst
of finished tasks costs one frame instead of one each. A tag settled above a gap (a slower task
still holds a lower tag) is acked on its own at the flush, so a long task never holds back the
prefetch window. Rejections are sent at once and only count towards contiguity.

Only the consumer of a channel settles its deliveries here (one `Acker` per channel, per
channel generation): a reconnect brings a new channel and a new `Acker`, and acks for the old
one are dropped as stale — RabbitMQ redelivers those messages.
"""

from __future__ import annotations

import asyncio
import logging

import aiormq

__all__ = ["Acker"]

log = logging.getLogger("aioqueue.broker")

_STALE = (aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError, ConnectionError)


class Acker:
    """Batches the acks of one aiormq channel."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._floor = 0  # every tag <= floor is settled
        self._settled: set[int] = set()  # settled tags above the floor
        self._unsent: set[int] = set()  # acked by us, not yet sent to RabbitMQ
        self._scheduled = False
        self._sends: set[asyncio.Task[None]] = set()

    def _first_settle(self, tag: int) -> bool:
        """False (and a warning) if ``tag`` was settled before: RabbitMQ would close the
        channel for an unknown delivery tag, taking every other delivery on it along."""
        if tag <= self._floor or tag in self._settled:
            log.warning("delivery %s settled twice; the second settle is ignored", tag)
            return False
        return True

    def ack(self, tag: int) -> None:
        """Ack ``tag`` at the end of this event-loop iteration."""
        if not self._first_settle(tag):
            return
        self._settled.add(tag)
        self._unsent.add(tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def settled_elsewhere(self, tag: int) -> None:
        """``tag`` was rejected, or acked on its own: it only counts towards contiguity."""
        self._settled.add(tag)

    async def ack_now(self, tag: int) -> None:
        """Ack ``tag`` on its own and wait until the frame is written."""
        if not self._first_settle(tag):
            return
        self.settled_elsewhere(tag)
        await self.channel.basic_ack(tag, wait=True)

    async def reject(self, tag: int, *, requeue: bool, flush: bool = False) -> None:
        """Reject ``tag`` (back to its queue when ``requeue``)."""
        if not self._first_settle(tag):
            return
        self.settled_elsewhere(tag)
        await self.channel.basic_reject(tag, requeue=requeue, wait=flush)

    async def flush(self) -> None:
        """Send what is pending now and wait until it is written."""
        self._flush()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    def _flush(self) -> None:
        self._scheduled = False
        top = 0
        while self._floor + 1 in self._settled:
            self._floor += 1
            self._settled.discard(self._floor)
            if self._floor in self._unsent:
                self._unsent.discard(self._floor)
                top = self._floor
        if top:
            self._send(top, multiple=True)
        for tag in sorted(self._unsent):  # above a gap: alone, so prefetch is not held back
            self._send(tag, multiple=False)
        self._unsent.clear()

    def _send(self, tag: int, *, multiple: bool) -> None:
        task = asyncio.ensure_future(self._write(tag, multiple))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _write(self, tag: int, multiple: bool) -> None:
        try:
            await self.channel.basic_ack(tag, multiple=multiple, wait=False)
        except _STALE as exc:
            log.debug("dropped stale ack %s (%s): RabbitMQ redelivers those messages", tag, exc)
