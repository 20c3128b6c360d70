"""Acks batched per channel with ``multiple=True``, over unbroken runs of settled deliveries.

Delivery tags on a channel count up from 1. Once every tag up to ``T`` is settled (acked or
rejected), one ``basic.ack(T, multiple=True)`` acks all of them that are still outstanding.
Settlements are collected during one event-loop iteration and flushed at its end, so a burst
of finished tasks costs one frame instead of one each. A tag settled above a gap (a slower task
still holds a lower tag) is acked on its own at the flush, so a long task never holds back the
prefetch window. Rejections are sent at once and only count towards contiguity.

Acks and rejections are written in the order they were made, through one `FrameBatch` per
channel (see `aioqueue.rabbit.frames` for why aiormq's awaited writes cannot be relied on for that).

Only the consumer of a channel settles its deliveries here (one `Acker` per channel, per
channel generation): a reconnect brings a new channel and a new `Acker`, and acks for the old
one are dropped as stale — RabbitMQ redelivers those messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiormq

from ..broker import StaleDelivery
from .errors import STALE
from .frames import FrameBatch, ack_frame, reject_frame

__all__ = ["Acker"]

log = logging.getLogger("aioqueue.broker")


class Acker:
    """Batches the acks of one aiormq channel."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._number = channel.number
        self._frames = FrameBatch(channel)
        self._floor = 0  # every tag <= floor is settled
        self._settled: set[int] = set()  # settled tags above the floor
        self._unsent: set[int] = set()  # acked by us, not yet sent to RabbitMQ
        self._scheduled = False
        self._loop = asyncio.get_running_loop()  # once: each lookup is a system call

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
            self._loop.call_soon(self._flush)

    def settled_elsewhere(self, tag: int) -> None:
        """``tag`` was rejected, or acked on its own: it only counts towards contiguity."""
        self._settled.add(tag)

    async def ack_now(self, tag: int) -> None:
        """Ack ``tag`` on its own and wait until the frame is written."""
        if not self._first_settle(tag):
            return
        self.settled_elsewhere(tag)
        self._frames.add(ack_frame(self._number, tag, multiple=False))
        await self._written()

    async def reject(self, tag: int, *, requeue: bool, flush: bool = False) -> None:
        """Reject ``tag`` (back to its queue when ``requeue``); with ``flush``, wait until the
        frame is written."""
        if not self._first_settle(tag):
            return
        self.settled_elsewhere(tag)
        self._frames.add(reject_frame(self._number, tag, requeue=requeue))
        if flush:
            await self._written()
        else:
            self._frames.send()

    async def _written(self) -> None:
        try:
            await self._frames.written()
        except STALE as exc:
            raise StaleDelivery(f"{type(exc).__name__}: {exc}") from exc

    async def flush(self) -> None:
        """Send what is pending now and wait until it is written (on a channel that closed
        meanwhile, the acks are dropped: RabbitMQ redelivers those messages)."""
        self._flush()
        with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError):
            await self._frames.written()

    def _flush(self) -> None:
        self._scheduled = False
        top = 0
        while self._floor + 1 in self._settled:
            self._floor += 1
            self._settled.discard(self._floor)
            if self._floor in self._unsent:
                self._unsent.discard(self._floor)
                top = self._floor
        if self.channel.is_closed:
            if top or self._unsent:
                stale = sorted({top, *self._unsent} - {0})
                log.debug("dropped stale acks %s: RabbitMQ redelivers those messages", stale)
            self._unsent.clear()
            return
        if top:
            self._frames.add(ack_frame(self._number, top, multiple=True))
        for tag in sorted(self._unsent):  # above a gap: alone, so prefetch is not held back
            self._frames.add(ack_frame(self._number, tag, multiple=False))
        self._unsent.clear()
        self._frames.send()
