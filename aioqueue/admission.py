"""Waits bounded by deadlines without a timer each, and a first-come-first-served cap.

`Deadlines` cancels each registered future still pending at its deadline with one timer for
them all; `Slots` caps how many of something run at once (RabbitMQ's unconfirmed publishes
per connection, the producer's submits in progress), its waits bounded by `Deadlines`; a
`Turn` is one such slot with its deadline, given back once. Plain
asyncio, used by the RabbitMQ package and by the producer alike.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from typing import Any

__all__ = ["Deadlines", "Slots", "Turn"]


class Deadlines:
    """Cancels each registered future still pending at its deadline (loop time), with one
    timer for them all instead of one per future."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, future: asyncio.Future[Any], deadline: float) -> None:
        heap = self._heap
        while heap and heap[0][2].done():  # settled in time: the usual case
            heapq.heappop(heap)
        heapq.heappush(heap, (deadline, next(self._order), future))
        if self._timer is None or deadline < self._armed_for:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._heap:
            self._armed_for = self._heap[0][0]
            self._timer = asyncio.get_running_loop().call_at(self._armed_for, self._expire)

    def _expire(self) -> None:
        self._timer = None
        heap = self._heap
        now = asyncio.get_running_loop().time()
        while heap and (heap[0][2].done() or heap[0][0] <= now):
            _, _, future = heapq.heappop(heap)
            future.cancel()
        self._arm()


class Slots:
    """A cap on publishes in flight, whose waits end at a deadline (`TimeoutError`).

    Like `asyncio.Semaphore`, first come first served; but a release hands its slot straight
    to the next waiter in O(1), where the semaphore scans from the first waiter on every
    release: with thousands waiting and hundreds of confirms arriving in one iteration, that
    scan was a tenth of a busy producer's time. Waits are bounded by `Deadlines`, not a timer
    each.
    """

    def __init__(self, size: int, deadlines: Deadlines) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._deadlines = deadlines

    def enter(
        self, deadline: float, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Future[None] | None:
        """A slot at once (None), else a place in the line: the future that a release sets,
        cancelled at ``deadline``. Await it and, if that is cancelled, ask `timed_out`
        why. (`acquire` in two steps, for a caller that waits without a coroutine of its
        own: thousands of submits waiting at once keep that many fewer objects alive.)"""
        if self.try_acquire():
            return None
        waiter: asyncio.Future[None] = (loop or asyncio.get_running_loop()).create_future()
        self._waiters.append(waiter)
        self._deadlines.add(waiter, deadline)
        return waiter

    def timed_out(self, waiter: asyncio.Future[None]) -> bool:
        """The wait on ``waiter`` (from `enter`) was cancelled: a slot it was handed
        meanwhile goes to the next in line. True if its deadline cancelled it (the caller
        raises `TimeoutError`), False if the caller's task was (it raises that)."""
        if waiter.done() and not waiter.cancelled():
            self.release()  # handed a slot, then cancelled: pass it on
        task = asyncio.current_task()
        return waiter.cancelled() and task is not None and not task.cancelling()

    async def acquire(self, deadline: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """A slot, waited for until ``deadline`` (``loop``: the running loop, if the caller
        has it at hand: a lookup is a system call)."""
        waiter = self.enter(deadline, loop)
        if waiter is None:
            return
        try:
            await waiter
        except asyncio.CancelledError:
            if self.timed_out(waiter):
                raise TimeoutError from None  # its deadline, not our caller
            raise

    def try_acquire(self) -> bool:
        """A slot at once, if one is free and nobody is waiting (no coroutine made)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # one cancelled (by its caller or deadline) takes nothing
                waiter.set_result(None)
                return
        self._free += 1


class Turn:
    """One turn of `Slots` (a submit's, to publish): waited for until its deadline, given
    back once."""

    __slots__ = ("deadline", "held", "loop", "slots")

    def __init__(
        self, slots: Slots, deadline: float, loop: asyncio.AbstractEventLoop, *, held: bool = False
    ) -> None:
        self.slots = slots
        self.deadline = deadline  # ``loop``'s time: the submit's publish deadline
        self.loop = loop  # the running loop of the submit
        self.held = held  # (a submit that waited on `Slots.enter` itself holds it already)

    async def take(self) -> None:
        """Wait for the turn, unless held already (`TimeoutError` at the deadline)."""
        if not self.held:
            await self.slots.acquire(self.deadline, self.loop)
            self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()
