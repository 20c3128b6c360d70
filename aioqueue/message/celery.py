"""Celery's wire format (task message protocol 2, JSON), both ways, and its ``rpc://`` replies.

Read from Celery 5's own source, not its protocol page: ``celery/app/amqp.py`` (``as_task_v2``)
builds the message, ``celery/backends/rpc.py`` and ``base.py`` (``_get_result_meta``,
``prepare_exception``) the reply, ``kombu/utils/json.py`` the typed JSON values.

- A Celery task message has the header ``task`` (its name) and ``id``; the body is
  ``[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]``; ``eta`` and ``expires`` are
  ISO-8601 headers, ``retries`` counts earlier attempts, ``timelimit`` is ``[hard, soft]``.
- kombu's JSON wraps datetime, date, time, Decimal, UUID and bytes as
  ``{"__type__": ..., "__value__": ...}``: they are read back as those Python objects
  (`conform_arguments` then fits them to the task's annotations, or refuses them); that part
  lives in `aioqueue.message.kombu_json`.
- A reply goes to ``reply_to`` on the default exchange, ``correlation_id`` = the task id, with
  ``{"task_id", "status", "result", "traceback", "children", "date_done"}``; a failure's
  ``result`` is ``{"exc_type", "exc_message", "exc_module"}``.

Nothing but JSON is ever read: a pickled, YAML, msgpack or compressed message is refused with
the reason ``serializer``, and a canvas part aioqueue does not run (``chord``, ``link``,
``link_error``, ``chain``) with that part's name, before anything runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pamqp import commands as spec

from ..errors import DecodeError
from .codec import Envelope, ErrorInfo, Outcome, dumps, loads
from .kombu_json import aware, conform_arguments, typed

__all__ = [
    "CELERY_CONTENT_TYPE",
    "CeleryFields",
    "RefusedMessage",
    "conform_arguments",
    "decode_reply",
    "decode_task",
    "encode_reply",
    "encode_task",
    "is_celery",
]

CELERY_CONTENT_TYPE: Final = "application/json"
# the outcome of a task, as Celery's states say it; other states (PENDING, RECEIVED, STARTED,
# RETRY) are progress that a handle does not wait for
READY_STATES: Final = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
# the parts of a message's third body element, by the name their refusal gives
CANVAS: Final = (("chord", "chord"), ("callbacks", "link"), ("errbacks", "link_error"))
CANVAS_CHAIN: Final = ("chain", "chain")
# headers of RabbitMQ's and of aioqueue's own that a re-published Celery message must not keep
_NOT_CELERY: Final = ("x-", "aioqueue-")


class RefusedMessage(DecodeError):
    """A readable message that asks for what aioqueue never does: a serializer other than
    JSON (reason ``serializer``), a Celery canvas part (``chord``, ``link``, ``link_error``,
    ``chain``). It is dead-lettered with ``reason`` before anything runs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CeleryFields:
    """What a Celery message carries beyond an `Envelope`, kept so that a re-publish (a retry,
    a wait for its ``eta``) is still the same Celery message."""

    eta: float | None = None  # Unix time; the message waits in RabbitMQ until then
    time_limit: float | None = None  # seconds: the smaller of Celery's hard and soft limits
    root_id: str | None = None
    parent_id: str | None = None
    ignore_result: bool = False
    headers: Mapping[str, Any] = field(default_factory=dict)  # as received, Celery's only
    body: bytes | None = None  # as received: kombu-typed values survive a re-publish


def is_celery(headers: Mapping[str, Any] | None) -> bool:
    """Whether a delivery is a Celery protocol-2 task message (its ``task`` header)."""
    return bool(headers) and "task" in headers  # type: ignore[operator]


# -- Celery → aioqueue: reading a task message ------------------------------------------------


def decode_task(body: bytes, properties: spec.Basic.Properties, *, max_size: int) -> Envelope:
    """A Celery protocol-2 message as an `Envelope` (``envelope.celery`` holds the rest).

    Raises:
        RefusedMessage: not JSON (``serializer``), or a canvas part aioqueue does not run.
        DecodeError: anything malformed.
    """
    headers = properties.headers or {}
    _check_serializer(properties.content_type, properties.content_encoding, headers)
    name = headers.get("task")
    task_id = headers.get("id")
    if not isinstance(name, str) or not name:
        raise DecodeError(f"Celery header 'task' is {name!r}, not a task name")
    if not isinstance(task_id, str) or not task_id:
        raise DecodeError(f"Celery header 'id' is {task_id!r}, not a task id")
    retries = headers.get("retries") or 0
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise DecodeError(f"Celery header 'retries' is {retries!r}, not a count")
    payload = loads(body, max_size=max_size)
    if not isinstance(payload, list) or len(payload) not in (2, 3):
        raise DecodeError("a Celery body must be [args, kwargs, embed]")
    args, kwargs = payload[0], payload[1]
    embed = payload[2] if len(payload) == 3 else {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise DecodeError("a Celery body's args must be an array and its kwargs an object")
    if not isinstance(embed, dict | type(None)):
        raise DecodeError("a Celery body's third element must be an object")
    _refuse_canvas(embed or {})
    ignore_result = headers.get("ignore_result") is True
    reply_to = properties.reply_to or None
    return Envelope(
        id=task_id,
        task=name,
        args=tuple(typed(a, f"args[{i}]") for i, a in enumerate(args)),
        kwargs={k: typed(v, f"kwargs[{k!r}]") for k, v in kwargs.items()},
        reply_to=None if ignore_result else reply_to,
        attempt=retries + 1,
        deadline=_iso_time(headers, "expires"),
        celery=CeleryFields(
            eta=_iso_time(headers, "eta"),
            time_limit=_time_limit(headers.get("timelimit")),
            root_id=_optional_id(headers, "root_id"),
            parent_id=_optional_id(headers, "parent_id"),
            ignore_result=ignore_result,
            headers={k: v for k, v in headers.items() if not k.startswith(_NOT_CELERY)},
            body=body,
        ),
    )


def _check_serializer(
    content_type: str | None, content_encoding: str | None, headers: Mapping[str, Any]
) -> None:
    if content_type != CELERY_CONTENT_TYPE:
        raise RefusedMessage(
            "serializer",
            f"content_type {content_type!r}: only Celery's JSON serializer is accepted "
            "(task_serializer='json'); nothing is ever unpickled",
        )
    if content_encoding not in (None, "", "utf-8", "utf8"):
        raise RefusedMessage("serializer", f"content_encoding {content_encoding!r} is not utf-8")
    if headers.get("compression"):
        raise RefusedMessage(
            "serializer", f"compressed body ({headers['compression']!r}) is not accepted"
        )


def _refuse_canvas(embed: Mapping[str, Any]) -> None:
    for key, reason in (*CANVAS, CANVAS_CHAIN):
        if embed.get(key):
            raise RefusedMessage(
                reason,
                f"the message carries a Celery {reason} ({key}), which aioqueue does not run; "
                "the task was not started",
            )


def _iso_time(headers: Mapping[str, Any], key: str) -> float | None:
    value = headers.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(f"Celery header {key!r} is {value!r}, not an ISO-8601 time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise DecodeError(f"Celery header {key!r} is {value!r}, not an ISO-8601 time") from None
    return aware(moment).timestamp()


def _time_limit(value: Any) -> float | None:
    """Celery's ``timelimit`` is ``[hard, soft]`` (celery/worker/request.py unpacks it in that
    order); aioqueue has one timeout per run: the smaller of the two that are set."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise DecodeError(f"Celery header 'timelimit' is {value!r}, not [hard, soft]")
    limits = []
    for limit in value:
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, int | float):
            raise DecodeError(f"Celery header 'timelimit' is {value!r}, not [hard, soft]")
        if not math.isfinite(limit) or limit <= 0:
            raise DecodeError(f"Celery header 'timelimit' has {limit!r}, not a positive time")
        limits.append(float(limit))
    return min(limits) if limits else None


def _optional_id(headers: Mapping[str, Any], key: str) -> str | None:
    value = headers.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DecodeError(f"Celery header {key!r} is {value!r}, not a task id")
    return value


# -- aioqueue → Celery: writing a task message ------------------------------------------------


def encode_task(
    envelope: Envelope, *, expiration: bool, origin: str = "aioqueue"
) -> tuple[bytes, spec.Basic.Properties]:
    """The body and properties of ``envelope`` as a Celery protocol-2 JSON message.

    A message read from Celery (``envelope.celery.body`` set) keeps its body and its own
    headers; only ``retries``, ``eta`` and ``expires`` are written anew. ``expiration`` also
    sets the AMQP per-message TTL from ``expires``, as kombu does (never for a message that
    waits in the delay ladder: it would expire there).
    """
    fields = envelope.celery or CeleryFields()
    headers: dict[str, Any] = dict(fields.headers)
    new = fields.body is None
    if new:
        headers.update(
            lang="py",
            shadow=None,
            group=None,
            group_index=None,
            timelimit=[fields.time_limit, None],
            argsrepr=repr(tuple(envelope.args))[:1024],
            kwargsrepr=repr(dict(envelope.kwargs))[:1024],
            origin=origin,
            replaced_task_nesting=0,
            stamped_headers=None,  # Celery 5.3+ writes both (task stamping); older ones ignore
            stamps={},
        )
    headers.update(
        task=envelope.task,
        id=envelope.id,
        retries=envelope.attempt - 1,
        eta=_iso(fields.eta),
        expires=_iso(envelope.deadline),
        root_id=fields.root_id or headers.get("root_id") or envelope.id,
        parent_id=fields.parent_id,
        ignore_result=fields.ignore_result,
    )
    if envelope.trace:  # trace context travels as AMQP headers, as for our own messages
        headers.update(envelope.trace)
    if new:
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        body = dumps([list(envelope.args), dict(envelope.kwargs), embed])
    else:
        body = fields.body  # type: ignore[assignment]
    ttl = None
    if expiration and envelope.deadline is not None:
        remaining = envelope.deadline - datetime.now(UTC).timestamp()
        ttl = str(max(0, round(remaining * 1000)))
    properties = spec.Basic.Properties(
        content_type=CELERY_CONTENT_TYPE,
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=0,
        correlation_id=envelope.id,
        message_id=envelope.id,
        reply_to=envelope.reply_to or "",
        expiration=ttl,
    )
    return body, properties


def _iso(moment: float | None) -> str | None:
    return None if moment is None else datetime.fromtimestamp(moment, UTC).isoformat()


# -- replies in the rpc:// backend's format ---------------------------------------------------

# aioqueue's own failure kinds as the Celery exceptions a Celery caller knows
_CELERY_EXCEPTIONS: Final = {
    "not_found": "NotRegistered",
    "timeout": "TimeLimitExceeded",
}


def encode_reply(
    outcome: Outcome, *, parent_id: str | None = None
) -> tuple[bytes, spec.Basic.Properties]:
    """``outcome`` as the ``rpc://`` result backend's message for a Celery caller."""
    err = outcome.error
    if err is None:
        status, result, traceback = "SUCCESS", outcome.value, None
    elif err.kind == "dead_lettered" and err.type_name == "expired":
        status, traceback = "REVOKED", None
        result = _exception("TaskRevokedError", ["expired"], "celery.exceptions")
    elif err.kind == "cancelled":  # aioqueue's cancel is Celery's revoke
        status, traceback = "REVOKED", None
        result = _exception("TaskRevokedError", ["cancelled"], "celery.exceptions")
    else:
        status, traceback = "FAILURE", err.traceback or None
        celery_type = _CELERY_EXCEPTIONS.get(err.kind)
        if celery_type is not None:
            result = _exception(celery_type, [err.message], "celery.exceptions")
        else:
            # Celery sends the exception's args; a str of it is the one thing every kind of
            # outcome has, and rebuilds the same exception for the common one-argument case
            result = _exception(err.type_name, [err.message], err.module or None)
    meta: dict[str, Any] = {
        "task_id": outcome.task_id,
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": datetime.now(UTC).isoformat(),
    }
    if parent_id:
        meta["parent_id"] = parent_id
    properties = spec.Basic.Properties(
        content_type=CELERY_CONTENT_TYPE,
        content_encoding="utf-8",
        delivery_mode=2,
        correlation_id=outcome.task_id,
    )
    return dumps(meta), properties


def _exception(exc_type: str, message: list[str], module: str | None) -> dict[str, Any]:
    return {"exc_type": exc_type, "exc_message": message, "exc_module": module}


def decode_reply(
    body: bytes, *, task_id: str, task_name: str, content_type: str | None, max_size: int
) -> Outcome | None:
    """A Celery worker's ``rpc://`` reply as an `Outcome`, or None for a state that is not an
    outcome yet (STARTED, RETRY, ...).

    Raises:
        DecodeError: not JSON, or not a result message.
    """
    if content_type != CELERY_CONTENT_TYPE:
        raise DecodeError(
            f"reply content_type {content_type!r}: set the Celery app's result_serializer to "
            "'json'; nothing is ever unpickled"
        )
    meta = loads(body, max_size=max_size, what="reply")
    if not isinstance(meta, dict) or not isinstance(meta.get("status"), str):
        raise DecodeError('a Celery reply must be an object with a "status"')
    status = meta["status"]
    if status not in READY_STATES:
        return None
    result = typed(meta.get("result"), "result")
    if status == "SUCCESS":
        return Outcome(task_id=task_id, task_name=task_name, value=result)
    if not isinstance(result, dict) or not isinstance(result.get("exc_type"), str):
        raise DecodeError(f"a Celery {status} reply has no exception in its result")
    exc_type = result["exc_type"]
    message = _exception_message(result.get("exc_message"))
    kind = "timeout" if exc_type in ("TimeLimitExceeded", "SoftTimeLimitExceeded") else "error"
    traceback = meta.get("traceback")
    error = ErrorInfo(
        kind=kind,
        type_name=exc_type,
        message=message,
        traceback=traceback if isinstance(traceback, str) else "",
        module=str(result.get("exc_module") or ""),
    )
    return Outcome(task_id=task_id, task_name=task_name, error=error)


def _exception_message(value: Any) -> str:
    if isinstance(value, list | tuple):
        return (
            value[0]
            if len(value) == 1 and isinstance(value[0], str)
            else ", ".join(map(repr, value))
        )
    return "" if value is None else str(value)
