"""Task events on the wire: one stream message carries a batch of events.

The body is a JSON array of objects, ``content_type=application/json``, and the header
``aioqueue-events`` says how many there are. Each object has ``type`` (e.g. ``task-started``),
``time`` (Unix seconds, a float) and ``worker`` (``host:pid``); every other key is one of the
event's fields (docs/observability.md lists them). Decoding is strict: anything else is a
`DecodeError`, and readers skip and count such a batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from ..errors import DecodeError
from .codec import dumps, loads
from .headers import H_EVENTS

__all__ = [
    "MAX_ERROR",
    "MAX_REPR",
    "MAX_TRACEBACK",
    "TASK_EVENTS",
    "WORKER_EVENTS",
    "Event",
    "batch_headers",
    "bounded",
    "bounded_repr",
    "call_repr",
    "decode_batch",
    "encode_batch",
    "wire_object",
]

TASK_EVENTS: Final = frozenset(
    {
        "task-received",
        "task-started",
        "task-progress",
        "task-succeeded",
        "task-failed",
        "task-retried",
        "task-dead-lettered",
        "task-cancelled",
    }
)
WORKER_EVENTS: Final = frozenset({"worker-online", "worker-heartbeat", "worker-offline"})

MAX_REPR: Final = 1000  # args, result, progress, error
MAX_ERROR: Final = 1000
MAX_TRACEBACK: Final = 8000
_RESERVED = ("type", "time", "worker")


@dataclass(frozen=True, slots=True)
class Event:
    """One task or worker event.

    Attributes:
        type: ``task-started``, ``worker-heartbeat``, ... (`TASK_EVENTS`, `WORKER_EVENTS`).
        time: When it happened, Unix seconds.
        worker: The worker's identity, ``host:pid``.
        fields: The rest (``id``, ``name``, ``attempt``, ``running``, ...); any may be absent.
        offset: The stream offset of the batch it came in (set by readers; the events of one
            batch share it), None on an event not read from a stream.
    """

    type: str
    time: float
    worker: str
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    offset: int | None = field(default=None, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        """``fields[key]``, or ``default``."""
        return self.fields.get(key, default)

    def to_json(self) -> dict[str, Any]:
        """The event as one object of the wire format."""
        return wire_object(dict(self.fields), self.type, self.time, self.worker)


def wire_object(fields: dict[str, Any], kind: str, at: float, worker: str) -> dict[str, Any]:
    """``fields`` made into an event's object of the wire format, in place: its ``type``,
    ``time`` and ``worker`` added after the event's own fields."""
    fields["type"], fields["time"], fields["worker"] = kind, at, worker
    return fields


def encode_batch(events: list[Event]) -> bytes:
    """The body of one stream message carrying ``events`` (fields must be JSON-native)."""
    return dumps([event.to_json() for event in events])


def batch_headers(count: int) -> dict[str, Any]:
    """The headers of a batch of ``count`` events."""
    return {H_EVENTS: count}


def decode_batch(body: bytes, max_size: int) -> list[Event]:
    """The events of one stream message's body.

    Raises:
        DecodeError: the body is larger than ``max_size``, not JSON, not an array of
            objects, or an object lacks a string ``type``/``worker`` or a numeric ``time``.
    """
    value = loads(body, max_size=max_size, what="event batch")
    if not isinstance(value, list):
        raise DecodeError("an event batch must be a JSON array")
    events = []
    for item in value:
        if not isinstance(item, dict):
            raise DecodeError("an event must be a JSON object")
        kind, at, worker = item.get("type"), item.get("time"), item.get("worker")
        if not isinstance(kind, str) or not kind or not isinstance(worker, str):
            raise DecodeError("an event needs a string 'type' and 'worker'")
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise DecodeError("an event needs a numeric 'time'")
        fields = {k: v for k, v in item.items() if k not in _RESERVED}
        events.append(Event(kind, float(at), worker, MappingProxyType(fields)))
    return events


def bounded(text: str, limit: int = MAX_REPR) -> str:
    """``text`` cut to at most ``limit`` characters (the last one ``…`` when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_repr(value: Any, limit: int = MAX_REPR) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises."""
    try:
        text = repr(value)
    except Exception as exc:  # a user's __repr__ may fail: the event must not
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return bounded(text, limit)


def call_repr(args: Any, kwargs: Mapping[str, Any], limit: int = MAX_REPR) -> str:
    """The arguments of a call as written in Python: ``2, 3, x=1``, bounded."""
    parts = [bounded_repr(a, limit) for a in args] if isinstance(args, list | tuple) else []
    parts += [f"{k}={bounded_repr(v, limit)}" for k, v in kwargs.items()]
    return bounded(", ".join(parts), limit)
