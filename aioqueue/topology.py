"""Queue names and queue arguments: pure functions, so producers and workers always agree.

- Work queues are named exactly as the user names them; they are durable and classic by default.
- The dead-letter queue of work queue ``Q`` is ``Q.dlq``.
- aioqueue's own infrastructure queues all start with ``aioqueue.``; a client's reply queue is
  ``aioqueue.reply.<client id>``: durable, expiring when unused.
- ``App(queue_type="quorum")`` makes every queue that holds work or results a quorum queue
  (replicated over a cluster's nodes): work, dead-letter, delay, reply and stream queues and
  the scheduler's state. Only the scheduler's lease is exclusive, which RabbitMQ cannot
  replicate: it holds no work, only who leads (docs/deploying.md).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "CANCELLATIONS_STREAM",
    "EVENTS_STREAM",
    "INFRA_PREFIX",
    "QueueType",
    "cancellations_stream_arguments",
    "check_queue_name",
    "dlq_arguments",
    "dlq_name",
    "events_stream_arguments",
    "reply_queue_arguments",
    "reply_queue_name",
    "stream_queue_name",
    "work_queue_arguments",
]

INFRA_PREFIX: Final = "aioqueue."
QueueType = Literal["classic", "quorum"]
# the broadcast of cancelled task ids: a stream every worker reads (aioqueue.cancel)
CANCELLATIONS_STREAM: Final = f"{INFRA_PREFIX}cancellations"


# AMQP 0-9-1's queue-name domain as RabbitMQ clients enforce it (pamqp refuses any other name
# when the queue is declared), at most 255 bytes: a work queue leaves room for ".dlq".
_QUEUE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]+")
_MAX_WORK_QUEUE = 255 - len(".dlq")


def check_queue_name(queue: str) -> str:
    """``queue`` if it can name a work queue (and its ``.dlq``), else a `ValueError` saying why
    — when the app or task is defined, not when a worker first declares it."""
    if not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue):
        raise ValueError(
            f"queue name {queue!r}: use letters, digits, spaces and - _ . : @ # , / + only "
            "(the AMQP queue-name rule)"
        )
    if len(queue.encode()) > _MAX_WORK_QUEUE:
        raise ValueError(f"queue name {queue[:40]!r}...: longer than {_MAX_WORK_QUEUE} bytes")
    return queue


def dlq_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return f"{queue}.dlq"


def reply_queue_name(client_id: str) -> str:
    """The reply queue of one client (one `App` instance)."""
    return f"{INFRA_PREFIX}reply.{client_id}"


def stream_queue_name(task_id: str) -> str:
    """The queue carrying the items a generator task yields to its caller."""
    return f"{INFRA_PREFIX}stream.{task_id}"


def work_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """Arguments of a work queue; producers and workers must declare it identically."""
    return {"x-queue-type": queue_type}


def dlq_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """Arguments of a dead-letter queue."""
    return {"x-queue-type": queue_type}


def reply_queue_arguments(expires: float, queue_type: QueueType = "classic") -> dict[str, Any]:
    """A durable reply (or stream) queue that RabbitMQ deletes after ``expires`` seconds unused."""
    return {"x-queue-type": queue_type, "x-expires": max(1000, int(expires * 1000))}


# -- task events -------------------------------------------------------------------------------

EVENTS_STREAM: Final = f"{INFRA_PREFIX}events"
EVENTS_SEGMENT_BYTES: Final = 8 * 1024 * 1024


def events_stream_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of the event stream ``aioqueue.events``: a RabbitMQ stream kept by size and
    age; workers and readers declare it identically."""
    return {
        "x-queue-type": "stream",
        "x-max-length-bytes": settings.events_max_bytes,
        "x-max-age": settings.events_max_age,
        "x-stream-max-segment-size-bytes": EVENTS_SEGMENT_BYTES,
    }


# -- delayed delivery -------------------------------------------------------------------------
#
# A binary ladder of fixed-TTL queues, like kombu's native delayed delivery, with a 100 ms unit.
# A delay is rounded *up* to whole units and written as DELAY_LEVELS bits, highest first, in the
# routing key: "b24.b23....b0.<queue>". The message enters the top level's topic exchange; at
# level k a bit of 1 routes it into queue k (TTL 2**k units), which dead-letters it into level
# k-1's exchange when its time is up; a bit of 0 routes it straight on (exchange-to-exchange).
# After level 0 the "deliver" exchange routes it by the remaining words to its work queue.
# So a delay costs at most DELAY_LEVELS queues per queue type, whatever its length, every
# message in a queue has the same TTL (per-queue TTL expires at the head, in order), and a
# delayed message waits inside RabbitMQ, never in a worker.

DELAY_UNIT: Final = 0.1
DELAY_LEVELS: Final = 25
MAX_DELAY: Final = DELAY_UNIT * (2**DELAY_LEVELS - 1)  # about 38.8 days
DELIVER_EXCHANGE: Final = f"{INFRA_PREFIX}delay.deliver"


def delay_units(seconds: float) -> int:
    """``seconds`` as whole delay units, rounded up so a task never runs early."""
    if seconds < 0:
        raise ValueError("a delay cannot be negative")
    if seconds > MAX_DELAY:
        raise ValueError(f"a delay of {seconds:g}s exceeds the maximum of {MAX_DELAY:g}s")
    units = int(-(-round(seconds * 1e6) // round(DELAY_UNIT * 1e6)))  # ceil, float-safe
    return units


def delay_exchange(queue_type: QueueType, level: int) -> str:
    """The topic exchange of one ladder level."""
    return f"{INFRA_PREFIX}delay.{queue_type}.{level}"


def delay_queue(queue_type: QueueType, level: int) -> str:
    """The queue of one ladder level: messages wait ``2**level`` units in it."""
    return f"{INFRA_PREFIX}delay.{queue_type}.{level}.q"


def delay_routing_key(queue: str, units: int) -> str:
    """The routing key carrying ``units`` as bits (highest level first) and the target queue."""
    if not 0 < units < 2**DELAY_LEVELS:
        raise ValueError(f"delay units out of range: {units}")
    if "*" in queue or "#" in queue:
        raise ValueError(f"queue {queue!r}: delayed delivery needs a name without '*' or '#'")
    bits = ".".join("1" if units >> level & 1 else "0" for level in reversed(range(DELAY_LEVELS)))
    key = f"{bits}.{queue}"
    if len(key.encode()) > 255:
        raise ValueError(f"queue name {queue!r} is too long for delayed delivery")
    return key


def delay_entry_exchange(queue_type: QueueType) -> str:
    """Where a delayed message is published: the top level."""
    return delay_exchange(queue_type, DELAY_LEVELS - 1)


def _position_pattern(level: int, word: str) -> str:
    """Topic pattern matching ``word`` at ``level``'s bit position, anything after it."""
    return "*." * (DELAY_LEVELS - 1 - level) + f"{word}.#"


def delay_ladder(queue_type: QueueType) -> list[tuple[str, str, dict[str, Any], str, str]]:
    """Every level as (exchange, queue, queue arguments, pattern to queue, pattern onwards).

    The onward pattern binds the level's exchange to the next exchange down (the deliver
    exchange after level 0); the queue dead-letters into that same next exchange.
    """
    levels = []
    for level in reversed(range(DELAY_LEVELS)):
        onward = delay_exchange(queue_type, level - 1) if level else DELIVER_EXCHANGE
        arguments: dict[str, Any] = {
            "x-queue-type": queue_type,
            "x-message-ttl": round(DELAY_UNIT * 1000) * 2**level,
            "x-dead-letter-exchange": onward,
        }
        if queue_type == "quorum":
            # at-least-once dead-lettering: a hop survives a crash mid-way (3.10+)
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
        levels.append(
            (
                delay_exchange(queue_type, level),
                delay_queue(queue_type, level),
                arguments,
                _position_pattern(level, "1"),
                _position_pattern(level, "0"),
            )
        )
    return levels


def deliver_pattern(queue: str) -> str:
    """Binding of the deliver exchange to ``queue``: every bit word, then exactly the name."""
    return "*." * DELAY_LEVELS + queue


def cancellations_stream_arguments(max_age: float) -> dict[str, Any]:
    """The ``aioqueue.cancellations`` stream: kept ``max_age`` seconds (and at most 64 MiB)."""
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, int(max_age))}s",
        "x-max-length-bytes": 64 * 1024 * 1024,
        "x-stream-max-segment-size-bytes": 8 * 1024 * 1024,
    }


# -- workflows (aioqueue.workflow): a group's or chord's queues, named by the workflow id -------

CHORD_EXPIRES: Final = 7 * 24 * 3600.0  # seconds a workflow's queues outlive their last use


def chord_queue_names(workflow_id: str) -> tuple[str, str, str]:
    """(results, gate, claim) queues of a group or chord: its members' results; the one token
    whose holder may join them (gone once the join fired); the one token whose holder may run
    the chord's callback (gone once it ran). See docs/workflows.md."""
    base = f"{INFRA_PREFIX}chord.{workflow_id}"
    return base, f"{base}.gate", f"{base}.claim"


def chord_queue_arguments(expires: float = CHORD_EXPIRES) -> dict[str, Any]:
    """A workflow's queues: durable, classic, deleted by RabbitMQ after ``expires`` unused."""
    return {"x-queue-type": "classic", "x-expires": max(1000, int(expires * 1000))}
