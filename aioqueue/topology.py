"""Queue names and queue arguments: pure functions, so producers and workers always agree.

- Work queues are named exactly as the user names them; they are durable and classic by default.
- The dead-letter queue of work queue ``Q`` is ``Q.dlq``.
- aioqueue's own infrastructure queues all start with ``aioqueue.``; a client's reply queue is
  ``aioqueue.reply.<client id>``: durable, expiring when unused.
"""

from __future__ import annotations

from typing import Any, Final, Literal

__all__ = [
    "INFRA_PREFIX",
    "QueueType",
    "dlq_arguments",
    "dlq_name",
    "reply_queue_arguments",
    "reply_queue_name",
    "work_queue_arguments",
]

INFRA_PREFIX: Final = "aioqueue."
QueueType = Literal["classic", "quorum"]


def dlq_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return f"{queue}.dlq"


def reply_queue_name(client_id: str) -> str:
    """The reply queue of one client (one `App` instance)."""
    return f"{INFRA_PREFIX}reply.{client_id}"


def work_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """Arguments of a work queue; producers and workers must declare it identically."""
    return {"x-queue-type": queue_type}


def dlq_arguments(queue_type: QueueType = "classic") -> dict[str, Any]:
    """Arguments of a dead-letter queue."""
    return {"x-queue-type": queue_type}


def reply_queue_arguments(expires: float) -> dict[str, Any]:
    """A durable reply queue that RabbitMQ deletes after ``expires`` seconds unused."""
    return {"x-queue-type": "classic", "x-expires": max(1000, int(expires * 1000))}
