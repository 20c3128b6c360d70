"""What a submit's arguments and options mean, checked before anything is published.

`check_arguments`: JSON-native arguments only; `delay_of`: a ``countdown`` or ``eta`` as seconds
from now (within what the delay ladder holds); `deadline_of`: ``expires`` as a Unix time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .message import check_json_native
from .topology import delay_units

__all__ = ["check_arguments", "deadline_of", "delay_of"]


def check_arguments(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> None:
    """`EncodeError` unless every argument is JSON-native (before anything is published)."""
    check_json_native(list(args), "args")
    check_json_native(kwargs, "kwargs")


def delay_of(
    now: float, countdown: float | None, eta: datetime | None, *, ladder: bool = True
) -> float:
    """Seconds from ``now`` until the task may run; `ValueError` for a bad option, or (with
    ``ladder``) one beyond the longest delay aioqueue's delay ladder holds."""
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    delay = _raw_delay(now, countdown, eta)
    if ladder:
        delay_units(delay)  # raises ValueError beyond the longest delay the ladder holds
    return delay


def _raw_delay(now: float, countdown: float | None, eta: datetime | None) -> float:
    if eta is not None:
        if eta.tzinfo is None:
            raise ValueError("eta must be an aware datetime (with a time zone)")
        return max(0.0, eta.timestamp() - now)
    if countdown is not None:
        if countdown < 0:
            raise ValueError("countdown must not be negative")
        return float(countdown)
    return 0.0


def deadline_of(now: float, expires: float | datetime | None) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            raise ValueError("expires must be an aware datetime (with a time zone)")
        return expires.timestamp()
    return now + float(expires)
