"""The in-memory transport: a broker for users' tests, its clocks and its registry.

`MemoryBroker` keeps queues, delays, prefetch and dead letters in this process with
RabbitMQ's semantics where aioqueue relies on them; `VirtualClock` moves its time by hand. Apps
reach it through a ``memory://`` URL (`aioqueue.transports.broker_for`); users' tests through
`aioqueue.testing`, its public face.
"""

from .broker import MemoryBroker
from .clock import VirtualClock, let_run
from .registry import MEMORY_SCHEME, is_memory_url, memory_broker, reset, use_clock

__all__ = [
    "MEMORY_SCHEME",
    "MemoryBroker",
    "VirtualClock",
    "is_memory_url",
    "let_run",
    "memory_broker",
    "reset",
    "use_clock",
]
