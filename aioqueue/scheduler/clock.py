"""The scheduler's time: `Clock` and `SystemClock` (`aioqueue.clock`), and `FakeClock` for tests.

Only slot time goes through a `Clock`; network timeouts and the followers' polling for the
lease use real time whatever the clock.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from ..clock import Clock, SystemClock

__all__ = ["Clock", "FakeClock", "SystemClock"]


class FakeClock:
    """A clock that stands still until `advance` or `set` moves it.

    Args:
        start: The initial time (aware).

    A test starts a scheduler on it, waits until the scheduler sleeps (`sleeping_until`), moves
    the clock, and checks what fired — no real waiting for slots.
    """

    def __init__(self, start: datetime) -> None:
        if start.utcoffset() is None:
            raise ValueError("FakeClock needs an aware start time")
        self._now = start.astimezone(UTC)
        self._sleepers: list[tuple[datetime, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._now

    @property
    def sleeping_until(self) -> datetime | None:
        """The earliest time a sleeper waits for, or None when nobody sleeps."""
        pending = [when for when, future in self._sleepers if not future.done()]
        return min(pending, default=None)

    async def sleep_until(self, when: datetime) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (when, future)
        self._sleepers.append(entry)
        try:
            await future
        finally:
            self._sleepers.remove(entry)

    def set(self, when: datetime) -> None:
        """Move the clock to ``when`` (never backwards) and wake the sleepers it reached."""
        when = when.astimezone(UTC)
        if when < self._now:
            raise ValueError(f"FakeClock cannot go back from {self._now} to {when}")
        self._now = when
        for wake_at, future in self._sleepers:
            if wake_at <= when and not future.done():
                future.set_result(None)

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta``."""
        self.set(self._now + delta)
