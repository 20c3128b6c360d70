"""Frames written to an aiormq channel in the order they were made, once per loop iteration.

aiormq writes each of its frames with an awaited put on the connection's writer queue (ten
frame sets deep). Under contention `asyncio.Queue.put` is not first come, first served: a put
arriving while a slot is free goes ahead of one already woken for it. For acks that breaks
correctness, not just speed: an ack of one tag overtaken by ``ack(multiple=True)`` covering it
reaches RabbitMQ for a tag no longer outstanding, and RabbitMQ closes the channel
(PRECONDITION_FAILED - unknown delivery tag). `FrameBatch` keeps its own order: what is added
during one iteration goes to the writer queue as one frame set, and a full queue is retried
without anything overtaking.

While the writer queue is empty, the frames skip it: they go straight into the connection's
`CoalescingWriter`, which sends everything written during the iteration in one write at its
end — one iteration sooner than through the queue and aiormq's writer task, and without their
cost. Nothing is overtaken: an empty queue means aiormq's writer has taken, and written, every
frame set put there before (it writes each as it takes it, with no wait in between), and once
a frame of a batch waits in the queue (or for room in it) the batch's later frames follow it
there. Frames with a waiter (`FrameBatch.written`) go through the queue, whose writer tells
when the socket has them.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

from .connection import CoalescingWriter, writer_for

__all__ = ["FrameBatch", "ack_frame", "reject_frame"]

# a Basic.Ack or Basic.Reject method frame: frame type 1, channel, size 13, class 60, method,
# delivery tag, one octet of bits (multiple / requeue), frame end
_SETTLE = struct.Struct(">BHIHHQB")
_ACK, _REJECT = 80, 90
_FRAME_END = b"\xce"
_RETRY_FULL_QUEUE = 0.001  # seconds: the writer queue was full, try again this soon


def ack_frame(channel: int, tag: int, *, multiple: bool) -> bytes:
    return _SETTLE.pack(1, channel, 13, 60, _ACK, tag, multiple) + _FRAME_END


def reject_frame(channel: int, tag: int, *, requeue: bool) -> bytes:
    return _SETTLE.pack(1, channel, 13, 60, _REJECT, tag, requeue) + _FRAME_END


class FrameBatch:
    """Frames for one aiormq channel, sent in the order added. Frames added to a closed
    channel, or pending when it closes, are dropped."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []  # for what is pending to be written
        self._scheduled = False
        self._retrying = False
        self._direct: CoalescingWriter | None = None  # took frames since the last `send`

    def add(self, frame: bytes) -> None:
        """Send ``frame`` at the end of this event-loop iteration, after those added before."""
        if not self._pending:  # nothing of ours is held back: it may go past the queue
            channel = self.channel
            writer = None if channel.is_closed else writer_for(channel.write_queue)
            if writer is not None:
                writer.write_soon(frame)
                self._direct = writer
                return
        self._pending.append(frame)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def send(self) -> None:
        """Hand what is pending to the socket (frames written past the queue) or the writer
        queue now (unless a full queue holds it back)."""
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.flush()
        if not self._retrying:
            self._flush()

    async def written(self) -> None:
        """Send what is pending and wait until the socket has it (with everything before).

        Raises:
            ChannelInvalidStateError: the channel closed first; those frames were dropped.
        """
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        self.send()
        await waiter

    def _flush(self) -> None:
        self._scheduled = self._retrying = False
        pending, waiters = self._pending, self._waiters
        if self.channel.is_closed:
            pending.clear()
            self._waiters = []
            _fail(waiters, aiormq.exceptions.ChannelInvalidStateError("channel closed"))
            return
        if not pending and not waiters:
            return
        # aiormq resolves a frame's drain future once the socket has it, and rejects it when
        # the channel or connection closes first (it is one of the channel's futures)
        drain = self.channel.create_future() if waiters else None
        payload = pending[0] if len(pending) == 1 else b"".join(pending)
        frame = ChannelFrame(payload=payload, should_close=False, drain_future=drain)
        try:
            self.channel.write_queue.put_nowait(frame)
        except asyncio.QueueFull:  # the writer is behind: keep the order, try again shortly
            self._scheduled = self._retrying = True
            self._loop.call_later(_RETRY_FULL_QUEUE, self._flush)
            if drain is not None:
                drain.cancel()
            return
        self._pending, self._waiters = [], []
        if drain is not None:
            drain.add_done_callback(lambda done: _settle(waiters, done))


def _settle(waiters: list[asyncio.Future[None]], drain: asyncio.Future[Any]) -> None:
    if drain.cancelled() or drain.exception() is not None:
        _fail(waiters, aiormq.exceptions.ChannelInvalidStateError("channel closed"))
        return
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _fail(waiters: list[asyncio.Future[None]], error: Exception) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)
