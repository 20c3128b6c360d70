"""The task message (`Envelope`), the reply (`Outcome`), and their strict JSON codec.

A task message is JSON (orjson) in the body — ``{"args": [...], "kwargs": {...}}`` — with every
piece of metadata in AMQP properties and headers:

- ``message_id`` and ``correlation_id``: the task id; ``reply_to``: the caller's reply queue;
- headers ``aioqueue-task`` (name), ``aioqueue-attempt`` (1 on the first run),
  ``aioqueue-protocol`` (:data:`PROTOCOL_VERSION`), and optionally ``aioqueue-deadline``
  (expiry) and ``aioqueue-scheduled-at`` (periodic slot), both in integer Unix milliseconds
  (AMQP tables carry floats only as 32-bit, far too coarse for a timestamp).

Decoding is strict and bounded: the size is checked before parsing, nesting depth is limited,
and anything malformed raises :class:`~aioqueue.errors.DecodeError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

from ..errors import DecodeError, EncodeError
from .headers import (
    CONTENT_TYPE,
    H_ATTEMPT,
    H_DEADLINE,
    H_PROTOCOL,
    H_SCHEDULED_AT,
    H_STREAM_TO,
    H_TASK,
    H_UNDECODABLE,
    PROTOCOL_VERSION,
)
from .workflow import Workflow, decode_workflow

if TYPE_CHECKING:
    from .celery import CeleryFields

__all__ = [
    "CONTENT_TYPE",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "Envelope",
    "ErrorInfo",
    "Outcome",
    "check_json_native",
    "new_id",
]

MAX_DEPTH: Final = 64


def check_json_native(value: Any, where: str = "value", *, max_depth: int = MAX_DEPTH) -> None:
    """Raise `EncodeError` unless ``value`` is JSON-native.

    JSON-native means None, bool, int (64-bit), finite float, str, list/tuple and dict with str
    keys, nested up to ``max_depth`` levels. orjson would happily serialize more (datetimes,
    dataclasses, UUIDs); we refuse them so that what a task receives is exactly what was sent.
    """
    if not _plain(value, max_depth):  # the walk that names what is wrong, and where
        _check(value, where, max_depth)


_INT_MIN, _INT_END = -(2**63), 2**64


def new_id() -> str:
    """A random UUID (version 4) as 32 hex digits: what ``uuid.uuid4().hex`` returns, in a
    third of its time (task ids and message ids: one per submit)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def _plain(value: Any, depth: int) -> bool:
    """True if ``value`` is JSON-native built of the exact types only (no subclasses): the
    common case, checked without building a path per item. False means "let `_check` decide"."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return True
    if kind is int:
        return bool(_INT_MIN <= value < _INT_END)
    if kind is float:
        return math.isfinite(value)
    if depth <= 0:
        return False
    if kind is list or kind is tuple:
        return _plain_items(value, depth - 1)
    if kind is dict:
        return _plain_dict(value, depth - 1)
    return False


def _plain_items(items: list[Any] | tuple[Any, ...], depth: int) -> bool:
    for item in items:
        if not _plain(item, depth):
            return False
    return True


def _plain_dict(value: dict[Any, Any], depth: int) -> bool:
    for key, item in value.items():
        if type(key) is not str or not _plain(item, depth):
            return False
    return True


def _check(value: Any, where: str, depth: int) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int | float):
        _check_number(value, where)
        return
    if depth <= 0:
        raise EncodeError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", depth - 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodeError(f"{where} has a non-str key {key!r}; JSON keys are strings")
            _check(item, f"{where}[{key!r}]", depth - 1)
        return
    raise EncodeError(f"{where} is a {type(value).__name__}, which is not JSON-native")


def _check_number(value: float, where: str) -> None:
    if isinstance(value, int) and not _INT_MIN <= value < _INT_END:
        raise EncodeError(f"{where} is an integer too large for JSON (64-bit): {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise EncodeError(f"{where} is {value!r}, which JSON cannot represent")


def dumps(value: Any) -> bytes:
    """Serialize an already-checked JSON-native value."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:  # pragma: no cover - checked before
        raise EncodeError(f"cannot encode as JSON: {exc}") from exc


def loads(body: bytes, *, max_size: int, what: str = "body") -> Any:
    """Parse JSON, refusing bodies over ``max_size`` bytes before parsing them."""
    if len(body) > max_size:
        raise DecodeError(f"{what} is {len(body)} bytes, over the limit of {max_size}")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"{what} is not valid JSON: {exc}") from exc
    # every level of nesting opens with a bracket: with few brackets (brackets inside strings
    # count too) the value cannot be too deep, and the walk is skipped
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > MAX_DEPTH and _depth_exceeds(value, MAX_DEPTH):
        raise DecodeError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    if isinstance(value, list):
        return limit <= 0 or any(_depth_exceeds(v, limit - 1) for v in value)
    if isinstance(value, dict):
        return limit <= 0 or any(_depth_exceeds(v, limit - 1) for v in value.values())
    return False


@dataclass(frozen=True, slots=True)
class Envelope:
    """One task message: what to run, with which arguments, and where the outcome goes."""

    id: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    reply_to: str | None = None
    attempt: int = 1
    deadline: float | None = None
    scheduled_at: float | None = None
    stream_to: str | None = None
    # set on a message in Celery's format (read from Celery, or sent to a Celery worker):
    # it is written back in that format, and its outcome goes out as an rpc:// reply
    celery: CeleryFields | None = None
    # set on a step of a workflow (aioqueue.workflow): what the workflow does after this step
    workflow: Workflow | None = None
    # trace context headers to carry (W3C ``traceparent``/``tracestate``), set only when
    # tracing is on (`aioqueue.tracing`); a received message's stay in its headers, unread
    trace: Mapping[str, str] | None = None

    def encode(self) -> bytes:
        """The message body: the arguments as JSON (and a workflow step's place)."""
        if self.workflow is not None:
            return dumps(
                {"args": self.args, "kwargs": self.kwargs, "workflow": self.workflow.to_json()}
            )
        return dumps({"args": self.args, "kwargs": self.kwargs})

    def headers(self) -> dict[str, Any]:
        """The AMQP headers that carry this envelope's metadata."""
        headers: dict[str, Any] = {
            H_TASK: self.task,
            H_ATTEMPT: self.attempt,
            H_PROTOCOL: PROTOCOL_VERSION,
        }
        if self.deadline is not None:
            headers[H_DEADLINE] = round(self.deadline * 1000)
        if self.scheduled_at is not None:
            headers[H_SCHEDULED_AT] = round(self.scheduled_at * 1000)
        if self.stream_to is not None:
            headers[H_STREAM_TO] = self.stream_to
        if self.trace:
            headers.update(self.trace)
        return headers

    @classmethod
    def decode(
        cls,
        body: bytes,
        *,
        message_id: str | None,
        headers: Mapping[str, Any] | None,
        reply_to: str | None = None,
        content_type: str | None = CONTENT_TYPE,
        max_size: int,
    ) -> Envelope:
        """Read a task message, raising `DecodeError` for anything malformed."""
        refuse_unreadable(headers)
        hdrs = headers or {}
        if not message_id:
            raise DecodeError("message has no message_id (the task id)")
        if content_type != CONTENT_TYPE:
            raise DecodeError(f"content_type is {content_type!r}, expected {CONTENT_TYPE!r}")
        protocol = hdrs.get(H_PROTOCOL)
        if type(protocol) is not int or protocol != PROTOCOL_VERSION:  # not True, 1.0, Decimal
            raise DecodeError(f"protocol version {protocol!r} is not {PROTOCOL_VERSION}")
        name = hdrs.get(H_TASK)
        if not isinstance(name, str) or not name:
            raise DecodeError(f"header {H_TASK!r} is missing or not a string")
        attempt = hdrs.get(H_ATTEMPT, 1)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise DecodeError(f"header {H_ATTEMPT!r} is {attempt!r}, not a positive integer")
        payload = loads(body, max_size=max_size)
        if not isinstance(payload, dict) or set(payload) - {"workflow"} != {"args", "kwargs"}:
            raise DecodeError('body must be an object with exactly "args" and "kwargs"')
        workflow = decode_workflow(payload["workflow"]) if "workflow" in payload else None
        args, kwargs = payload["args"], payload["kwargs"]
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise DecodeError('"args" must be an array and "kwargs" an object')
        return cls(
            id=message_id,
            task=name,
            args=tuple(args),
            kwargs=kwargs,
            reply_to=reply_to or None,
            attempt=attempt,
            deadline=_optional_time(hdrs, H_DEADLINE),
            scheduled_at=_optional_time(hdrs, H_SCHEDULED_AT),
            stream_to=_optional_str(hdrs, H_STREAM_TO),
            workflow=workflow,
        )


def refuse_unreadable(headers: Mapping[str, Any] | None) -> None:
    """Raise `DecodeError` if the frame reader marked this message `H_UNDECODABLE` (its
    properties or headers could not be read): whatever else it says, no consumer of ours may
    take it for one of its messages. The error names each unreadable part and its bytes."""
    if not headers or H_UNDECODABLE not in headers:
        return
    undecodable = headers[H_UNDECODABLE]
    if not isinstance(undecodable, Mapping) or not undecodable:
        raise DecodeError(f"header {H_UNDECODABLE!r} marks the message unreadable")
    parts = [
        f"{name}={(bytes(raw) if isinstance(raw, bytes | bytearray) else raw)!r:.80}"
        for name, raw in sorted(undecodable.items())
    ]
    raise DecodeError(
        f"undecodable properties: {', '.join(parts)} (they cannot be read: not UTF-8, or out "
        "of range)"
    )


def _optional_str(headers: Mapping[str, Any], key: str) -> str | None:
    value = headers.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DecodeError(f"header {key!r} is {value!r}, not a queue name")
    return value


def _optional_time(headers: Mapping[str, Any], key: str) -> float | None:
    value = headers.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DecodeError(f"header {key!r} is {value!r}, not a Unix time in milliseconds")
    return value / 1000


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a task has no return value.

    ``kind`` is one of ``"error"`` (the task raised), ``"timeout"`` (its own timeout),
    ``"not_found"`` (no such task), ``"decode"`` (malformed message), ``"dead_lettered"``
    or ``"cancelled"`` (`aioqueue.cancel`).
    """

    kind: str
    type_name: str
    message: str
    traceback: str = ""
    module: str = ""  # the exception type's module, for a Celery caller (not on our wire)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The one outcome of a task, sent to its caller's reply queue."""

    task_id: str
    task_name: str
    value: Any = None
    error: ErrorInfo | None = None
    items: int | None = None  # how many items a generator task streamed

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> bytes:
        payload: dict[str, Any] = {"task": self.task_name, "ok": self.error is None}
        if self.items is not None:
            payload["items"] = self.items
        if self.error is None:
            payload["value"] = self.value
            return dumps(payload)
        err = self.error
        payload["error"] = {
            "kind": err.kind,
            "type": err.type_name,
            "message": err.message,
            "traceback": err.traceback,
        }
        return dumps(payload)

    @classmethod
    def decode(cls, body: bytes, *, task_id: str, max_size: int) -> Outcome:
        payload = loads(body, max_size=max_size, what="reply")
        if not isinstance(payload, dict) or not isinstance(payload.get("ok"), bool):
            raise DecodeError('reply must be an object with a boolean "ok"')
        name = str(payload.get("task", ""))
        items = payload.get("items")
        items = items if isinstance(items, int) and not isinstance(items, bool) else None
        if payload["ok"]:
            return cls(task_id=task_id, task_name=name, value=payload.get("value"), items=items)
        err = payload.get("error")
        if not isinstance(err, dict):
            raise DecodeError('failed reply has no "error" object')
        info = ErrorInfo(
            kind=str(err.get("kind", "error")),
            type_name=str(err.get("type", "Exception")),
            message=str(err.get("message", "")),
            traceback=str(err.get("traceback", "")),
        )
        return cls(task_id=task_id, task_name=name, error=info, items=items)
