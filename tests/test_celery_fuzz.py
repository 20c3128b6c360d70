"""Celery-shaped messages, valid and broken, thrown at a worker (hypothesis), below any client.

Each message is a Celery protocol-2 task message (``task`` and ``id`` headers, body
``[args, kwargs, embed]``) with random Celery headers, extra headers and properties, left valid
or broken in one known way (`KINDS`). Published raw to a queue an in-process worker consumes:

- each valid message runs exactly once, with exactly the payload sent; no broken one runs;
- each broken one is in ``Q.dlq`` exactly once, with the reason its breakage implies;
- the worker lives on and still serves a normal submit.

The decoder alone also gets arbitrary bytes and header tables: it returns an envelope or raises
`DecodeError`, nothing else.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec

from aioqueue.errors import DecodeError
from aioqueue.message.celery import conform_arguments, decode_reply, decode_task
from aioqueue.topology import dlq_name
from tests.conftest import wait_until
from tests.fuzz_messages import (
    MAX_SIZE,
    TASK,
    Built,
    amqp_values,
    headers,
    json_values,
    raw_publish,
    reply_tos,
    texts,
)
from tests.rabbit import RabbitNode
from tests.test_fuzz import Env, drain_dlq, fuzz_env

BATCH = 10

# kind -> the dead-letter reason it must produce ("" = valid: it must run)
KINDS: dict[str, str] = {
    "valid": "",
    "serializer": "serializer",
    "compressed": "serializer",
    "id": "decode",
    "retries": "decode",
    "eta": "decode",
    "expires": "decode",
    "timelimit": "decode",
    "body_shape": "decode",
    "body_garbage": "decode",
    "kombu_unknown": "decode",
    "link": "link",
    "link_error": "link_error",
    "chain": "chain",
    "chord": "chord",
    "unknown": "not_found",
    "expired": "expired",
}

_BAD: dict[str, st.SearchStrategy[Any]] = {
    "serializer": st.sampled_from(
        [
            ("content_type", "application/x-python-serialize"),
            ("content_type", "application/x-yaml"),
            ("content_type", "application/x-msgpack"),
            ("content_type", None),
            ("content_encoding", "binary"),
        ]
    )
    | texts.filter(lambda t: t != "application/json").map(lambda t: ("content_type", t)),
    "compressed": st.sampled_from(["application/x-gzip", "zlib", "bzip2"]),
    "id": st.sampled_from([None, "", 5, True, 1.5, [1]]),
    "retries": st.sampled_from([-1, "1", 1.5, True, [1], {"a": 1}]),
    "eta": st.sampled_from(["tomorrow", "", 5, 1.5, True, [1], "2026-13-45T00:00:00"]),
    "expires": st.sampled_from(["soon", "", 5, True, [2026]]),
    "timelimit": st.sampled_from([5, "x", [1], [1, 2, 3], ["a", None], [-1, None], [True, None]]),
    "body_shape": st.sampled_from(
        [{}, [], [1, 2, 3], [[], [], [], []], [{}, {}], [[], 5], [[], {}, 5], "x", None]
    ),
    "body_garbage": st.binary(max_size=64).filter(lambda b: not _is_json(b)),
    "kombu_unknown": st.sampled_from(["pickle", "object", "", "datetime"]),
}


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


@dataclass
class Spec:
    kind: str
    payload: Any
    as_kwargs: bool
    celery: dict[str, Any]
    extra_headers: dict[str, Any]
    reply_to: str | None
    bad: Any


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["valid"] * 6 + list(KINDS)))
    later = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    earlier = datetime.fromtimestamp(time.time() - 3600, UTC).isoformat()
    celery = {
        "lang": "py",
        "retries": draw(st.integers(0, 3)),
        "eta": draw(st.sampled_from([None, earlier])),
        "expires": draw(st.sampled_from([None, later])),
        "timelimit": draw(st.sampled_from([None, [None, None], [60, None], [None, 60.5]])),
        "root_id": draw(st.none() | texts),
        "parent_id": draw(st.none() | texts),
        "group": draw(st.none() | texts),
        "ignore_result": draw(st.booleans()),
        "argsrepr": draw(texts),
        "origin": draw(texts),
    }
    strategy = _BAD.get(kind)
    return Spec(
        kind=kind,
        payload=draw(json_values),
        as_kwargs=draw(st.booleans()),
        celery=celery,
        extra_headers=draw(headers),
        reply_to=draw(reply_tos),
        bad=None if strategy is None else draw(strategy),
    )


@dataclass
class _Parts:
    """A message while it is being built (and broken)."""

    fid: str
    hdrs: dict[str, Any]
    props: dict[str, Any]
    args: Any
    kwargs: Any
    embed: dict[str, Any]
    body: bytes | None = None


_SIGNATURE = {"task": "fuzz.other", "args": [], "kwargs": {}, "options": {}}


def _drop_or_set_id(m: _Parts, bad: Any) -> None:
    if bad is None:
        del m.hdrs["id"]
    else:
        m.hdrs["id"] = bad


def _kombu_unknown(m: _Parts, bad: Any) -> None:
    m.args, m.kwargs = [m.fid, {"__type__": bad, "__value__": [1, 2]}], {}


def _header(key: str) -> Any:
    return lambda m, bad: m.hdrs.__setitem__(key, bad)


def _embed(key: str, value: Any) -> Any:
    return lambda m, bad: m.embed.__setitem__(key, value)


MUTATIONS: dict[str, Any] = {
    "valid": lambda m, bad: None,
    "serializer": lambda m, bad: m.props.__setitem__(bad[0], bad[1]),
    "compressed": _header("compression"),
    "id": _drop_or_set_id,
    "retries": _header("retries"),
    "eta": _header("eta"),
    "expires": _header("expires"),
    "timelimit": _header("timelimit"),
    "body_shape": lambda m, bad: setattr(m, "body", orjson.dumps(bad)),
    "body_garbage": lambda m, bad: setattr(m, "body", bad),
    "kombu_unknown": _kombu_unknown,
    "link": _embed("callbacks", [_SIGNATURE]),
    "link_error": _embed("errbacks", [_SIGNATURE]),
    "chain": _embed("chain", [_SIGNATURE]),
    "chord": _embed("chord", _SIGNATURE),
    "unknown": lambda m, bad: m.hdrs.__setitem__("task", f"fuzz.unknown.{m.fid}"),
    "expired": lambda m, bad: m.hdrs.__setitem__(
        "expires", datetime.fromtimestamp(time.time() - 60, UTC).isoformat()
    ),
}


def build(s: Spec, fid: str) -> Built:
    """The message ``s`` describes, with ``fid`` as its task id and ``fuzz-id`` header."""
    m = _Parts(
        fid=fid,
        hdrs={**s.extra_headers, **s.celery, "task": TASK, "id": fid, "fuzz-id": fid},
        props={
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "correlation_id": fid,
            "reply_to": s.reply_to,
            "delivery_mode": 2,
        },
        args=[] if s.as_kwargs else [fid, s.payload],
        kwargs={"key": fid, "payload": s.payload} if s.as_kwargs else {},
        embed={"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    )
    MUTATIONS[s.kind](m, s.bad)
    body = orjson.dumps([m.args, m.kwargs, m.embed]) if m.body is None else m.body
    properties = spec.Basic.Properties(headers=m.hdrs, **m.props)
    return Built(fid, s.kind, body, properties, s.payload if s.kind == "valid" else None)


# -- against a worker ---------------------------------------------------------------------


@pytest.fixture
async def env(rabbit: RabbitNode) -> AsyncIterator[Env]:
    async with fuzz_env(rabbit, "celery-fuzz") as env:
        yield env


async def _settled(env: Env, runs: int, dead: int) -> bool:
    ok = await env.raw.queue_declare(dlq_name(env.queue), passive=True)
    if len(env.calls) < runs or (ok.message_count or 0) < dead:
        return False
    ok = await env.raw.queue_declare(env.queue, passive=True)
    return not ok.message_count and env.worker.statistics().in_hand == 0


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(specs(), min_size=BATCH, max_size=BATCH))
@pytest.mark.timeout(600)
async def test_random_celery_messages_run_or_are_dead_lettered_with_their_reason(
    env: Env, batch: list[Spec]
) -> None:
    tag = uuid.uuid4().hex[:6]
    messages = [build(s, f"{tag}-{i}") for i, s in enumerate(batch)]
    valid = {m.fid: m for m in messages if m.kind == "valid"}
    broken = {m.fid: m for m in messages if m.kind != "valid"}
    env.calls.clear()
    for message in messages:
        await env.raw.write_queue.put(raw_publish(env.raw, env.queue, message))
    await wait_until(
        lambda: _settled(env, len(valid), len(broken)),
        timeout=30,
        what=f"{len(valid)} runs and {len(broken)} dead letters",
    )
    assert Counter(key for key, _ in env.calls) == Counter(list(valid))
    for key, payload in env.calls:
        assert payload == valid[key].payload
    dead = await drain_dlq(env)
    assert Counter(fid for fid, _ in dead) == Counter(list(broken))
    for fid, reason in dead:
        assert reason == KINDS[broken[fid].kind], (broken[fid].kind, reason)
    assert not env.worker._stop.is_set()
    handle = await env.app.submit(TASK, "probe", None)
    assert await handle.result(timeout=30) == "probe"


# -- the decoders alone -------------------------------------------------------------------

content_types = st.sampled_from(["application/json", "application/x-python-serialize"]) | texts
celery_headers = st.fixed_dictionaries(
    {"task": amqp_values | st.just(TASK)},
    optional={
        "id": amqp_values | texts,
        "retries": amqp_values,
        "eta": amqp_values | st.datetimes().map(str),
        "expires": amqp_values,
        "timelimit": amqp_values,
        "root_id": amqp_values,
        "parent_id": amqp_values,
        "ignore_result": amqp_values,
        "compression": amqp_values,
    },
)
bodies = st.binary(max_size=128) | json_values.map(orjson.dumps)


@settings(max_examples=400, deadline=None, database=None)
@given(body=bodies, hdrs=celery_headers, content_type=content_types)
def test_decode_task_returns_an_envelope_or_raises_decode_error(
    body: bytes, hdrs: dict[str, Any], content_type: str
) -> None:
    properties = spec.Basic.Properties(
        headers=hdrs, content_type=content_type, content_encoding="utf-8"
    )
    try:
        envelope = decode_task(body, properties, max_size=MAX_SIZE)
    except DecodeError:
        return
    assert envelope.task == hdrs["task"] and envelope.attempt >= 1

    def task(*args: Any, **kwargs: Any) -> None: ...

    try:
        conform_arguments(task, envelope.args, envelope.kwargs)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None, database=None)
@given(body=bodies, content_type=content_types)
def test_decode_reply_returns_an_outcome_or_none_or_raises_decode_error(
    body: bytes, content_type: str
) -> None:
    try:
        decode_reply(body, task_id="t", task_name="n", content_type=content_type, max_size=MAX_SIZE)
    except DecodeError:
        pass
