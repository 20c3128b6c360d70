"""Messages for the fuzz test (tests/test_fuzz.py): hypothesis strategies, and a raw publisher.

Each message starts as a well-formed task message (``fuzz.record(key, payload)``) with random
extra headers and properties, then is left valid or broken in one known way (`MUTATIONS`);
`KINDS` says which dead-letter reason each breakage must produce.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from unittest import mock

import aiormq
import orjson
from aiormq.abc import ChannelFrame
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import encode
from pamqp.header import ContentHeader

from aioqueue.message import CONTENT_TYPE, MAX_DEPTH, PROTOCOL_VERSION

TASK = "fuzz.record"
MAX_SIZE = 64 * 1024

# kind -> the dead-letter reason it must produce ("" = valid: it must run)
KINDS: dict[str, str] = {
    "valid": "",
    "no_message_id": "decode",
    "content_type": "decode",
    "protocol": "decode",
    "task_missing": "decode",
    "task_type": "decode",
    "attempt": "decode",
    "deadline_type": "decode",
    "scheduled_type": "decode",
    "body_not_json": "decode",
    "body_shape": "decode",
    "body_deep": "decode",
    "body_huge": "decode",
    "garbage": "decode",
    "task_unknown": "not_found",
    "deadline_past": "expired",
    "wrong_args": "failed",
}

# -- strategies ---------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
keys = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12).map(
    lambda k: f"h-{k}"
) | st.sampled_from(["traceparent", "tracestate", "baggage"])  # trace context of any shape
int64 = st.integers(-(2**63), 2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | int64 | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
# RabbitMQ cannot hold a NaN or an infinity in a header (Erlang floats have none): it closes
# the publisher's connection, so no worker can ever receive one.
amqp_scalars = (
    st.none()
    | st.booleans()
    | int64
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
    | st.binary(max_size=16).map(bytearray)
    | st.decimals(min_value=-1000, max_value=1000, places=2)
    | st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1))
)
amqp_values = st.recursive(
    amqp_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
headers = st.dictionaries(keys, amqp_values, max_size=4)
# (RabbitMQ refuses a publish whose reply_to is exactly amq.rabbitmq.reply-to unless the channel
# consumes it; the encoded per-channel form reaches workers)
reply_tos = st.sampled_from([None, None, "", "amq.rabbitmq.reply-to.g2dkABZyYWJiaXQ="]) | st.builds(
    lambda h: f"fuzz.nowhere.{h}", st.uuids().map(lambda u: u.hex[:8])
)


def _not_positive_int(v: Any) -> bool:
    return not (type(v) is int and v >= 1)


def _not_time(v: Any) -> bool:
    # `None` means "no deadline" (valid); ints and (finite) floats are valid times
    return v is not None and type(v) not in (int, float)


def _not_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return False


@dataclass
class Spec:
    """One drawn message, before it gets its id."""

    kind: str
    payload: Any
    as_kwargs: bool
    extra_headers: dict[str, Any]
    properties: dict[str, Any]
    optional: dict[str, Any]
    bad: Any = None


_CONDITIONS: dict[str, Any] = {
    "protocol": lambda v: not (type(v) is int and v == PROTOCOL_VERSION),
    "task_type": lambda v: not (isinstance(v, str) and v),
    "attempt": _not_positive_int,
    "deadline_type": _not_time,
    "scheduled_type": _not_time,
}
# the look-alikes a loose check (`==`, truthiness) would let through
_TRICKY = st.sampled_from([True, 1.0, Decimal(1), [], "1", 0, -1])
_BAD_BODY_SHAPES = (
    json_values.filter(lambda v: not isinstance(v, dict))
    | st.fixed_dictionaries({"args": st.lists(json_values, max_size=2)})
    | json_values.filter(lambda v: not isinstance(v, list)).map(lambda a: {"args": a, "kwargs": {}})
    | json_values.filter(lambda v: not isinstance(v, dict)).map(lambda k: {"args": [], "kwargs": k})
    | st.just({"args": [], "kwargs": {}, "extra": 1})
)
_BAD: dict[str, st.SearchStrategy[Any]] = {
    "content_type": st.none() | texts.filter(lambda t: t != CONTENT_TYPE),
    "no_message_id": st.sampled_from([None, ""]),
    "body_not_json": st.binary(max_size=64).filter(_not_json) | st.just(b'["\xff"]'),
    "body_shape": _BAD_BODY_SHAPES,
    "body_deep": st.integers(MAX_DEPTH + 1, 400),
    "body_huge": st.integers(MAX_SIZE + 1, 4 * MAX_SIZE),
    "garbage": st.binary(max_size=256),
    "task_unknown": texts.map(lambda t: f"fuzz.unknown.{t}"),
    "wrong_args": st.booleans(),
}


@st.composite
def bad_values(draw: st.DrawFn, kind: str) -> Any:
    """The value that breaks a message of ``kind`` (None for kinds that need none)."""
    condition = _CONDITIONS.get(kind)
    if condition is not None:
        return draw((amqp_values | _TRICKY).filter(condition))
    strategy = _BAD.get(kind)
    return None if strategy is None else draw(strategy)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["valid"] * 6 + list(KINDS)))
    optional: dict[str, Any] = {}
    if draw(st.booleans()):
        optional["aioqueue-attempt"] = draw(st.integers(1, 10))
    if draw(st.booleans()):
        optional["aioqueue-deadline"] = round((time.time() + 3600) * 1000)
    if draw(st.booleans()):
        optional["aioqueue-scheduled-at"] = draw(st.integers(0, 2**42))
    properties = {
        "correlation_id": draw(st.none() | texts),
        "reply_to": draw(reply_tos),
        "priority": draw(st.none() | st.integers(0, 9)),
        "app_id": draw(st.none() | texts),
        "message_type": draw(st.none() | texts),
        "content_encoding": draw(st.none() | st.sampled_from(["utf-8", "gzip", "identity"])),
        "timestamp": draw(st.none() | st.datetimes(min_value=datetime(1971, 1, 1))),
        "delivery_mode": draw(st.sampled_from([1, 2])),
    }
    return Spec(
        kind=kind,
        payload=draw(json_values),
        as_kwargs=draw(st.booleans()),
        extra_headers=draw(headers),
        properties=properties,
        optional=optional,
        bad=draw(bad_values(kind)),
    )


# -- building and publishing -------------------------------------------------------------


@dataclass
class Built:
    fid: str
    kind: str
    body: bytes
    properties: spec.Basic.Properties
    payload: Any = None


@dataclass
class _Parts:
    """A message while it is being built (and broken)."""

    fid: str
    headers: dict[str, Any]
    props: dict[str, Any]
    call: dict[str, Any]
    body: bytes | None = None


def _prop(key: str) -> Mutation:
    return lambda m, s: m.props.__setitem__(key, s.bad)


def _header(key: str) -> Mutation:
    return lambda m, s: m.headers.__setitem__(key, s.bad)


def _body(encode_bad: Callable[[Any, str], bytes]) -> Mutation:
    return lambda m, s: setattr(m, "body", encode_bad(s.bad, m.fid))


def _garbage(m: _Parts, s: Spec) -> None:
    m.headers = {**s.extra_headers, "fuzz-id": m.fid}
    m.props["content_type"] = s.properties["app_id"]
    m.body = s.bad


def _wrong_args(m: _Parts, s: Spec) -> None:
    m.call = {"args": [m.fid, 1, 2], "kwargs": {}} if s.bad else {**m.call, "kwargs": {"no": 1}}


def _expired(m: _Parts, s: Spec) -> None:
    m.headers["aioqueue-deadline"] = round((time.time() - 3600) * 1000)


Mutation = Callable[[_Parts, Spec], None]
MUTATIONS: dict[str, Mutation] = {
    "valid": lambda m, s: None,
    "no_message_id": _prop("message_id"),
    "content_type": _prop("content_type"),
    "protocol": _header("aioqueue-protocol"),
    "task_missing": lambda m, s: m.headers.pop("aioqueue-task"),
    "task_type": _header("aioqueue-task"),
    "attempt": _header("aioqueue-attempt"),
    "deadline_type": _header("aioqueue-deadline"),
    "scheduled_type": _header("aioqueue-scheduled-at"),
    "body_not_json": _body(lambda bad, fid: bad),
    "body_shape": _body(lambda bad, fid: orjson.dumps(bad)),
    "body_deep": _body(lambda n, fid: b'{"args":["%s",%s],"kwargs":{}}' % (fid.encode(), _deep(n))),
    "body_huge": _body(lambda n, fid: orjson.dumps({"args": [fid, "x" * n], "kwargs": {}})),
    "garbage": _garbage,
    "task_unknown": _header("aioqueue-task"),
    "deadline_past": _expired,
    "wrong_args": _wrong_args,
}


def build(s: Spec, fid: str) -> Built:
    """The message ``s`` describes, with ``fid`` as its id (and in its ``fuzz-id`` header)."""
    headers = {
        **s.extra_headers,
        "fuzz-id": fid,
        "aioqueue-task": TASK,
        "aioqueue-protocol": PROTOCOL_VERSION,
        **s.optional,
    }
    call: dict[str, Any] = (
        {"args": [], "kwargs": {"key": fid, "payload": s.payload}}
        if s.as_kwargs
        else {"args": [fid, s.payload], "kwargs": {}}
    )
    props = {**s.properties, "content_type": CONTENT_TYPE, "message_id": fid}
    parts = _Parts(fid, headers, props, call)
    MUTATIONS[s.kind](parts, s)
    body = orjson.dumps(parts.call) if parts.body is None else parts.body
    properties = spec.Basic.Properties(headers=parts.headers, **parts.props)
    return Built(fid, s.kind, body, properties, s.payload if s.kind == "valid" else None)


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


_encode_table_value = encode.encode_table_value


def _encode_like_java(value: Any) -> bytes:
    """pamqp writes every float as a 32-bit ``f``; Java and .NET clients write doubles (``d``)."""
    if isinstance(value, float):
        return b"d" + encode.double(value)
    return _encode_table_value(value)


def raw_publish(channel: aiormq.Channel, queue: str, message: Built) -> ChannelFrame:
    """The frames of a publish exactly as built (no default ``message_id`` added)."""
    body = message.body
    frames: list[Any] = [
        spec.Basic.Publish(exchange="", routing_key=queue),
        ContentHeader(properties=message.properties, body_size=len(body)),
        *channel._split_body(body),
    ]
    with mock.patch.object(encode, "encode_table_value", _encode_like_java):
        return ChannelFrame.marshall(channel_number=channel.number, frames=frames)
