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


class _Ticks:
    """Counts the event loop's iterations (a callback that re-schedules itself once each)."""

    def __init__(self) -> None:
        self.now = 0
        self._stopped = False
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.now += 1
        if not self._stopped:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True


async def test_the_pacer_admits_its_share_per_iteration_in_order() -> None:
    pacer = Pacer(3)
    admitted: list[tuple[int, int]] = []  # (iteration, publisher)
    ticks = _Ticks()

    async def publisher(i: int) -> None:
        await pacer.wait()
        admitted.append((ticks.now, i))

    tasks = [asyncio.ensure_future(publisher(i)) for i in range(8)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    ticks.stop()
    order = [i for _, i in admitted]
    assert order == list(range(8))  # first come, first admitted
    per_iteration: dict[int, int] = {}
    for it, _ in admitted:
        per_iteration[it] = per_iteration.get(it, 0) + 1
    assert sorted(per_iteration.values()) == [2, 3, 3]  # never more than 3 in one iteration


async def test_a_cancelled_waiter_takes_no_share_and_the_pacer_goes_quiet() -> None:
    pacer = Pacer(1)
    ticks = _Ticks()
    admitted: dict[str, int] = {}
    tasks: dict[str, asyncio.Task[None]] = {}

    async def publisher(name: str) -> None:
        await pacer.wait()
        admitted[name] = ticks.now

    async def cancel_first() -> None:  # runs right after both registered, same iteration
        assert len(pacer._waiters) == 2
        tasks["first"].cancel()

    # all four start in one iteration, in this order: "a" takes the share, the others wait
    for name in ("a", "first", "second"):
        tasks[name] = asyncio.ensure_future(publisher(name))
    canceller = asyncio.ensure_future(cancel_first())
    await asyncio.wait_for(asyncio.gather(tasks["a"], tasks["second"], canceller), 5)
    assert tasks["first"].cancelled()
    # the cancelled waiter took nothing: "second" got the very next iteration's share (a
    # waiter is woken at its iteration's turn and runs in the one after: "a" + 2, not + 3)
    assert admitted["second"] == admitted["a"] + 2
    # with nobody waiting, the pacer stops scheduling itself once its share is back
    for _ in range(3):
        await _next_iteration()
    ticks.stop()
    assert not pacer._scheduled and pacer._left == 1
