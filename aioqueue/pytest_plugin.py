"""pytest fixtures for users' tests (loaded automatically when aioqueue is installed).

- ``aioqueue_memory_url``: a fresh ``memory://`` URL for this test (its broker is forgotten after).
- ``aioqueue_clock``: a `VirtualClock` installed on that URL, so delays and retries can be
  jumped over with ``await run_until_idle(app)`` or ``await aioqueue_clock.advance(seconds)``;
  a scheduler of the app (``app.scheduler()``) takes its slot time from it too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import VirtualClock, reset, use_clock

__all__ = ["aioqueue_clock", "aioqueue_memory_url"]


@pytest.fixture
def aioqueue_memory_url(request: pytest.FixtureRequest) -> Iterator[str]:
    url = f"memory://{request.node.nodeid}"
    reset(url)
    yield url
    reset(url)


@pytest.fixture
def aioqueue_clock(aioqueue_memory_url: str) -> VirtualClock:
    clock = VirtualClock()
    use_clock(aioqueue_memory_url, clock)
    return clock
