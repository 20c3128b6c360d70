"""What the scheduler tests on RabbitMQ and on the in-memory broker share: the same expectations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

START = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)  # half a minute before the first slot


def slot(minute: int, second: int = 0, *, hour: int = 0) -> datetime:
    return datetime(2030, 1, 1, hour, minute, second, tzinfo=UTC)


# Slots missed while no scheduler ran (minutes 2-10), by misfire policy: the minutes that fire.
missed_slots = pytest.mark.parametrize(
    ("misfire", "window", "expected"),
    [
        ("skip", None, [1, 11]),
        ("once", None, [1, 10, 11]),
        ("all", timedelta(minutes=4, seconds=45), [1, 6, 7, 8, 9, 10, 11]),
    ],
)
