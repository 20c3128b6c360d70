"""What the scheduler keeps in its broker, named: lease and state queues and the slot record.

Transport-neutral: the RabbitMQ backend (`aioqueue.rabbit.lease`, `aioqueue.rabbit.slots`) and
the in-memory one (`aioqueue.scheduler.in_memory`) use the same names and the same record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from ..errors import AioqueueError, DecodeError
from ..topology import INFRA_PREFIX, QueueType

__all__ = [
    "STATE_QUEUE_ARGS",
    "LeaseLost",
    "SlotRecord",
    "describe_error",
    "done_queue_arguments",
    "done_queue_name",
    "leader_queue_arguments",
    "leader_queue_name",
    "lease_queue_name",
    "state_queue_arguments",
    "state_queue_name",
]


class LeaseLost(AioqueueError):
    """The scheduler's lease connection closed: it must stop firing at once."""


def lease_queue_name(app_name: str, role: str = "scheduler") -> str:
    """The exclusive queue whose holder is the leader (of the scheduler, or of another
    ``role``: ``"ratelimit"``, the rate limits' pacer)."""
    return f"{INFRA_PREFIX}{role}.{app_name}.lease"


def leader_queue_name(app_name: str, role: str = "scheduler") -> str:
    """The queue the leader consumes, so followers can see that there is one."""
    return f"{INFRA_PREFIX}{role}.{app_name}.leader"


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` for logs (the type alone when the message is empty)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def state_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """A state queue holds one record: a newer one pushes the older out (RabbitMQ keeps the
    limit on quorum queues too, so the state is replicated with the app's work)."""
    return {"x-queue-type": queue_type, "x-max-length": 1, "x-overflow": "drop-head"}


def done_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """The queue of a ``skip_if_running`` schedule's run outcomes."""
    return {"x-queue-type": queue_type}


def leader_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """The followers' beacon: kept while any scheduler of the app polls it, gone an hour
    after. Quorum with a quorum app, so a cluster that lost its node still has it."""
    return {"x-queue-type": queue_type, "x-expires": 3_600_000}


STATE_QUEUE_ARGS: Final[dict[str, Any]] = state_queue_arguments()

_MAX_RECORD: Final = 64 * 1024


def state_queue_name(app_name: str, schedule_name: str) -> str:
    """The queue holding one schedule's last-slot record."""
    return f"{INFRA_PREFIX}scheduler.{app_name}.state.{schedule_name}"


def done_queue_name(app_name: str, schedule_name: str) -> str:
    """The queue receiving the outcomes of a ``skip_if_running`` schedule's runs."""
    return f"{INFRA_PREFIX}scheduler.{app_name}.done.{schedule_name}"


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """The last slot a schedule fired.

    Attributes:
        slot: The slot (aware UTC).
        by: The scheduler instance that fired it.
    """

    slot: datetime
    by: str

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "slot": self.slot.astimezone(UTC).isoformat(), "by": self.by})

    @classmethod
    def decode(cls, body: bytes) -> SlotRecord:
        """Read a record; `DecodeError` if it is not one."""
        try:
            if len(body) > _MAX_RECORD:
                raise ValueError("too large")
            data = orjson.loads(body)
            slot = datetime.fromisoformat(data["slot"])
            if slot.utcoffset() is None:
                raise ValueError("the slot has no time zone")
            return cls(slot=slot.astimezone(UTC), by=str(data.get("by", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"unreadable scheduler state record: {exc}") from None
