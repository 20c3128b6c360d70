"""Rate limits as values: ``"50/s"`` parsed, the holding queue named, the pacer's slots.

A task with ``rate_limit`` does not run straight from its work queue. A producer that knows the
limit (the task is registered on its app) publishes it straight to the task's holding queue
``aioqueue.ratelimit.<task>`` (`holding_route`); a worker that receives it unpaced in its work
queue anyway (submitted by name only, from Celery, or after a delay) moves it there (confirmed,
then acked). One elected process of the app, the pacer (`aioqueue.worker.pacer`), moves the
messages of each holding queue back to their work queue at the rate, marked as paced; workers
run paced messages. The wait is in RabbitMQ, never in a worker's slots. docs/rate-limits.md
has the design and the measurements.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .topology import INFRA_PREFIX, QueueType

if TYPE_CHECKING:
    from .message import Envelope
    from .task import Task

__all__ = [
    "MAX_INTERVAL",
    "Rate",
    "SlotClock",
    "holding_queue_arguments",
    "holding_queue_name",
    "holding_route",
    "parse_rate",
]

_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}
_FORM: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*")
# The pacer holds the next message of a holding queue unacked until its turn: at most one
# interval. RabbitMQ's consumer_timeout (30 min by default) closes a channel holding a message
# longer, so slower limits are refused.
MAX_INTERVAL: Final = 600.0


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` runs per ``per`` seconds, evenly spaced (one token of burst)."""

    count: float
    per: float
    text: str

    @property
    def interval(self) -> float:
        """Seconds between two runs."""
        return self.per / self.count

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __str__(self) -> str:
        return self.text


def parse_rate(text: object) -> Rate:
    """``"50/s"``, ``"100/m"`` or ``"10/h"`` as a `Rate`; `ValueError` for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"rate_limit must be a string like '50/s', not {text!r}")
    match = _FORM.fullmatch(text)
    if match is None:
        raise ValueError(
            f"rate_limit {text!r} is not '<count>/s', '<count>/m' or '<count>/h' (e.g. '50/s')"
        )
    count, unit = float(match[1]), match[2]
    if not math.isfinite(count) or count <= 0:
        raise ValueError(f"rate_limit {text!r}: the count must be positive")
    rate = Rate(count, _UNITS[unit], text.strip())
    if rate.interval > MAX_INTERVAL:
        raise ValueError(
            f"rate_limit {text!r} is slower than one run per {MAX_INTERVAL:g}s, which aioqueue "
            "does not support (the pacer holds the next message for one interval, and "
            "RabbitMQ's consumer_timeout closes channels that hold one for long)"
        )
    return rate


def holding_queue_name(task_name: str) -> str:
    """Where the messages of a rate-limited task wait for their turn."""
    return f"{INFRA_PREFIX}ratelimit.{task_name}"


def holding_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """A holding queue is durable and of the task's queue type (quorum: replicated)."""
    return {"x-queue-type": queue_type}


def holding_route(
    tasks: Mapping[str, Task[Any, Any]], envelope: Envelope
) -> tuple[str, dict[str, Any]] | None:
    """Where a message due now goes instead of its work queue, and that queue's arguments:
    the holding queue of a task in ``tasks`` (the producer's app) that has a ``rate_limit``.
    None for any other task and for Celery's format (the worker's hold takes those)."""
    if envelope.celery is not None:
        return None
    task = tasks.get(envelope.task)
    if task is None or task.options.rate_limit is None:
        return None
    return holding_queue_name(task.name), holding_queue_arguments(task.options.queue_type)


class SlotClock:
    """The pacer's schedule for one task, message after message.

    Each message is due one `Rate.interval` after the previous one was due, so wake-ups that
    come late (a busy machine) are caught up and the average holds; never more than the
    rate's worth go in any one second of actual sends, so catching up never bunches messages
    beyond the limit; and after a stall or an idle spell longer than that second the schedule
    starts afresh from now (the first message goes at once: a burst of one token).
    """

    WINDOW: Final = 1.0

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._next: float | None = None
        self._base = 0.0  # when the message `due` was asked for is due, by the schedule
        self._sent: deque[float] = deque()
        self._cap = max(1, math.ceil(rate.per_second * self.WINDOW))

    def due(self, now: float) -> float:
        """When the next message may go (``>= now``)."""
        fresh = self._next is None or self._next < now - self.WINDOW
        self._base = now if fresh or self._next is None else self._next
        go = max(self._base, now)
        while self._sent and self._sent[0] <= now - self.WINDOW:
            self._sent.popleft()
        if len(self._sent) >= self._cap:
            go = max(go, self._sent[-self._cap] + self.WINDOW)
        return go

    def took(self, at: float) -> None:
        """The message last asked `due` for went at ``at``."""
        self._next = self._base + self.rate.interval
        self._sent.append(at)
        if len(self._sent) > self._cap:
            self._sent.popleft()

    def reserve(self, now: float) -> float:
        """`due` and `took` at once, for a message that goes exactly when due."""
        go = self.due(now)
        self.took(go)
        return go
