"""The ack batcher, against a channel whose writer decodes the frames (with pamqp) and checks
them as RabbitMQ would: an ack or reject of a tag no longer outstanding closes the channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec

from aioqueue.rabbit.acks import Acker
from aioqueue.rabbit.connection import CoalescingWriter
from aioqueue.rabbit.frames import FrameBatch, ack_frame, reject_frame
from tests.waiting import wait_until


class Channel:
    """What `Acker` uses of an aiormq channel, with a writer task like aiormq's."""

    def __init__(self, *, queue_size: int = 10, slow: bool = False) -> None:
        self.number = 3
        self.is_closed = False
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
        self.outstanding: set[int] = set(range(1, 1001))
        self.frames: list[tuple[str, int, bool]] = []
        self.errors: list[str] = []
        self.slow = slow
        self._writer = asyncio.ensure_future(self._write())

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _write(self) -> None:
        while True:
            frame = await self.write_queue.get()
            self.receive(frame.payload)
            if frame.drain_future is not None:
                frame.drain_future.set_result(None)
            if self.slow:  # a writer that falls behind: the queue fills up
                for _ in range(5):
                    await asyncio.sleep(0)  # sleep-ok: five iterations per frame set

    def receive(self, payload: bytes) -> None:
        """What RabbitMQ reads: each settle checked against the outstanding tags."""
        while payload:
            used, channel, method = pamqp.frame.unmarshal(payload)
            payload = payload[used:]
            assert channel == self.number
            if isinstance(method, spec.Basic.Ack):
                self._settle("ack", method.delivery_tag, method.multiple)
            else:
                assert isinstance(method, spec.Basic.Reject)
                self._settle("reject", method.delivery_tag, False)

    def _settle(self, kind: str, tag: int, multiple: bool) -> None:
        if tag not in self.outstanding:
            self.errors.append(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
            return
        self.frames.append((kind, tag, multiple))
        gone = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        self.outstanding -= gone

    async def close(self) -> None:
        self._writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._writer


@pytest.fixture
async def channel() -> AsyncIterator[Channel]:
    channel = Channel()
    yield channel
    await channel.close()


def test_ack_and_reject_frames_are_pamqps_bytes() -> None:
    for tag, flag in ((1, True), (2**40 + 5, False)):
        ack = spec.Basic.Ack(delivery_tag=tag, multiple=flag)
        reject = spec.Basic.Reject(delivery_tag=tag, requeue=flag)
        assert ack_frame(7, tag, multiple=flag) == pamqp.frame.marshal(ack, 7)
        assert reject_frame(7, tag, requeue=flag) == pamqp.frame.marshal(reject, 7)


async def test_a_burst_of_in_order_acks_is_one_frame(channel: Channel) -> None:
    acker = Acker(channel)  # type: ignore[arg-type]
    for tag in range(1, 51):
        acker.ack(tag)
    await acker.flush()
    assert channel.frames == [("ack", 50, True)] and channel.errors == []
    assert channel.outstanding == set(range(51, 1001))


async def test_tags_above_a_gap_are_acked_alone_and_never_twice(channel: Channel) -> None:
    acker = Acker(channel)  # type: ignore[arg-type]
    for tag in (1, 2, 4, 5):
        acker.ack(tag)
    await acker.flush()
    assert channel.frames == [("ack", 2, True), ("ack", 4, False), ("ack", 5, False)]
    await acker.reject(3, requeue=True)
    acker.ack(6)
    await acker.flush()
    assert channel.frames[-2:] == [("reject", 3, False), ("ack", 6, True)]
    assert channel.outstanding == set(range(7, 1001))


async def test_a_second_settle_of_a_tag_is_ignored(channel: Channel) -> None:
    acker = Acker(channel)  # type: ignore[arg-type]
    acker.ack(1)
    await acker.flush()
    acker.ack(1)
    await acker.reject(1, requeue=True)
    await acker.ack_now(1)
    await acker.flush()
    assert channel.frames == [("ack", 1, True)] and channel.errors == []


async def _settle_out_of_order(
    acker: Acker, *, waited: Callable[[int], bool] = lambda tag: False
) -> None:
    """Settle tags 1 to 1,000 in blocks of 50, the highest of each first (each above a gap),
    every 7th rejected (waiting until written where ``waited``), the next iteration after
    every 10th; then flush the rest."""
    for start in range(0, 1000, 50):
        for tag in reversed(range(start + 1, start + 51)):
            if tag % 7 == 0:
                await acker.reject(tag, requeue=True, flush=waited(tag))
            else:
                acker.ack(tag)
            if tag % 10 == 0:
                await asyncio.sleep(0)  # sleep-ok: the next iteration, a flush between
    await asyncio.wait_for(acker.flush(), 30)


def _settled_once(channel: Channel) -> None:
    """RabbitMQ saw every tag settled once, none unknown, 142 of them rejected."""
    assert channel.errors == []
    assert not channel.outstanding
    assert sum(1 for kind, _, _ in channel.frames if kind == "reject") == 142


async def test_settles_reach_the_writer_in_order_while_its_queue_is_full() -> None:
    # Given a writer that falls behind, so that its 2-deep queue stays full
    channel = Channel(queue_size=2, slow=True)
    acker = Acker(channel)  # type: ignore[arg-type]
    try:
        # When tasks finish out of order for many iterations — tags above gaps acked alone,
        # rejections in between, later multiple acks covering all of them
        await _settle_out_of_order(acker)
        # Then RabbitMQ would have seen every tag settled once, none unknown
        _settled_once(channel)
    finally:
        await channel.close()


class _Socket(asyncio.Transport):
    """The socket under a `CoalescingWriter`: RabbitMQ reads each write at once."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def write(self, data: Any) -> None:
        self.channel.receive(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class ConnectedChannel(Channel):
    """A channel of a connection as ours are: a `CoalescingWriter` follows its writer queue
    (so frames may go past the queue while it is empty), and the writer task writes what it
    takes from the queue to that writer, as aiormq's does."""

    def __init__(self, *, queue_size: int, slow: bool) -> None:
        loop = asyncio.get_running_loop()
        protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
        socket = _Socket(self)
        protocol.connection_made(socket)
        self.writer = asyncio.StreamWriter(socket, protocol, None, loop)
        self.writer.__class__ = CoalescingWriter
        self.queued = 0  # frame sets that went through the writer queue
        self.running = asyncio.Event()  # the writer task takes frame sets while set
        self.running.set()
        super().__init__(queue_size=queue_size, slow=slow)
        cast(CoalescingWriter, self.writer).follow(self.write_queue)

    async def _write(self) -> None:
        while True:
            await self.running.wait()
            frame = await self.write_queue.get()
            self.queued += 1
            self.writer.write(frame.payload)
            if frame.drain_future is not None:
                await self.writer.drain()
                frame.drain_future.set_result(None)
            if self.slow:
                for _ in range(5):
                    await asyncio.sleep(0)  # sleep-ok: five iterations per frame set


async def test_settles_past_the_writer_queue_and_through_it_stay_in_order() -> None:
    # Given a channel whose settles go straight to the socket while its writer queue is
    # empty, and through the queue (2 deep, slow to empty) while it is not
    channel = ConnectedChannel(queue_size=2, slow=True)
    acker = Acker(channel)  # type: ignore[arg-type]
    try:
        # When tasks finish out of order for many iterations, some rejections waited for
        # (their frame set goes through the queue), the rest not
        await _settle_out_of_order(acker, waited=lambda tag: tag % 3 == 0)
        # Then RabbitMQ saw every tag settled once, none unknown, in either way
        _settled_once(channel)
        assert channel.queued > 0
        assert len(channel.frames) > channel.queued  # and many frames never went through it
    finally:
        await channel.close()


def _read(channel: Channel) -> int:
    """Settles RabbitMQ has read (refused ones included)."""
    return len(channel.frames) + len(channel.errors)


def _held_up(queue_size: int, queued: bytes) -> tuple[ConnectedChannel, FrameBatch]:
    """A channel whose writer queue holds ``queued`` (a frame set of aiormq's) while its
    writer task is held up (until ``channel.running`` is set), and a batch on it."""
    channel = ConnectedChannel(queue_size=queue_size, slow=False)
    channel.running.clear()
    channel.write_queue.put_nowait(ChannelFrame(payload=queued, should_close=False))
    return channel, FrameBatch(channel)  # type: ignore[arg-type]


async def test_frames_never_go_past_what_waits_in_the_writer_queue() -> None:
    # Given a writer queue holding a frame set of aiormq's (its writer task held up)
    channel, batch = _held_up(10, reject_frame(3, 5, requeue=True))
    try:
        # When a batch adds a frame that settles the same tag, and the writer resumes later
        batch.add(ack_frame(3, 5, multiple=False))
        await asyncio.sleep(0)  # sleep-ok: the iteration the batch's frame would leave in
        channel.running.set()
        await wait_until(lambda: _read(channel) >= 2, timeout=10, interval=0)
        # Then RabbitMQ read aiormq's frame first, and the ack after it (an unknown tag then)
        assert channel.frames == [("reject", 5, False)]
        assert channel.errors == ["PRECONDITION_FAILED - unknown delivery tag 5"]
    finally:
        await channel.close()


async def test_a_batchs_frames_held_back_are_never_overtaken_by_its_later_ones() -> None:
    # Given a batch whose frame waits for room in a full writer queue (1 deep)
    channel, batch = _held_up(1, ack_frame(3, 1, multiple=False))
    try:
        batch.add(reject_frame(3, 7, requeue=True))
        await asyncio.sleep(0)  # sleep-ok: its flush finds the queue full, and retries later
        assert batch._retrying
        # When the queue empties before the retry, and the batch adds another frame
        channel.running.set()
        await wait_until(lambda: channel.write_queue.empty(), timeout=10, interval=0)
        assert batch._retrying
        batch.add(ack_frame(3, 10, multiple=True))
        await wait_until(lambda: _read(channel) >= 3, timeout=10, interval=0)
        # Then the later frame followed the held one: the reject first, the ack after it
        assert channel.frames == [("ack", 1, False), ("reject", 7, False), ("ack", 10, True)]
        assert channel.errors == []
    finally:
        await channel.close()


async def test_settles_on_a_closed_channel_are_dropped(channel: Channel) -> None:
    acker = Acker(channel)  # type: ignore[arg-type]
    acker.ack(1)
    await acker.flush()
    channel.is_closed = True
    acker.ack(2)
    await acker.reject(3, requeue=True)
    with pytest.raises(Exception, match="closed"):
        await acker.ack_now(4)
    assert channel.frames == [("ack", 1, True)] and channel.write_queue.empty()


async def test_a_flush_on_a_closed_channel_drops_the_acks_without_raising(
    channel: Channel,
) -> None:
    acker = Acker(channel)  # type: ignore[arg-type]
    acker.ack(1)
    channel.is_closed = True
    await acker.flush()  # at shutdown, after the connection was lost: nothing to raise
    assert channel.frames == []
