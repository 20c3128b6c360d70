"""`aioqueue.rabbit.connection`: coalesced writes, on the event loop alone (no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

from aioqueue.rabbit.connection import CoalescingWriter
from tests.waiting import wait_until


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def _writer(transport: _Transport) -> CoalescingWriter:
    loop = asyncio.get_running_loop()
    protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
    protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    writer.__class__ = CoalescingWriter  # as CoalescingTransportFactory does
    assert isinstance(writer, CoalescingWriter)
    return writer


async def _next_iteration() -> None:
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


async def test_writes_of_one_iteration_leave_in_one_write_in_order() -> None:
    transport = _Transport()
    writer = _writer(transport)
    writer.write(b"a")
    writer.write(bytearray(b"b"))
    writer.write(memoryview(b"c"))
    assert transport.writes == []  # nothing before the iteration ends
    await _next_iteration()
    assert transport.writes == [b"abc"]
    writer.write(b"d")
    await _next_iteration()
    assert transport.writes == [b"abc", b"d"]  # a lone write is passed as it is
    writer.close()


async def test_drain_and_close_send_what_is_pending_first() -> None:
    transport = _Transport()
    writer = _writer(transport)
    writer.write(b"x")
    await writer.drain()
    assert transport.writes == [b"x"]
    writer.write(b"y")
    writer.close()
    assert transport.writes == [b"x", b"y"] and transport.closed


async def test_following_its_writer_queue_a_write_that_empties_it_is_sent_at_once() -> None:
    # aiormq's writer task writes every frame set of its queue in one step
    transport = _Transport()
    writer = _writer(transport)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    writer.follow(queue)
    # a lone frame set (the queue empty behind it): sent at once, not an iteration later
    writer.write(b"a")
    assert transport.writes == [b"a"]
    # several queued: held while more are queued, then sent together with the last one
    for item in (b"b", b"c", b"d"):
        queue.put_nowait(item)
    while not queue.empty():
        writer.write(queue.get_nowait())
        assert transport.writes == [b"a"] or queue.empty()
    assert transport.writes == [b"a", b"bcd"]
    await _next_iteration()  # and the flush scheduled for the first of them sends nothing more
    assert transport.writes == [b"a", b"bcd"]
    writer.close()


async def test_each_connection_follows_its_own_writer_queue(rabbit: Any) -> None:
    from aioqueue import Settings
    from aioqueue.rabbit.connection import connect

    connection = await connect(rabbit.url, Settings(), name="follows")
    try:
        aiormq_connection = connection.transport.connection  # type: ignore[union-attr]
        factory = connection.kwargs["transport_factory"]
        assert factory.writer is not None
        assert factory.writer._queue is aiormq_connection.write_queue
    finally:
        await connection.close()


async def test_aiormqs_writer_has_written_all_it_took_once_its_queue_is_empty(rabbit: Any) -> None:
    # What frames written past the queue rely on (`aioqueue.rabbit.frames`): when aiormq's
    # writer queue is empty, its writer task has handed every frame set it took to our writer
    from aiormq.abc import ChannelFrame

    from aioqueue import Settings
    from aioqueue.rabbit.connection import connect, writer_for

    connection = await connect(rabbit.url, Settings(), name="written")
    try:
        aiormq_connection = connection.transport.connection  # type: ignore[union-attr]
        queue = aiormq_connection.write_queue
        writer = connection.kwargs["transport_factory"].writer
        written: list[bytes] = []
        original = writer.write

        def write(data: Any) -> None:
            written.append(bytes(data))
            original(data)

        writer.write = write  # type: ignore[method-assign]
        heartbeat = b"\x08\x00\x00\x00\x00\x00\x00\xce"  # a heartbeat frame, harmless
        frames = [heartbeat * (i + 1) for i in range(5)]
        for frame in frames:
            queue.put_nowait(ChannelFrame(payload=frame, should_close=False))
        assert writer_for(queue) is None  # frames wait in the queue: nothing goes past them
        await wait_until(queue.empty, timeout=10, interval=0)  # looked at every iteration
        assert written == frames  # all taken is all written, in order, at once
        assert writer_for(queue) is writer
    finally:
        await connection.close()
