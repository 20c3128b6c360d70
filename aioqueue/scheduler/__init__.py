"""The scheduler: periodic tasks fired exactly once per slot by any number of instances.

``python -m aioqueue.scheduler module:app``, ``python -m aioqueue.worker module:app --scheduler``,
or ``async with app.scheduler():`` inside any asyncio program. See ``docs/scheduler.md``.
"""

from ._scheduler import Scheduler, SchedulerStatistics
from .clock import Clock, FakeClock, SystemClock
from .schedule import Misfire, Schedule, next_run, prev_run, slot_id, slots_between

__all__ = [
    "Clock",
    "FakeClock",
    "Misfire",
    "Schedule",
    "Scheduler",
    "SchedulerStatistics",
    "SystemClock",
    "next_run",
    "prev_run",
    "slot_id",
    "slots_between",
]
