"""The one way tests wait: a condition polled until it holds, under a deadline.

Free of pytest, so the task modules that worker subprocesses import (``tests/apps``) use it too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

__all__ = ["POLL_INTERVAL", "poll_until", "wait_until"]

POLL_INTERVAL = 0.05  # seconds between two looks at a condition


async def wait_until(
    condition: Callable[[], Any],
    *,
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = POLL_INTERVAL,
) -> Any:
    """Poll ``condition`` until it returns something truthy, failing after ``timeout``.

    ``condition`` may return an awaitable (it is awaited); its truthy value is returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)  # sleep-ok: the polling interval of the one wait helper


def poll_until(
    condition: Callable[[], Any], *, timeout: float, interval: float = POLL_INTERVAL
) -> bool:
    """`wait_until` for code outside an event loop (the RabbitMQ node helper, run in threads):
    True once ``condition()`` holds, False if ``timeout`` passed first (the caller says why)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)  # sleep-ok: the polling interval of the one wait helper
    return True
