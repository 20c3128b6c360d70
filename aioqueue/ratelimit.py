"""Rate limits as values: ``"50/s"`` parsed, the holding queue named, the pacer's slots.

A task with ``rate_limit`` does not run straight from its work queue. A worker that receives it
unpaced moves it (confirmed, then acked) to the task's holding queue
``aioqueue.ratelimit.<task>``; one elected process of the app, the pacer
(`aioqueue.worker.pacer`), moves the messages of each holding queue back to their work queue
at the rate, marked as paced; workers run paced messages. The wait is in RabbitMQ, never in a
worker's slots. docs/rate-limits.md has the design and the measurements.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

from .topology import INFRA_PREFIX, QueueType

__all__ = [
    "MAX_INTERVAL",
    "Rate",
    "SlotClock",
    "holding_queue_arguments",
    "holding_queue_name",
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


class SlotClock:
    """The pacer's schedule for one task: each message gets the next free slot, one
    `Rate.interval` after the previous one, and never earlier than now.

    After an idle spell the first message goes at once (a burst of one token), then the
    spacing holds: in any window of ``w`` seconds at most ``w / interval + 1`` messages go.
    """

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._next: float | None = None

    def reserve(self, now: float) -> float:
        """The time at which the next message may go (``>= now``)."""
        slot = now if self._next is None else max(self._next, now)
        self._next = slot + self.rate.interval
        return slot
