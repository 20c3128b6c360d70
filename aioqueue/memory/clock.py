"""The in-memory broker's virtual time, which tests move by hand (`VirtualClock`).

A `VirtualClock` is a `aioqueue.clock.BrokerClock` (the broker's delays) and a scheduler
`aioqueue.clock.Clock`: schedules of an app on a ``memory://`` broker with a virtual clock take
their slot time from it. Network timeouts and task timeouts stay on wall time.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .broker import MemoryBroker

__all__ = ["VirtualClock", "let_run"]


async def let_run(rounds: int = 20) -> None:
    """Give other tasks ``rounds`` turns of the event loop."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class VirtualClock:
    """Time that moves only when told: `advance` (or `run_until_idle`) jumps over delays.

    Args:
        start: The initial time, as a Unix timestamp or an aware datetime (default: now).

    It is the clock of the in-memory broker (`use_clock`, the ``aioqueue_clock`` fixture) and
    also a scheduler `aioqueue.scheduler.Clock` (`now`, `sleep_until`): a scheduler of an app on
    that broker takes its slot time from it.
    """

    def __init__(self, start: float | datetime | None = None) -> None:
        if isinstance(start, datetime):
            if start.utcoffset() is None:
                raise ValueError("VirtualClock needs an aware start time")
            start = start.timestamp()
        self._now = time.time() if start is None else float(start)
        # Each sleeper's wake-up event and the time it waits for (inf: only its event).
        self._sleepers: dict[asyncio.Event, float] = {}
        self._brokers: set[MemoryBroker] = set()

    def time(self) -> float:
        """The current virtual time, a Unix timestamp."""
        return self._now

    def now(self) -> datetime:
        """The current virtual time, an aware UTC datetime (the scheduler's `Clock`)."""
        return datetime.fromtimestamp(self._now, UTC)

    async def wait(self, seconds: float | None, wakeup: asyncio.Event) -> None:
        """Wait until ``wakeup`` is set; `set`/`advance` set it once ``seconds`` have passed."""
        await self._sleep(math.inf if seconds is None else self._now + seconds, wakeup)

    async def sleep_until(self, when: datetime) -> None:
        """Return once the virtual time has reached ``when`` (the scheduler's `Clock`)."""
        target = when.timestamp()
        if self._now >= target:
            await asyncio.sleep(0)
            return
        while self._now < target:
            await self._sleep(target, asyncio.Event())

    async def _sleep(self, until: float, wakeup: asyncio.Event) -> None:
        self._sleepers[wakeup] = until
        try:
            await wakeup.wait()
        finally:
            self._sleepers.pop(wakeup, None)

    @property
    def next_timer(self) -> float | None:
        """The earliest time a sleeper (a delayed message, a scheduler) waits for, or None."""
        pending = [t for event, t in self._sleepers.items() if not event.is_set()]
        return min((t for t in pending if t != math.inf), default=None)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, timer by timer, letting what is due run at each.

        The work in hand is settled first (a scheduler that was just started reads its
        schedules at the current time). Then the clock moves to each timer on the way — a
        delayed message coming due, a scheduler's next slot — in order, and at each one waits
        until the schedulers fired and the deliveries were settled, or until nothing has moved
        for a moment (a task waiting for something your test controls). So five minutes of an
        ``every=60`` schedule fire five slots, each run finishing before the next slot.
        """
        if seconds < 0:
            raise ValueError("a VirtualClock cannot go back")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float | datetime) -> None:
        """`advance` to the absolute time ``when`` (a timestamp or an aware datetime)."""
        target = when.timestamp() if isinstance(when, datetime) else float(when)
        await self.settle()
        while True:
            timer = self.next_timer
            if timer is None or timer > target:
                break
            self.set(timer)
            await self.settle()
        self.set(target)
        await self.settle()

    def set(self, now: float) -> None:
        """Jump to ``now`` at once (never backwards), waking the sleepers it reached.

        Unlike `advance`, nothing runs at the times jumped over: a scheduler wakes once, at
        ``now``, and treats the slots more than ``grace`` ago as missed.
        """
        self._now = max(self._now, now)
        for sleeper, due in list(self._sleepers.items()):
            if due <= self._now:
                sleeper.set()

    async def settle(self, *, limit: float = 30.0) -> None:
        """Let the work due at the current virtual time run (`advance` calls it at each step).

        Returns once every broker on this clock is idle, or when its schedulers and delay
        queues are at rest and no message moved for 20 ms of wall time (the tasks still in
        hand wait for something else, e.g. an event your test sets later). `TimeoutError`
        after ``limit`` seconds.
        """
        loop = asyncio.get_running_loop()
        await let_run()
        started = quiet_since = loop.time()
        mark: tuple[int, ...] = ()
        quiet = 0  # event-loop rounds without progress
        while True:
            brokers = list(self._brokers)
            if all(b.idle() for b in brokers):
                return
            now = loop.time()
            current = tuple(b.progress for b in brokers)
            if current != mark or any(b.settling() for b in brokers):
                mark, quiet_since, quiet = current, now, 0
            elif quiet >= _SETTLE_ROUNDS and now - quiet_since >= _SETTLE_QUIET:
                return
            if now - started > limit:
                raise TimeoutError(f"the in-memory broker did not settle within {limit:g}s")
            quiet += 1
            # Spin a little, then sleep for real so that task threads get the GIL; counting
            # rounds as well as time keeps a stalled process from ending the wait early.
            await asyncio.sleep(0 if quiet < _SETTLE_ROUNDS // 2 else 0.001)

    def _attach(self, broker: MemoryBroker) -> None:
        self._brokers.add(broker)

    def _detach(self, broker: MemoryBroker) -> None:
        self._brokers.discard(broker)


# How long `VirtualClock.settle` waits for a busy broker that makes no progress: wall seconds,
# and event-loop rounds (half of them spinning, half sleeping a millisecond).
_SETTLE_QUIET: Final = 0.02
_SETTLE_ROUNDS: Final = 40
