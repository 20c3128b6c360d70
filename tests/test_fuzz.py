"""Random bodies, headers and properties thrown at a worker (hypothesis).

Each message starts as a well-formed task message (``fuzz.record(key, payload)``) with random
extra headers and properties, and is then either left valid or broken in one known way. It is
published raw — below aio-pika and aiormq, which would add a ``message_id`` — to a queue that
an in-process worker consumes. Then:

- a task runs exactly once for each valid message, with exactly the payload sent, and never
  for a broken one;
- every broken message is in ``Q.dlq`` exactly once, with the reason its breakage implies;
- the worker is still alive and a normal submit still returns its result.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from unittest import mock

import aio_pika
import aiormq
import orjson
import pytest
from aiormq.abc import ChannelFrame
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import encode
from pamqp.header import ContentHeader

from aioqueue import App, Settings
from aioqueue.message import CONTENT_TYPE, MAX_DEPTH, PROTOCOL_VERSION
from aioqueue.topology import dlq_name
from aioqueue.worker import Worker
from tests.conftest import running_worker, wait_until
from tests.rabbit import RabbitNode

TASK = "fuzz.record"
MAX_SIZE = 64 * 1024
BATCH = 10  # messages per example; 20 examples

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
)
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


def build(s: Spec, fid: str) -> Built:  # noqa: C901 - one branch per kind of breakage
    hdrs: dict[str, Any] = {
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
    props: dict[str, Any] = {**s.properties, "content_type": CONTENT_TYPE, "message_id": fid}
    body: bytes | None = None
    match s.kind:
        case "no_message_id":
            props["message_id"] = s.bad
        case "content_type":
            props["content_type"] = s.bad
        case "protocol":
            hdrs["aioqueue-protocol"] = s.bad
        case "task_missing":
            del hdrs["aioqueue-task"]
        case "task_type":
            hdrs["aioqueue-task"] = s.bad
        case "attempt":
            hdrs["aioqueue-attempt"] = s.bad
        case "deadline_type":
            hdrs["aioqueue-deadline"] = s.bad
        case "scheduled_type":
            hdrs["aioqueue-scheduled-at"] = s.bad
        case "body_not_json":
            body = s.bad
        case "body_shape":
            body = orjson.dumps(s.bad)
        case "body_deep":
            body = b'{"args":["%s",%s],"kwargs":{}}' % (fid.encode(), _deep(s.bad))
        case "body_huge":
            body = orjson.dumps({"args": [fid, "x" * s.bad], "kwargs": {}})
        case "garbage":
            hdrs = {**s.extra_headers, "fuzz-id": fid}
            props["content_type"] = s.properties["app_id"]
            body = s.bad
        case "task_unknown":
            hdrs["aioqueue-task"] = s.bad
        case "deadline_past":
            hdrs["aioqueue-deadline"] = round((time.time() - 3600) * 1000)
        case "wrong_args":
            call = {"args": [fid, 1, 2], "kwargs": {}} if s.bad else {**call, "kwargs": {"no": 1}}
    if body is None:
        body = orjson.dumps(call)
    payload = s.payload if s.kind == "valid" else None
    properties = spec.Basic.Properties(headers=hdrs, **props)
    return Built(fid, s.kind, body, properties, payload)


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


# -- the test -----------------------------------------------------------------------------


@dataclass
class Env:
    app: App
    worker: Worker
    raw: aiormq.Channel
    queue: str
    calls: list[tuple[str, Any]] = field(default_factory=list)


@pytest.fixture
async def env(rabbit: RabbitNode) -> AsyncIterator[Env]:
    queue = f"fuzz.{uuid.uuid4().hex[:8]}"
    app = App(
        "fuzz",
        broker_url=rabbit.url,
        default_queue=queue,
        settings=Settings(max_message_size=MAX_SIZE),
    )
    calls: list[tuple[str, Any]] = []

    @app.task(name=TASK)
    async def record(key: str, payload: Any = None) -> str:
        calls.append((key, payload))
        return key

    async with app, running_worker(app) as worker, await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        yield Env(app, worker, raw, queue, calls)


async def drain_dlq(env: Env) -> list[tuple[str, str]]:
    """(fuzz id, dead reason) of every message in the DLQ, which is left empty."""
    found = []
    while True:
        message = await env.raw.basic_get(dlq_name(env.queue), no_ack=True)
        if message.body is None or not isinstance(message.delivery, spec.Basic.GetOk):
            return found
        hdrs = message.header.properties.headers or {}
        found.append((str(hdrs.get("fuzz-id")), str(hdrs.get("aioqueue-dead-reason"))))


async def dlq_depth(env: Env) -> int:
    ok = await env.raw.queue_declare(dlq_name(env.queue), passive=True)
    return ok.message_count or 0


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
    ],
)
@given(batch=st.lists(specs(), min_size=BATCH, max_size=BATCH))
@pytest.mark.timeout(600)
async def test_random_messages_never_run_what_they_should_not_and_never_kill_the_worker(
    env: Env, batch: list[Spec]
) -> None:
    # Given a batch of messages, valid or broken in known ways
    tag = uuid.uuid4().hex[:6]
    messages = [build(s, f"{tag}-{i}") for i, s in enumerate(batch)]
    valid = {m.fid: m for m in messages if m.kind == "valid"}
    broken = {m.fid: m for m in messages if m.kind != "valid"}
    env.calls.clear()
    # When they are published raw to the worker's queue
    for message in messages:
        await env.raw.write_queue.put(raw_publish(env.raw, env.queue, message))
    await wait_until(
        lambda: _settled(env, len(valid), len(broken)),
        timeout=30,
        what=f"{len(valid)} runs and {len(broken)} dead letters",
    )
    # Then exactly the valid ones ran, once each, with their payload
    runs = Counter(key for key, _ in env.calls)
    assert runs == Counter(list(valid)), _explain(runs, messages)
    for key, payload in env.calls:
        assert payload == valid[key].payload
    # and every broken one is in the DLQ once, with the reason its breakage implies
    dead = await drain_dlq(env)
    assert Counter(fid for fid, _ in dead) == Counter(list(broken)), _explain(
        Counter(dead), messages
    )
    for fid, reason in dead:
        assert reason == KINDS[broken[fid].kind], (broken[fid].kind, reason)
    # and the worker lives on and still serves normal submits
    assert not env.worker._stop.is_set()
    handle = await env.app.submit(TASK, "probe", None)
    assert await handle.result(timeout=30) == "probe"


async def _settled(env: Env, runs: int, dead: int) -> bool:
    if len(env.calls) < runs or await dlq_depth(env) < dead:
        return False
    ok = await env.raw.queue_declare(env.queue, passive=True)
    return not ok.message_count and env.worker.statistics().in_hand == 0


def _explain(counts: Counter[Any], messages: list[Built]) -> str:
    kinds = {m.fid: m.kind for m in messages}
    return "\n".join(f"{k}: {kinds.get(str(k))} x{n}" for k, n in counts.items())


async def test_a_double_header_pamqp_cannot_write_back_still_reaches_the_dlq(env: Env) -> None:
    # Given a malformed message from a client that writes 64-bit floats (too big for 32 bits)
    spec_ = Spec("body_not_json", None, False, {"h-big": 1e300, "h-n": [2.5e-300]}, {}, {})
    message = build(spec_, f"{uuid.uuid4().hex[:6]}-double")
    message.body = b"not json"
    # When the worker dead-letters it (a copy with the same headers)
    await env.raw.write_queue.put(raw_publish(env.raw, env.queue, message))
    await wait_until(lambda: _settled(env, 0, 1), timeout=30, what="the dead letter")
    # Then it is in the DLQ once (the unwritable values as text), and nothing ran
    assert await drain_dlq(env) == [(message.fid, "decode")]
    assert env.calls == []
