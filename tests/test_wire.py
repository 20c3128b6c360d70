"""`aioqueue._wire`: coalesced writes and paced publishes, on the event loop alone (no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

from aioqueue._wire import CoalescingWriter, Pacer


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


async def test_the_pacer_admits_its_share_per_iteration_in_order() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(3)
    admitted: list[tuple[int, int]] = []  # (iteration, publisher)
    ticks = [0]
    done = False

    def tick() -> None:  # runs once in every iteration of the loop, until the end
        ticks[0] += 1
        if not done:
            loop.call_soon(tick)

    async def publisher(i: int) -> None:
        await pacer.wait()
        admitted.append((ticks[0], i))

    loop.call_soon(tick)
    tasks = [asyncio.ensure_future(publisher(i)) for i in range(8)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    done = True
    order = [i for _, i in admitted]
    assert order == list(range(8))  # first come, first admitted
    per_iteration: dict[int, int] = {}
    for it, _ in admitted:
        per_iteration[it] = per_iteration.get(it, 0) + 1
    assert sorted(per_iteration.values()) == [2, 3, 3]  # never more than 3 in one iteration


async def test_a_cancelled_waiter_takes_no_share_and_the_pacer_goes_quiet() -> None:
    pacer = Pacer(1)
    await pacer.wait()  # this iteration's share is used
    first = asyncio.ensure_future(pacer.wait())
    second = asyncio.ensure_future(pacer.wait())
    await asyncio.sleep(0)  # both are waiting now
    first.cancel()
    await asyncio.wait_for(second, 5)
    # with nobody waiting, the pacer stops scheduling itself once its share is back
    for _ in range(3):
        await _next_iteration()
    assert not pacer._scheduled and pacer._left == 1
