"""Schedules as data, and the pure functions that place their slots in time.

A *slot* is one instant a schedule fires at, an aware UTC datetime. Its identity,
``"<schedule name>@<slot in ISO 8601>"`` (`slot_id`), is the same on every scheduler instance and
is the id of the task message submitted for it.

Cron schedules (five fields, parsed by croniter) run on the wall clock of their time zone, and
every wall time the expression matches fires exactly once:

- a wall time that occurs twice (clocks go back) fires once, at its first occurrence;
- a wall time that does not exist (clocks go forward) fires once, at the first instant after the
  gap — the time the clocks jump to. Several such times (``*/15`` in a one-hour gap) collapse
  into that one fire, which is also the slot of a time that exists there (``03:00``).

Interval schedules (``every``) ignore wall clocks: their slots sit on a fixed grid,
``start + k * every`` for k = 0, 1, ... (``start`` defaults to the Unix epoch), so every instance
computes the same slots.

Which due slots fire is decided by `due_slots`: a slot is *on time* when less than ``grace``
has passed since it; older slots were *missed* and follow the schedule's `Misfire` policy.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from ..message import check_json_native

__all__ = [
    "DEFAULT_GRACE",
    "Misfire",
    "Schedule",
    "due_slots",
    "missed_slots",
    "next_run",
    "prev_run",
    "slot_id",
    "slots_between",
]

DEFAULT_GRACE: Final = timedelta(seconds=30)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_CRON_ALIASES: Final = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
# Longest a wall time can repeat when clocks go back (real transitions are at most 2 h).
_MAX_FOLD: Final = timedelta(hours=3)
_CRON_START: Final = datetime(2000, 1, 1)


class Misfire(enum.StrEnum):
    """What to do with slots missed while no scheduler could fire them (older than ``grace``).

    Attributes:
        SKIP: Drop them; the schedule continues with its next slot (the default).
        ONCE: Fire the most recent missed slot once (within ``misfire_window``, if given).
        ALL: Fire every missed slot of the last ``misfire_window``, oldest first.
    """

    SKIP = "skip"
    ONCE = "once"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Schedule:
    """When to submit which task, and what to do about slots nobody fired in time.

    Give exactly one of ``cron`` and ``every``.

    Attributes:
        name: The schedule's name, unique in its app (the task's name unless given).
        task: Name of the task submitted at each slot.
        cron: Five-field cron expression (or an alias such as ``@daily``), read in ``tz``.
        every: Fixed interval, a whole number of seconds, at least one.
        tz: IANA time zone of a cron schedule (default ``"UTC"``).
        start: Aware datetime anchoring an interval grid (default: the Unix epoch); no slot
            of either kind comes before it.
        args: Positional arguments of every run (JSON-native).
        kwargs: Keyword arguments of every run (JSON-native).
        queue: Queue to submit to; default: the task's own queue.
        misfire: The policy for missed slots, see `Misfire`.
        misfire_window: How old a missed slot may be and still fire (`Misfire.ONCE`:
            optional; `Misfire.ALL`: required).
        grace: A slot fired less than this after its time is on time, not missed.
        skip_if_running: Skip a slot while the run of the previous slot has not finished.
    """

    name: str
    task: str
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    start: datetime | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    misfire: Misfire = Misfire.SKIP
    misfire_window: timedelta | None = None
    grace: timedelta = DEFAULT_GRACE
    skip_if_running: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.task:
            raise ValueError("a schedule needs a name and a task name")
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give exactly one of cron= and every=")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "misfire", Misfire(self.misfire))
        check_json_native(list(self.args), f"schedule {self.name!r} args")
        check_json_native(self.kwargs, f"schedule {self.name!r} kwargs")
        _check_times(self)
        if self.cron is not None:
            _check_cron(self, self.cron)
        else:
            _check_every(self)

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's time zone."""
        return _zone(self.tz)

    def describe(self) -> str:
        """A short human description, e.g. ``"cron '0 3 * * *' in Europe/Berlin"``."""
        if self.cron is not None:
            return f"cron {self.cron!r} in {self.tz}"
        return f"every {_seconds(self.every)}s" + (f" from {self.start}" if self.start else "")


def _check_times(schedule: Schedule) -> None:
    if schedule.start is not None and schedule.start.utcoffset() is None:
        raise ValueError(f"schedule {schedule.name!r}: start must be an aware datetime")
    if schedule.grace <= timedelta(0):
        raise ValueError(f"schedule {schedule.name!r}: grace must be positive")
    window = schedule.misfire_window
    if window is not None and window <= timedelta(0):
        raise ValueError(f"schedule {schedule.name!r}: misfire_window must be positive")
    if schedule.misfire is Misfire.ALL and window is None:
        raise ValueError(
            f"schedule {schedule.name!r}: misfire='all' needs a misfire_window "
            "(how far back to catch up)"
        )
    if window is not None and window <= schedule.grace:
        raise ValueError(
            f"schedule {schedule.name!r}: misfire_window must be longer than grace "
            f"({schedule.grace}): only slots older than grace are missed"
        )


def _check_cron(schedule: Schedule, expr: str) -> None:
    fields = expr.split()
    if not (len(fields) == 5 or (len(fields) == 1 and fields[0].lower() in _CRON_ALIASES)):
        raise ValueError(
            f"schedule {schedule.name!r}: cron must have 5 fields "
            f"(minute hour day month weekday), got {expr!r}"
        )
    try:
        _zone(schedule.tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"schedule {schedule.name!r}: unknown time zone {schedule.tz!r}") from None
    try:
        croniter(expr, _CRON_START).get_next(datetime)
    except (CroniterBadCronError, CroniterBadDateError, ValueError, KeyError) as exc:
        raise ValueError(f"schedule {schedule.name!r}: bad cron {expr!r}: {exc}") from None


def _check_every(schedule: Schedule) -> None:
    every = schedule.every
    assert every is not None
    if every < timedelta(seconds=1) or every % timedelta(seconds=1):
        raise ValueError(
            f"schedule {schedule.name!r}: every must be a whole number of seconds, at least 1"
        )
    if schedule.tz != "UTC":
        raise ValueError(f"schedule {schedule.name!r}: tz applies to cron schedules only")


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _seconds(every: timedelta | None) -> int:
    assert every is not None
    return every // timedelta(seconds=1)


def slot_id(schedule_name: str, slot: datetime) -> str:
    """The identity of one slot: ``"<schedule>@<UTC ISO 8601>"``, e.g. ``"a@2024-05-01T03:00:00Z"``.

    It is the id of the slot's task message, the same on every scheduler instance.
    """
    text = slot.astimezone(UTC).isoformat()
    return f"{schedule_name}@{text.removesuffix('+00:00')}Z"


def _aware(when: datetime, what: str) -> None:
    if when.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got {when!r}")


def next_run(schedule: Schedule, after: datetime) -> datetime:
    """The first slot strictly after ``after`` (an aware datetime), in UTC."""
    _aware(after, "after")
    if schedule.start is not None and after < schedule.start:
        after = schedule.start - timedelta(microseconds=1)
    if schedule.every is not None:
        anchor = schedule.start or EPOCH
        steps = (after - anchor) // schedule.every + 1
        return (anchor + steps * schedule.every).astimezone(UTC)
    return _cron_next(schedule, after.astimezone(UTC))


def prev_run(schedule: Schedule, at: datetime) -> datetime | None:
    """The last slot at or before ``at`` (an aware datetime), in UTC; None if there is none."""
    _aware(at, "at")
    if schedule.start is not None and at < schedule.start:
        return None
    if schedule.every is not None:
        anchor = schedule.start or EPOCH
        steps = (at - anchor) // schedule.every
        return (anchor + steps * schedule.every).astimezone(UTC)
    slot = _cron_prev(schedule, at.astimezone(UTC))
    if schedule.start is not None and slot < schedule.start:
        return None
    return slot


def slots_between(schedule: Schedule, after: datetime, until: datetime) -> Iterator[datetime]:
    """The slots ``s`` with ``after < s <= until``, oldest first."""
    slot = next_run(schedule, after)
    while slot <= until:
        yield slot
        slot = next_run(schedule, slot)


def due_slots(schedule: Schedule, cursor: datetime, now: datetime) -> list[datetime]:
    """The slots to fire at ``now``, oldest first, given that none after ``cursor`` fired yet.

    On-time slots (less than ``grace`` old) always fire; missed ones follow ``misfire``.
    """
    late = now - schedule.grace
    fire: list[datetime] = []
    window = schedule.misfire_window
    if late > cursor and schedule.misfire is Misfire.ONCE:
        latest = prev_run(schedule, late)
        if latest is not None and latest > cursor and (window is None or latest > now - window):
            fire.append(latest)
    elif late > cursor and schedule.misfire is Misfire.ALL:
        assert window is not None
        fire.extend(slots_between(schedule, max(cursor, now - window), late))
    fire.extend(slots_between(schedule, max(cursor, late), now))
    return fire


def missed_slots(schedule: Schedule, cursor: datetime, now: datetime) -> tuple[datetime, datetime]:
    """The first and the last slot after ``cursor`` that are ``grace`` late at ``now``.

    Only meaningful when ``next_run(schedule, cursor) <= now - grace``; used for logging.
    """
    first = next_run(schedule, cursor)
    last = prev_run(schedule, now - schedule.grace) or first
    return first, max(first, last)


# -- cron on a wall clock --------------------------------------------------------------------


def _wall(when: datetime, zone: ZoneInfo) -> datetime:
    """The naive local wall time of an instant."""
    return when.astimezone(zone).replace(tzinfo=None, fold=0)


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant a matched wall time fires at (first occurrence; after a gap)."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if _wall(first, zone) == wall:
        return first
    # ``wall`` falls in a gap: fire when the clocks jump, i.e. at the offset transition, found
    # by bisection between the instants the offsets before and after the gap would give.
    low = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    low, high = min(low, first), max(low, first)
    after = high.astimezone(zone).utcoffset()
    while high - low > timedelta(seconds=1):
        mid = low + (high - low) / 2
        if mid.astimezone(zone).utcoffset() == after:
            high = mid
        else:
            low = mid
    return high.replace(microsecond=0)


def _cron_next(schedule: Schedule, after: datetime) -> datetime:
    assert schedule.cron is not None
    zone = schedule.zone
    # Wall times before wall(after) map to instants at or before ``after``, so start there.
    it = croniter(schedule.cron, _wall(after, zone))
    while True:
        instant = _instant(it.get_next(datetime), zone)
        if instant > after:
            return instant


def _cron_prev(schedule: Schedule, at: datetime) -> datetime:
    assert schedule.cron is not None
    zone = schedule.zone
    # In the second pass of a repeated hour, later wall times still map to earlier instants.
    local = at.astimezone(zone)
    ahead = _MAX_FOLD if local.fold else timedelta(0)
    it = croniter(schedule.cron, _wall(at, zone) + ahead + timedelta(minutes=1))
    while True:
        instant = _instant(it.get_prev(datetime), zone)
        if instant <= at:
            return instant
