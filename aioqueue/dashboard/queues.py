"""The queues page: depths, consumers, rates, dead letters (browse, replay, purge).

RabbitMQ is reached through the same functions as ``aioqueue status`` and ``aioqueue dlq``
(`aioqueue.rabbit.admin`, `aioqueue.cli.dlq`); nothing here speaks AMQP itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..cli.dlq import DeadLetter, rabbit_of, replay_message, task_id_of
from ..message import H_DEAD_TRACEBACK, H_UNDECODABLE
from ..rabbit.admin import held_messages, purge_queue, queue_depths
from ..topology import dlq_name
from .state import DashboardState

if TYPE_CHECKING:
    from ..app import App

__all__ = ["dead_letters", "purge_dead", "queue_names", "queue_rows", "replay_dead"]

BROWSE_LIMIT = 200


def queue_names(app: App, state: DashboardState) -> list[str]:
    """The app's queues and every queue a recent task named (at most 200)."""
    names = set(app.queues())
    names.update(r.queue for r in state.tasks.values() if r.queue and len(names) < 200)
    return sorted(names)


def _rates(state: DashboardState, now: float) -> dict[str, list[int]]:
    """Per queue: tasks received and finished in the last 60 s (from the task ring)."""
    rates: dict[str, list[int]] = {}
    for record in reversed(state.tasks.values()):
        if record.updated < now - 60:
            break  # the ring is in update order
        pair = rates.setdefault(record.queue or "?", [0, 0])
        pair[0] += record.received is not None and record.received >= now - 60
        pair[1] += record.finished is not None and record.finished >= now - 60
    return rates


async def queue_rows(app: App, state: DashboardState) -> list[dict[str, Any]]:
    names = queue_names(app, state)
    broker = rabbit_of(app)
    depths = await queue_depths(broker, [n for q in names for n in (q, dlq_name(q))])
    rates = _rates(state, time.time())
    rows = []
    for name in names:
        depth, dead = depths.get(name), depths.get(dlq_name(name))
        received, finished = rates.get(name, [0, 0])
        rows.append(
            {
                "name": name,
                "exists": depth is not None,
                "depth": depth[0] if depth else 0,
                "consumers": depth[1] if depth else 0,
                "in_per_min": received,
                "out_per_min": finished,
                "dead": dead[0] if dead else 0,
            }
        )
    return rows


def _letter_view(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "task": letter.task,
        "reason": letter.reason,
        "error": letter.error,
        "at": letter.at,
        "traceback": str(letter.headers.get(H_DEAD_TRACEBACK, ""))[:8000],
        "body": letter.body[:2000].decode("utf-8", "replace"),
        "replayable": H_UNDECODABLE not in letter.headers,
    }


async def dead_letters(app: App, queue: str, task_id: str | None = None) -> list[dict[str, Any]]:
    """The dead letters of ``queue`` (up to `BROWSE_LIMIT`), or the one of ``task_id``."""
    async with held_messages(rabbit_of(app), dlq_name(queue), BROWSE_LIMIT) as messages:
        letters = [DeadLetter.of(m) for m in messages or []]
    return [_letter_view(x) for x in letters if task_id is None or x.id == task_id]


async def replay_dead(app: App, queue: str, ids: list[str]) -> int:
    """Replay the dead letters of ``queue`` with these task ids; how many were replayed."""
    broker = rabbit_of(app)
    replayed = 0
    async with held_messages(broker, dlq_name(queue), BROWSE_LIMIT) as messages:
        for message in messages or []:
            if task_id_of(message) in ids and H_UNDECODABLE not in message.headers:
                replayed += await replay_message(broker, message, queue, app.signing)
    return replayed


async def purge_dead(app: App, queue: str) -> int | None:
    """Delete every dead letter of ``queue``; how many (None: it has no dead-letter queue)."""
    return await purge_queue(rabbit_of(app), dlq_name(queue))
