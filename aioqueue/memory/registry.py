"""The process's in-memory brokers, one per ``memory://`` URL, and the clocks they use.

All `App` objects with the same ``memory://`` URL in one process share one broker. Tests pick
a clock for a URL before connecting (`use_clock`) and start afresh with `reset`.
"""

from __future__ import annotations

from ..clock import BrokerClock
from ..settings import Settings
from .broker import MemoryBroker

__all__ = ["MEMORY_SCHEME", "is_memory_url", "memory_broker", "reset", "use_clock"]

MEMORY_SCHEME = "memory://"

_brokers: dict[str, MemoryBroker] = {}
_clocks: dict[str, BrokerClock] = {}


def is_memory_url(url: str) -> bool:
    """Whether ``url`` names an in-memory broker (``memory://`` or ``memory://<name>``)."""
    return url.startswith(MEMORY_SCHEME)


def memory_broker(url: str, settings: Settings) -> MemoryBroker:
    """The process's in-memory broker for ``url`` (one per URL, shared by its apps)."""
    broker = _brokers.get(url)
    if broker is None:
        broker = _brokers[url] = MemoryBroker(url, settings, _clocks.get(url))
    return broker


def use_clock(url: str, clock: BrokerClock) -> BrokerClock:
    """Make the in-memory broker of ``url`` use ``clock`` (call before connecting an app)."""
    _clocks[url] = clock
    _brokers.pop(url, None)
    return clock


def reset(url: str | None = None) -> None:
    """Forget in-memory brokers (all, or one URL's) and their clocks: a fresh start per test."""
    for table in (_brokers, _clocks):
        if url is None:
            table.clear()
        else:
            table.pop(url, None)
