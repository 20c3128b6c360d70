"""Time, as aioqueue's moving parts ask for it: two protocols and the system clock behind both.

- `Clock`: the scheduler's slot time — ``now()`` and ``sleep_until(when)``;
- `BrokerClock`: the in-memory broker's delay timer — ``time()`` and ``wait(seconds, wakeup)``;
- `SystemClock`: the machine's wall clock, for both.

For tests, `aioqueue.testing.VirtualClock` is both as well (time moves when told), and
`aioqueue.scheduler.FakeClock` is a `Clock` that a test sets by hand. Network and task timeouts
are always wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Final, Protocol

__all__ = ["BrokerClock", "Clock", "SystemClock"]

# Sleep at most this long at once, so that a wall-clock step (NTP) is noticed soon.
_MAX_NAP: Final = 30.0


class Clock(Protocol):
    """What the scheduler needs of time."""

    def now(self) -> datetime:
        """The current time, an aware UTC datetime."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Return once `now` has reached ``when`` (at once if it already has)."""
        ...


class BrokerClock(Protocol):
    """Where the in-memory broker's delays get their time from."""

    def time(self) -> float:
        """The current time, a Unix timestamp."""
        ...

    async def wait(self, seconds: float | None, wakeup: asyncio.Event) -> None:
        """Wait until ``wakeup`` is set, or ``seconds`` have passed (None: only the event)."""
        ...


class SystemClock:
    """The machine's wall clock: a `Clock` and a `BrokerClock`."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        while True:
            remaining = (when - self.now()).total_seconds()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _MAX_NAP))

    def time(self) -> float:
        return time.time()

    async def wait(self, seconds: float | None, wakeup: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), seconds)
