"""The schedules page: each periodic task's next slot, the last slot fired, and by whom.

The last fired slot is the schedule's `SlotRecord`, read from its state queue and left there
(held unacked, then given back: the scheduler reads it the same way). Its ``by`` is the
scheduler instance that fired it: the leader at that time. Whether some instance holds the
lease now is read from the consumers of the leader's beacon queue, as followers read it: a
passive declare of the lease queue itself, exclusive to the leader's connection, is refused
(``RESOURCE_LOCKED``) exactly while a leader holds it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..cli.dlq import rabbit_of
from ..errors import DecodeError
from ..rabbit.admin import held_messages, queue_depths
from ..scheduler import Schedule, next_run
from ..scheduler.records import SlotRecord, leader_queue_name, state_queue_name

if TYPE_CHECKING:
    from ..app import App

__all__ = ["schedule_rows"]


async def _last_fired(app: App, schedule: Schedule) -> SlotRecord | None:
    queue = state_queue_name(app.name, schedule.name)
    async with held_messages(rabbit_of(app), queue, 4) as messages:
        records = []
        for message in messages or []:
            try:
                records.append(SlotRecord.decode(message.body))
            except DecodeError:
                continue
    return max(records, key=lambda r: r.slot, default=None)


async def schedule_rows(app: App) -> dict[str, Any]:
    now = datetime.now(UTC)
    beacon = leader_queue_name(app.name)
    depth = (await queue_depths(rabbit_of(app), [beacon]))[beacon]
    rows = []
    for schedule in app.schedules.values():
        last = await _last_fired(app, schedule)
        rows.append(
            {
                "name": schedule.name,
                "task": schedule.task,
                "when": schedule.cron or f"every {schedule.every}",
                "next": next_run(schedule, now).isoformat(),
                "last": last.slot.isoformat() if last else None,
                "leader": last.by if last else None,
            }
        )
    return {"lease_held": bool(depth and depth[1]), "schedules": rows}
