"""The pure scheduling functions: slots of cron and interval schedules, and the misfire policy.

Tables of (schedule, after) → expected slots, read as wall times in the schedule's zone with
their UTC offset, so a DST rule can be checked by eye.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioqueue import EncodeError, Misfire, Schedule
from aioqueue.scheduler import next_run, prev_run, slot_id, slots_between
from aioqueue.scheduler.schedule import due_slots, missed_slots

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"
LORD_HOWE = "Australia/Lord_Howe"  # DST moves the clocks by 30 minutes


def cron(expr: str, tz: str = "UTC", **options: object) -> Schedule:
    return Schedule(name="s", task="t", cron=expr, tz=tz, **options)  # type: ignore[arg-type]


def every(seconds: int, **options: object) -> Schedule:
    return Schedule(name="s", task="t", every=timedelta(seconds=seconds), **options)  # type: ignore[arg-type]


def local(tz: str, text: str) -> datetime:
    """An instant, from ``"2024-03-31 03:00 +02:00"`` (wall time and offset in ``tz``)."""
    when = datetime.strptime(text, "%Y-%m-%d %H:%M %z")
    assert when.astimezone(ZoneInfo(tz)).utcoffset() == when.utcoffset(), f"{text} not in {tz}"
    return when.astimezone(UTC)


def upcoming(schedule: Schedule, after: datetime, count: int) -> list[str]:
    """The next ``count`` slots as ``"YYYY-mm-dd HH:MM +hh:mm"`` wall times of the zone."""
    slots, when = [], after
    for _ in range(count):
        when = next_run(schedule, when)
        assert when.tzinfo is UTC
        slots.append(when.astimezone(schedule.zone).strftime("%Y-%m-%d %H:%M %z"))
    return [s[:-2] + ":" + s[-2:] for s in slots]


CRON_TABLE = [
    # -- Europe/Berlin: spring forward 2024-03-31 02:00 CET -> 03:00 CEST ----------------------
    pytest.param(
        "30 2 * * *",
        BERLIN,
        "2024-03-29 12:00 +01:00",
        ["2024-03-30 02:30 +01:00", "2024-03-31 03:00 +02:00", "2024-04-01 02:30 +02:00"],
        id="berlin-gap-daily-fires-when-clocks-jump",
    ),
    pytest.param(
        "0 2 * * *",
        BERLIN,
        "2024-03-30 12:00 +01:00",
        ["2024-03-31 03:00 +02:00", "2024-04-01 02:00 +02:00"],
        id="berlin-gap-start-fires-at-gap-end",
    ),
    pytest.param(
        "*/15 * * * *",
        BERLIN,
        "2024-03-31 01:40 +01:00",
        ["2024-03-31 01:45 +01:00", "2024-03-31 03:00 +02:00", "2024-03-31 03:15 +02:00"],
        id="berlin-gap-quarter-hours-collapse-into-one",
    ),
    pytest.param(
        "30 * * * *",
        BERLIN,
        "2024-03-31 00:40 +01:00",
        ["2024-03-31 01:30 +01:00", "2024-03-31 03:00 +02:00", "2024-03-31 03:30 +02:00"],
        id="berlin-gap-hourly-keeps-its-count",
    ),
    pytest.param(
        "0 3 * * *",
        BERLIN,
        "2024-03-30 12:00 +01:00",
        ["2024-03-31 03:00 +02:00", "2024-04-01 03:00 +02:00"],
        id="berlin-gap-time-after-gap-unaffected",
    ),
    # -- Europe/Berlin: fall back 2024-10-27 03:00 CEST -> 02:00 CET ---------------------------
    pytest.param(
        "30 2 * * *",
        BERLIN,
        "2024-10-26 12:00 +02:00",
        ["2024-10-27 02:30 +02:00", "2024-10-28 02:30 +01:00"],
        id="berlin-overlap-daily-fires-once-first-occurrence",
    ),
    pytest.param(
        "*/30 * * * *",
        BERLIN,
        "2024-10-27 01:10 +02:00",
        [
            "2024-10-27 01:30 +02:00",
            "2024-10-27 02:00 +02:00",
            "2024-10-27 02:30 +02:00",
            "2024-10-27 03:00 +01:00",
            "2024-10-27 03:30 +01:00",
        ],
        id="berlin-overlap-repeated-hour-not-repeated",
    ),
    pytest.param(
        "0 3 * * *",
        BERLIN,
        "2024-10-26 12:00 +02:00",
        ["2024-10-27 03:00 +01:00", "2024-10-28 03:00 +01:00"],
        id="berlin-issue-example-nightly-report",
    ),
    # -- America/New_York: 2024-03-10 02:00 EST -> 03:00 EDT; 2024-11-03 02:00 EDT -> 01:00 EST
    pytest.param(
        "30 2 * * *",
        NEW_YORK,
        "2024-03-09 12:00 -05:00",
        ["2024-03-10 03:00 -04:00", "2024-03-11 02:30 -04:00"],
        id="new-york-gap",
    ),
    pytest.param(
        "30 1 * * *",
        NEW_YORK,
        "2024-11-02 12:00 -04:00",
        ["2024-11-03 01:30 -04:00", "2024-11-04 01:30 -05:00"],
        id="new-york-overlap",
    ),
    pytest.param(
        "0 * * * *",
        NEW_YORK,
        "2024-11-03 00:30 -04:00",
        ["2024-11-03 01:00 -04:00", "2024-11-03 02:00 -05:00", "2024-11-03 03:00 -05:00"],
        id="new-york-overlap-hourly",
    ),
    # -- Australia/Lord_Howe: 2024-10-06 02:00 +10:30 -> 02:30 +11; 2024-04-07 02:00 -> 01:30 --
    pytest.param(
        "*/15 * * * *",
        LORD_HOWE,
        "2024-10-06 01:40 +10:30",
        ["2024-10-06 01:45 +10:30", "2024-10-06 02:30 +11:00", "2024-10-06 02:45 +11:00"],
        id="lord-howe-half-hour-gap",
    ),
    pytest.param(
        "0 2 * * *",
        LORD_HOWE,
        "2024-10-05 12:00 +10:30",
        ["2024-10-06 02:30 +11:00", "2024-10-07 02:00 +11:00"],
        id="lord-howe-gap-daily",
    ),
    pytest.param(
        "0,45 * * * *",
        LORD_HOWE,
        "2024-04-07 00:30 +11:00",
        [
            "2024-04-07 00:45 +11:00",
            "2024-04-07 01:00 +11:00",
            "2024-04-07 01:45 +11:00",
            "2024-04-07 02:00 +10:30",
            "2024-04-07 02:45 +10:30",
        ],
        id="lord-howe-half-hour-overlap",
    ),
    # -- calendars ---------------------------------------------------------------------------
    pytest.param(
        "0 0 31 * *",
        "UTC",
        "2024-01-31 00:00 +00:00",
        ["2024-03-31 00:00 +00:00", "2024-05-31 00:00 +00:00", "2024-07-31 00:00 +00:00"],
        id="month-ends-31st-skips-short-months",
    ),
    pytest.param(
        "0 0 29 2 *",
        "UTC",
        "2024-03-01 00:00 +00:00",
        ["2028-02-29 00:00 +00:00", "2032-02-29 00:00 +00:00"],
        id="feb-29-leap-years-only",
    ),
    pytest.param(
        "0 12 28-31 2 *",
        "UTC",
        "2100-02-27 00:00 +00:00",
        ["2100-02-28 12:00 +00:00", "2101-02-28 12:00 +00:00"],
        id="2100-is-not-a-leap-year",
    ),
    pytest.param(
        "59 23 31 12 *",
        "UTC",
        "2024-12-31 23:58 +00:00",
        ["2024-12-31 23:59 +00:00", "2025-12-31 23:59 +00:00"],
        id="year-end",
    ),
    pytest.param(
        "0 9 * * mon-fri",
        BERLIN,
        "2024-03-29 10:00 +01:00",
        ["2024-04-01 09:00 +02:00", "2024-04-02 09:00 +02:00"],
        id="weekdays-across-dst",
    ),
    pytest.param(
        "@daily",
        NEW_YORK,
        "2024-03-09 12:00 -05:00",
        ["2024-03-10 00:00 -05:00", "2024-03-11 00:00 -04:00"],
        id="alias-daily",
    ),
]


@pytest.mark.parametrize(("expr", "tz", "after", "expected"), CRON_TABLE)
def test_cron_next_run(expr: str, tz: str, after: str, expected: list[str]) -> None:
    schedule = cron(expr, tz)
    assert upcoming(schedule, local(tz, after), len(expected)) == expected


def test_next_run_is_strictly_after_a_slot() -> None:
    schedule = cron("0 * * * *")
    slot = datetime(2024, 5, 1, 3, 0, tzinfo=UTC)
    assert next_run(schedule, slot) == slot + timedelta(hours=1)
    assert next_run(schedule, slot - timedelta(microseconds=1)) == slot


@pytest.mark.parametrize(
    ("seconds", "start", "after", "expected"),
    [
        (30, None, "2024-05-01T00:00:10+00:00", ["00:00:30", "00:01:00", "00:01:30"]),
        (30, None, "2024-05-01T00:00:30+00:00", ["00:01:00", "00:01:30", "00:02:00"]),
        (7, None, "2024-05-01T00:00:00+00:00", ["00:00:06", "00:00:13", "00:00:20"]),
        (1, None, "2024-05-01T00:00:00.5+00:00", ["00:00:01", "00:00:02", "00:00:03"]),
        (3600, None, "2024-05-01T00:10:00+02:00", ["23:00:00", "00:00:00", "01:00:00"]),
        (60, "2024-05-01T00:00:20+00:00", "2024-04-30T00:00:00+00:00", ["00:00:20", "00:01:20"]),
        (60, "2024-05-01T00:00:20+00:00", "2024-05-01T00:05:00+00:00", ["00:05:20", "00:06:20"]),
        (90, "2024-05-01T02:00:00+02:00", "2024-05-01T00:00:00+00:00", ["00:01:30", "00:03:00"]),
    ],
    ids=[
        "grid",
        "on-a-slot",
        "7s-epoch-grid",
        "1s",
        "hours-ignore-zones",
        "start-future",
        "start-past",
        "start-other-zone",
    ],
)
def test_interval_next_run(
    seconds: int, start: str | None, after: str, expected: list[str]
) -> None:
    schedule = every(seconds, start=datetime.fromisoformat(start) if start else None)
    when, got = datetime.fromisoformat(after), []
    for _ in expected:
        when = next_run(schedule, when)
        got.append(when.strftime("%H:%M:%S"))
    assert got == expected


@given(
    seconds=st.integers(1, 10**6),
    after=st.datetimes(datetime(1990, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
)
@settings(max_examples=200, deadline=None)
def test_interval_slots_sit_on_the_epoch_grid(seconds: int, after: datetime) -> None:
    schedule = every(seconds)
    slot = next_run(schedule, after)
    assert after < slot <= after + timedelta(seconds=seconds)
    assert (slot - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(seconds=seconds) == timedelta(0)
    assert prev_run(schedule, slot) == slot
    assert prev_run(schedule, slot - timedelta(microseconds=1)) == slot - timedelta(seconds=seconds)


@given(
    expr=st.sampled_from(["*/15 * * * *", "30 2 * * *", "0 * * * *", "0,45 1-3 * * *"]),
    tz=st.sampled_from([BERLIN, NEW_YORK, LORD_HOWE, "UTC"]),
    after=st.datetimes(datetime(2023, 1, 1), datetime(2026, 1, 1), timezones=st.just(UTC)),
)
@settings(max_examples=200, deadline=None)
def test_cron_prev_and_next_agree(expr: str, tz: str, after: datetime) -> None:
    schedule = cron(expr, tz)
    slot = next_run(schedule, after)
    assert slot > after
    assert prev_run(schedule, slot) == slot
    previous = prev_run(schedule, after)
    assert previous is not None and previous <= after
    assert next_run(schedule, previous) == slot


def test_prev_run_in_the_repeated_hour() -> None:
    schedule = cron("*/30 * * * *", BERLIN)
    # 02:40 CET (second pass): the last slot was 02:30 CEST, an hour and ten minutes earlier
    at = local(BERLIN, "2024-10-27 02:40 +01:00")
    assert prev_run(schedule, at) == local(BERLIN, "2024-10-27 02:30 +02:00")


def test_prev_run_before_start_is_none() -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    assert prev_run(every(60, start=start), start - timedelta(seconds=1)) is None
    assert prev_run(cron("* * * * *", start=start), start - timedelta(seconds=1)) is None
    assert next_run(cron("0 0 * * *", start=start), datetime(2000, 1, 1, tzinfo=UTC)) == start


def test_slots_between_is_half_open() -> None:
    schedule = every(10)
    start = datetime(2024, 5, 1, tzinfo=UTC)
    slots = list(slots_between(schedule, start, start + timedelta(seconds=30)))
    assert slots == [start + timedelta(seconds=s) for s in (10, 20, 30)]


def test_slot_id_is_the_schedule_and_the_utc_slot() -> None:
    slot = local(BERLIN, "2024-03-31 03:00 +02:00")
    assert slot_id("nightly", slot) == "nightly@2024-03-31T01:00:00Z"
    odd = datetime(2024, 1, 1, 0, 0, 0, 5, tzinfo=UTC)
    assert slot_id("n", odd) == "n@2024-01-01T00:00:00.000005Z"


# -- the misfire policy ----------------------------------------------------------------------

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("misfire", "window", "cursor", "now", "expected"),
    [
        # on time (less than the 10 s grace late): always fired, whatever the policy
        (Misfire.SKIP, None, 0, 60, [60]),
        (Misfire.SKIP, None, 0, 69, [60]),
        (Misfire.SKIP, None, 0, 59, []),
        # missed (a takeover, a restart): skipped, the one next on time still fires
        (Misfire.SKIP, None, 0, 70, []),
        (Misfire.SKIP, None, 0, 305, [300]),
        # once: the latest missed slot, then any on-time one
        (Misfire.ONCE, None, 0, 250, [240]),
        (Misfire.ONCE, None, 0, 305, [240, 300]),
        (Misfire.ONCE, timedelta(seconds=30), 0, 280, []),  # 40 s old: too old
        (Misfire.ONCE, timedelta(seconds=30), 0, 265, [240]),
        (Misfire.ONCE, None, 240, 250, []),  # already fired
        # all: every missed slot within the window, oldest first
        (Misfire.ALL, timedelta(hours=1), 0, 250, [60, 120, 180, 240]),
        (Misfire.ALL, timedelta(seconds=130), 0, 250, [180, 240]),
        (Misfire.ALL, timedelta(hours=1), 120, 305, [180, 240, 300]),
        (Misfire.ALL, timedelta(seconds=11), 0, 305, [300]),
    ],
)
def test_due_slots(
    misfire: Misfire, window: timedelta | None, cursor: float, now: float, expected: list[int]
) -> None:
    schedule = Schedule(
        name="s",
        task="t",
        every=timedelta(minutes=1),
        start=T0,
        misfire=misfire,
        misfire_window=window,
        grace=timedelta(seconds=10),
    )
    assert due_slots(schedule, at(cursor), at(now)) == [at(s) for s in expected]


def test_missed_slots_range() -> None:
    schedule = every(60, start=T0, grace=timedelta(seconds=10))
    assert missed_slots(schedule, at(0), at(250)) == (at(60), at(240))


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of cron= and every="),
        ({"cron": "* * * * *", "every": timedelta(seconds=1)}, "exactly one"),
        ({"cron": "* * * * * *"}, "5 fields"),
        ({"cron": "0 0 * * * 2030"}, "5 fields"),
        ({"cron": "@reboot"}, "5 fields"),
        ({"cron": "61 * * * *"}, "bad cron"),
        ({"cron": "0 0 31 2 *"}, "bad cron"),
        ({"cron": "0 3 * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"every": timedelta(milliseconds=500)}, "whole number of seconds"),
        ({"every": timedelta(seconds=1.5)}, "whole number of seconds"),
        ({"every": timedelta(seconds=5), "tz": BERLIN}, "cron schedules only"),
        ({"every": timedelta(seconds=5), "start": datetime(2024, 1, 1)}, "aware"),
        ({"every": timedelta(seconds=5), "misfire": "all"}, "misfire_window"),
        ({"every": timedelta(seconds=5), "misfire": "sometimes"}, "sometimes"),
        ({"every": timedelta(seconds=5), "grace": timedelta(0)}, "grace"),
        (
            {
                "every": timedelta(seconds=5),
                "misfire": "once",
                "misfire_window": timedelta(seconds=30),
            },
            "longer than grace",
        ),
    ],
)
def test_bad_schedules_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(name="s", task="t", **options)  # type: ignore[arg-type]


def test_arguments_must_be_json_native() -> None:
    with pytest.raises(EncodeError):
        Schedule(name="s", task="t", every=timedelta(seconds=5), args=(object(),))
