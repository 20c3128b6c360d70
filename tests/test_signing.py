"""Signed messages (issue 19): keys, the codec, and a signing worker and caller on RabbitMQ.

Messages that must be refused are published raw — on an aiormq channel, below aioqueue's
client — so the worker sees exactly what an attacker with publish rights could send.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from pamqp import commands as spec

from aioqueue import (
    App,
    Retry,
    RetryPolicy,
    SignatureError,
    SigningKeys,
    task_context,
)
from aioqueue.broker import Delivery
from aioqueue.cli.dlq import rabbit_of, replay_message
from aioqueue.events import EventReader
from aioqueue.message import Envelope, Outcome, reply_properties
from aioqueue.message.celery import CeleryFields, encode_reply, encode_task
from aioqueue.message.events import Event, batch_headers, encode_batch
from aioqueue.message.headers import H_DUE_AT, H_KEY_ID, H_SIGNATURE
from aioqueue.message.properties import task_message
from aioqueue.message.signing import sign, verify
from aioqueue.rabbit.admin import held_messages
from aioqueue.results import ReplyConsumer
from aioqueue.scheduler import FakeClock
from aioqueue.settings import Settings
from aioqueue.streams import Progress, Result
from aioqueue.topology import EVENTS_STREAM, dlq_name, work_queue_arguments
from aioqueue.worker.replay import SharedReplayGuard
from aioqueue.worker.signature import ReplayGuard
from tests.conftest import ROOT, WorkerProcess, running_worker, wait_until
from tests.rabbit import RabbitNode
from tests.schedules import START, slot
from tests.test_processes import alive, two_ready
from tests.test_scheduler_broker import asleep_until

K1 = b"1" * 32
K2 = b"2" * 40
OTHER = b"o" * 32
KEYS = {"k2": K2, "k1": K1}

# -- keys ---------------------------------------------------------------------------------


def test_keys_never_show_their_secrets() -> None:
    keys = SigningKeys({"k2": K2, "k1": K1})
    app = App("s", broker_url="memory://", signing_keys=keys)
    for text in (repr(keys), str(keys), repr(app)):
        assert "k2" in text
        assert K2.decode() not in text and K1.decode() not in text
    assert keys.signing_id == "k2" and keys.ids == ("k2", "k1")


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ({}, "at least one key"),
        ({"k1": b"s" * 31}, "too short"),
        ({"bad id": K1}, "key id"),
        ({"k:1": K1}, "key id"),
    ],
)
def test_bad_keys_are_refused_at_start_up(keys: dict[str, bytes], error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        App("s", broker_url="memory://", signing_keys=keys)
    assert "sssss" not in str(info.value)


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEYS", f"k2:{K2.hex()}, k1:{K1.hex()}")
    app = App("s", broker_url="memory://")
    assert app.signing is not None and app.signing.ids == ("k2", "k1")
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEYS", f"k2:{'ab' * 8}")  # 8 bytes
    with pytest.raises(ValueError, match="too short") as info:
        App("s", broker_url="memory://")
    assert "abab" not in str(info.value)
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEYS", "k2:zz" + "cd" * 40)
    with pytest.raises(ValueError, match="not hexadecimal") as info:
        App("s", broker_url="memory://")
    assert "cdcd" not in str(info.value)
    monkeypatch.delenv("AIOQUEUE_SIGNING_KEYS")
    assert App("s", broker_url="memory://").signing is None


# -- the codec ----------------------------------------------------------------------------


def _signed(keys: SigningKeys, *, due_at: float | None = None) -> tuple[bytes, Any]:
    envelope = Envelope(id=uuid.uuid4().hex, task="t.add", args=(1, 2), kwargs={})
    return task_message(envelope, keys, due_at=time.time() if due_at is None else due_at)


def test_a_signature_covers_body_properties_and_meaningful_headers() -> None:
    keys = SigningKeys(KEYS)
    body, props = _signed(keys)
    assert verify(props, body, keys).key_id == "k2"
    assert verify(props, body, SigningKeys({"k1": K1, "k2": K2})).key_id == "k2"  # any order
    # a header that carries no meaning may change (RabbitMQ's, a trace context)
    props.headers["x-death"] = [{"count": 1}]
    props.headers["traceparent"] = "00-abc-def-01"
    verify(props, body, keys)
    tampered: list[tuple[str, Any]] = [
        ("body", b'{"args":[1,3],"kwargs":{}}'),
        ("aioqueue-task", "t.delete_everything"),
        ("aioqueue-attempt", 2),
        ("aioqueue-deadline", 1),
        ("aioqueue-deliveries", 1),
        (H_DUE_AT, props.headers[H_DUE_AT] + 60_000),
        (H_KEY_ID, "k1"),
        ("reply_to", "aioqueue.reply.attacker"),
        ("message_id", "other"),
        ("correlation_id", "other"),
    ]
    for what, value in tampered:
        b, p = body, _copy(props)
        if what == "body":
            b = value
        elif what in ("reply_to", "message_id", "correlation_id"):
            setattr(p, what, value)
        else:
            p.headers[what] = value
        with pytest.raises(SignatureError):
            verify(p, b, keys)


def _copy(props: Any) -> Any:
    copy = spec.Basic.Properties(
        content_type=props.content_type,
        headers=dict(props.headers),
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
    )
    return copy


def test_unsigned_unknown_key_and_malformed_signatures_are_refused() -> None:
    keys = SigningKeys(KEYS)
    body, props = _signed(SigningKeys({"k9": OTHER}))
    with pytest.raises(SignatureError, match="unknown key id"):
        verify(props, body, keys)
    body, props = _signed(SigningKeys({"k2": OTHER}))  # the right id, the wrong secret
    with pytest.raises(SignatureError, match="bad signature"):
        verify(props, body, keys)
    body, props = _signed(keys)
    props.headers[H_SIGNATURE] = "not hex"
    with pytest.raises(SignatureError, match="bad signature"):
        verify(props, body, keys)
    props.headers[H_DUE_AT] = "soon"
    with pytest.raises(SignatureError, match="malformed"):
        verify(props, body, keys)
    with pytest.raises(SignatureError, match="not signed"):
        verify(spec.Basic.Properties(headers={}), body, keys)


def test_the_replay_guard_remembers_until_expiry_and_is_bounded() -> None:
    guard = ReplayGuard(max_entries=3)
    assert guard.add(b"a" * 32, expires_at=10, now=0)
    assert not guard.add(b"a" * 32, expires_at=10, now=5)
    assert guard.add(b"a" * 32, expires_at=20, now=11)  # expired: forgotten
    for key in (b"b", b"c", b"d"):
        assert guard.add(key * 32, expires_at=30, now=12)
    assert len(guard) == 3 and guard.evicted == 1  # the oldest went first


# -- against RabbitMQ ---------------------------------------------------------------------


@dataclass
class Env:
    app: App
    raw: aiormq.Channel
    queue: str
    calls: list[Any] = field(default_factory=list)

    async def publish(self, body: bytes, props: Any, queue: str | None = None) -> None:
        await self.raw.basic_publish(body, routing_key=queue or self.queue, properties=props)

    async def dead(self) -> list[tuple[str, str]]:
        """(message id, dead reason) of every message in the DLQ, which is left empty."""
        found = []
        while True:
            message = await self.raw.basic_get(dlq_name(self.queue), no_ack=True)
            if not isinstance(message.delivery, spec.Basic.GetOk):
                return found
            props = message.header.properties
            reason = (props.headers or {}).get("aioqueue-dead-reason")
            found.append((str(props.message_id), str(reason)))

    async def dlq_depth(self) -> int:
        ok = await self.raw.queue_declare(dlq_name(self.queue), passive=True)
        return ok.message_count or 0


def _app(rabbit: RabbitNode, queue: str, keys: Any = KEYS, **settings: Any) -> App:
    return App(
        "signing",
        broker_url=rabbit.url,
        default_queue=queue,
        signing_keys=keys,
        settings=Settings(**settings),
    )


def _register(app: App, calls: list[Any]) -> None:
    @app.task(name="s.record")
    async def record(key: str) -> str:
        calls.append(key)
        return key

    @app.task(name="s.flaky", retry=RetryPolicy(max_attempts=3))
    async def flaky(key: str) -> str:
        calls.append(key)
        if calls.count(key) == 1:
            raise Retry(delay=0.5)
        return key


@pytest.fixture
async def env(rabbit: RabbitNode) -> AsyncIterator[Env]:
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    app = _app(rabbit, queue, signature_window=60.0)
    calls: list[Any] = []
    _register(app, calls)
    async with app, running_worker(app), await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel()
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        yield Env(app, raw, queue, calls)


def _message(key: str, keys: SigningKeys | None, *, due_at: float | None = None) -> Any:
    envelope = Envelope(id=uuid.uuid4().hex, task="s.record", args=(key,), kwargs={})
    return task_message(envelope, keys, due_at=time.time() if due_at is None else due_at)


async def test_signed_submits_run_and_their_signed_replies_resolve(env: Env) -> None:
    handle = await env.app.submit("s.record", "hello")
    assert await handle.result(timeout=30) == "hello"
    # and a retry is signed anew (not a replay of attempt 1)
    handle = await env.app.submit("s.flaky", "again")
    assert await handle.result(timeout=30) == "again"
    assert env.calls == ["hello", "again", "again"]
    assert await env.dlq_depth() == 0


async def test_unsigned_forged_unknown_key_stale_and_replayed_messages_are_refused(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aioqueue")
    keys = SigningKeys(KEYS)
    # Given raw messages: unsigned, forged (body changed after signing), signed with a key
    # the worker does not have, a key id it has with another secret, stale, and a replay
    unsigned = _message("unsigned", None)
    forged_body, forged_props = _message("forged", keys)
    forged_body = forged_body.replace(b"forged", b"FORGED")
    unknown = _message("unknown", SigningKeys({"k9": OTHER}))
    rekeyed = _message("rekeyed", SigningKeys({"k2": OTHER}))
    stale = _message("stale", keys, due_at=time.time() - 61)
    original = _message("original", keys)
    cases = {
        "unsigned": unsigned,
        "forged": (forged_body, forged_props),
        "unknown": unknown,
        "rekeyed": rekeyed,
        "stale": stale,
    }
    # When they are published (the original twice: once, then its replay)
    for body, props in cases.values():
        await env.publish(body, props)
    await env.publish(*original)
    await wait_until(lambda: env.calls == ["original"], what="the original to run")
    await env.publish(*original)
    await wait_until(
        lambda: _depth_at_least(env, len(cases) + 1), what="the refused messages in the DLQ"
    )
    # Then only the original ran, once; everything else is dead-lettered as "signature"
    dead = await env.dead()
    ids = {props.message_id: name for name, (_, props) in cases.items()}
    ids[original[1].message_id] = "replay"
    assert sorted(ids[m] for m, _ in dead) == sorted([*cases, "replay"])
    assert {reason for _, reason in dead} == {"signature"}
    assert env.calls == ["original"]
    # and the worker still serves
    handle = await env.app.submit("s.record", "probe")
    assert await handle.result(timeout=30) == "probe"
    # and no secret is in any log line (as bytes, text or hex)
    assert "refused" in caplog.text or "signature" in caplog.text
    for secret in (K1, K2, OTHER):
        for form in (secret.decode(), secret.hex(), repr(secret)):
            assert form not in caplog.text


async def _depth_at_least(env: Env, n: int) -> bool:
    return await env.dlq_depth() >= n


async def test_a_stale_signed_message_s_caller_is_told_a_forged_one_s_is_not(
    env: Env, rabbit: RabbitNode
) -> None:
    keys = SigningKeys(KEYS)
    caller = _app(rabbit, env.queue)
    async with caller:
        replies = caller._replies
        assert replies is not None
        await replies.ensure_started()
        # Given a stale but authentic message whose caller waits
        envelope = Envelope(id=uuid.uuid4().hex, task="s.record", args=("late",), kwargs={})
        future, _ = replies.expect(envelope.id)
        envelope = Envelope(
            id=envelope.id, task="s.record", args=("late",), kwargs={}, reply_to=replies.queue
        )
        await env.publish(*task_message(envelope, keys, due_at=time.time() - 120))
        # Then the caller learns it was dead-lettered for its signature
        outcome = await future
        assert outcome.error is not None and "stale" in outcome.error.message
        # Given a forged message naming the same reply queue and another waiting id
        other = uuid.uuid4().hex
        forged_future, _ = replies.expect(other)
        envelope = Envelope(
            id=other, task="s.record", args=("x",), kwargs={}, reply_to=replies.queue
        )
        await env.publish(*task_message(envelope, SigningKeys({"k2": OTHER}), due_at=time.time()))
        await wait_until(lambda: _depth_at_least(env, 2), what="both dead letters")
        # Then the worker published no reply for it: the handle still waits
        assert not forged_future.done()
        replies.forget(other)
    assert env.calls == []


async def test_a_caller_with_keys_drops_unsigned_and_forged_replies(
    rabbit: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a caller with keys whose task waits in a queue no worker consumes
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    async with _app(rabbit, queue) as caller:
        handle = await caller.submit("s.record", "x")
        replies = caller._replies
        assert replies is not None
        ok = Outcome(handle.id, "s.record", value="forged")
        async with await aio_pika.connect(rabbit.url) as conn:
            raw = await (await conn.channel()).get_underlay_channel()
            # When an unsigned reply and one signed with a foreign key arrive
            unsigned = reply_properties(handle.id)
            await raw.basic_publish(ok.encode(), routing_key=replies.queue, properties=unsigned)
            forged = sign(
                reply_properties(handle.id), ok.encode(), SigningKeys({"k2": OTHER}), due_at=0
            )
            await raw.basic_publish(ok.encode(), routing_key=replies.queue, properties=forged)
            with caplog.at_level(logging.WARNING, logger="aioqueue.results"):
                await wait_until(lambda: replies.unreadable == 2, what="both replies dropped")
            # Then the handle was never resolved from them, and the log says why
            assert not handle.done()
            assert "not signed" in caplog.text and "bad signature" in caplog.text
            # and a properly signed reply resolves it
            real = Outcome(handle.id, "s.record", value="real")
            signed = sign(reply_properties(handle.id), real.encode(), SigningKeys(KEYS), due_at=0)
            await raw.basic_publish(real.encode(), routing_key=replies.queue, properties=signed)
            assert await handle.result(timeout=30) == "real"


async def test_rotation_with_overlapping_keys_refuses_nothing(rabbit: RabbitNode) -> None:
    # Given, mid-rotation, a producer and a worker still signing with the old key k1 and a
    # producer and a worker already signing with the new key k2, both accepting both
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    old, new = {"k1": K1, "k2": K2}, {"k2": K2, "k1": K1}
    calls: list[Any] = []
    old_worker, new_worker = _app(rabbit, queue, old), _app(rabbit, queue, new)
    _register(old_worker, calls)
    _register(new_worker, calls)
    async with (
        old_worker,
        new_worker,
        running_worker(old_worker, concurrency=2),
        running_worker(new_worker, concurrency=2),
        _app(rabbit, queue, old) as old_producer,
        _app(rabbit, queue, new) as new_producer,
    ):
        # When both producers submit
        handles = [
            await producer.submit("s.record", f"{i}")
            for i in range(20)
            for producer in (old_producer, new_producer)
        ]
        # Then every task ran and every reply (signed by either worker) was accepted
        assert [await h.result(timeout=30) for h in handles] == [
            f"{i}" for i in range(20) for _ in "ab"
        ]
    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel()
        dlq = await channel.declare_queue(dlq_name(queue), passive=True)
        assert dlq.declaration_result.message_count == 0


async def test_a_delayed_task_is_fresh_when_it_becomes_due(rabbit: RabbitNode) -> None:
    # Given a worker whose freshness window (2 s) is shorter than a task's delay (4 s)
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    calls: list[Any] = []
    app = _app(rabbit, queue, signature_window=2.0)
    _register(app, calls)
    async with app, running_worker(app):
        # When the delayed task comes out of the delay ladder
        handle = await app.submit_with_options("s.record", args=("later",), countdown=4.0)
        # Then it runs: its signature counts from when it is due, not from the submit
        assert await handle.result(timeout=60) == "later"


@pytest.mark.parametrize("accept", [False, True])
async def test_celery_messages_are_refused_unless_configured_otherwise(
    rabbit: RabbitNode, accept: bool
) -> None:
    # Given a signing worker, accepting unsigned Celery messages or not (the default)
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    calls: list[Any] = []
    app = _app(rabbit, queue, accept_unsigned_celery=accept)
    _register(app, calls)
    async with app, running_worker(app), await aio_pika.connect(rabbit.url) as conn:
        raw = await (await conn.channel()).get_underlay_channel()
        env = Env(app, raw, queue, calls)
        # When a Celery protocol-2 message (which cannot be signed) arrives
        envelope = Envelope(
            id=uuid.uuid4().hex, task="s.record", args=("c",), celery=CeleryFields()
        )
        body, props = encode_task(envelope, expiration=False)
        await raw.basic_publish(body, routing_key=queue, properties=props)
        # Then it runs only if the worker was told to accept it; else it is refused
        if accept:
            await wait_until(lambda: calls == ["c"], what="the Celery message to run")
        else:
            await wait_until(lambda: _depth_at_least(env, 1), what="the dead letter")
            assert await env.dead() == [(envelope.id, "signature")]
            assert calls == []


async def test_event_readers_with_keys_skip_unsigned_batches(rabbit: RabbitNode) -> None:
    vhost = f"sig-{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    try:
        url = f"{rabbit.url}{vhost}"
        app = App("signing", broker_url=url, default_queue="sig.events", signing_keys=KEYS)
        calls: list[Any] = []
        _register(app, calls)
        async with app, running_worker(app):
            # Given a forged batch in the stream (no signature) before a real task's events
            forged = [Event("task-succeeded", time.time(), "attacker:1", {"id": "forged"})]
            body = encode_batch(forged)
            props = spec.Basic.Properties(headers=batch_headers(1), delivery_mode=2)
            await app.broker.publish(EVENTS_STREAM, body, props)
            handle = await app.submit("s.record", "real")
            await handle.result(timeout=30)
            # When a reader with keys reads the stream from its start
            async with EventReader(app, since="first") as reader:
                seen = []
                while not any(
                    e.get("id") == handle.id and e.type == "task-succeeded" for e in seen
                ):
                    event = await reader.get(timeout=30)
                    assert event is not None, "the real task's events never came"
                    seen.append(event)
                # Then the forged batch was skipped and counted; the real events were read
                assert reader.unsigned >= 1
                assert not any(e.get("id") == "forged" for e in seen)
    finally:
        rabbit.delete_vhost(vhost)


async def test_replay_re_signs_only_authentic_dead_letters(env: Env) -> None:
    keys = SigningKeys(KEYS)
    # Given a stale (authentic) and an unsigned message, both dead-lettered as "signature"
    stale_body, stale_props = _message("stale-then-replayed", keys, due_at=time.time() - 120)
    await env.publish(stale_body, stale_props)
    await env.publish(*_message("never", None))
    await wait_until(lambda: _depth_at_least(env, 2), what="both dead letters")
    # When both are replayed with the app's keys
    broker = rabbit_of(env.app)
    async with held_messages(broker, dlq_name(env.queue), 10) as messages:
        assert messages is not None
        done = {
            m.message_id: await replay_message(broker, m, env.queue, env.app.signing)
            for m in messages
        }
    # Then the stale one is signed anew and runs; the unsigned one stays in the DLQ
    assert done[stale_props.message_id] is True and list(done.values()).count(False) == 1
    await wait_until(lambda: env.calls == ["stale-then-replayed"], what="the replayed task")
    assert [reason for _, reason in await env.dead()] == ["signature"]


async def test_a_redelivered_signed_message_is_recounted_and_runs_once(
    rabbit: RabbitNode,
) -> None:
    # Given a signed message that a consumer took and returned unsettled (redelivered)
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    calls: list[Any] = []
    app = _app(rabbit, queue)
    _register(app, calls)
    body, props = _message("redelivered", SigningKeys(KEYS))
    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel()
        await channel.declare_queue(queue, durable=True, arguments=work_queue_arguments("classic"))
        raw = await channel.get_underlay_channel()
        await raw.basic_publish(body, routing_key=queue, properties=props)
        taker = await conn.channel()
        got = await (await taker.get_underlay_channel()).basic_get(queue, no_ack=False)
        assert isinstance(got.delivery, spec.Basic.GetOk)
        await taker.close()  # back to the queue, redelivered
    # When a signing worker gets it (it re-publishes it with its count, signed anew)
    async with app, running_worker(app):
        await wait_until(lambda: calls == ["redelivered"], what="the task to run")
        env = Env(app, raw, queue, calls)
    # Then it ran once and nothing was refused
    async with await aio_pika.connect(rabbit.url) as conn:
        dlq = await (await conn.channel()).declare_queue(dlq_name(queue), passive=True)
        assert dlq.declaration_result.message_count == 0
    del env


async def test_progress_stream_items_and_results_are_signed_end_to_end(make_any_app: Any) -> None:
    # Given a signing app (on RabbitMQ and in memory) with progress and a generator task
    app: App = make_any_app(signing_keys=KEYS)

    @app.task(name="s.job")
    async def job(steps: int) -> str:
        for i in range(1, steps + 1):
            await task_context().progress(i)
        return "finished"

    @app.task(name="s.count")
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with app, running_worker(app):
        # When they run, Then the caller (who verifies everything) sees all of it
        handle = await job.submit(3)
        events = [event async for event in handle.events()]
        assert events == [Progress(1, 1), Progress(2, 2), Progress(3, 3), Result("finished")]
        stream = await count.submit(5)
        assert [item async for item in stream.stream()] == list(range(5))
        assert await stream.result(timeout=30) == 5
        replies = app._replies
        assert replies is not None and replies.unreadable == 0


async def test_scheduler_fires_are_signed(rabbit: RabbitNode) -> None:
    # Given a signing app with a periodic task, its worker and its scheduler
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    app = _app(rabbit, queue)
    seen: list[Any] = []

    @app.periodic(every=timedelta(minutes=1), name="s.tick")
    async def tick() -> None:
        seen.append(task_context().scheduled_at)

    clock = FakeClock(START)
    async with app, running_worker(app), app.scheduler(clock=clock):
        # When a slot fires
        await asleep_until(clock, slot(1))
        clock.set(slot(1, 3))
        # Then the signing worker runs it (it was signed, fresh)
        await wait_until(lambda: seen, what="the periodic run")
    assert seen == [slot(1)]


async def test_workers_sharing_a_replay_guard_refuse_a_replay_on_either(
    rabbit: RabbitNode,
) -> None:
    # Given two workers on one queue sharing one replay guard (as processes of one worker would)
    queue = f"sig.{uuid.uuid4().hex[:8]}"
    calls: list[Any] = []
    first, second = _app(rabbit, queue), _app(rabbit, queue)
    _register(first, calls)
    _register(second, calls)
    guard = ReplayGuard(1000)
    async with (
        first,
        second,
        running_worker(first, replay_guard=guard),
        running_worker(second, replay_guard=guard),
        await aio_pika.connect(rabbit.url) as conn,
    ):
        raw = await (await conn.channel()).get_underlay_channel()
        env = Env(first, raw, queue, calls)
        # When a message runs, then four copies of it arrive (round robin over both workers)
        original = _message("once", SigningKeys(KEYS))
        await env.publish(*original)
        await wait_until(lambda: calls == ["once"], what="the original to run")
        for _ in range(4):
            await env.publish(*original)
        await wait_until(lambda: _depth_at_least(env, 4), what="four refused copies")
        # Then neither worker ran a copy
        assert [reason for _, reason in await env.dead()] == ["signature"] * 4
        assert calls == ["once"]


def test_the_shared_replay_guard_is_one_table_for_every_process() -> None:
    # Given a table (as a supervisor makes it) and a second mapping of it (another process)
    guard = SharedReplayGuard.create(messages=8)  # 16 slots: one probe window
    other = SharedReplayGuard.attach(guard.spec)
    try:
        # Then what one accepts the other refuses, until it expires
        assert guard.add(b"a" * 32, expires_at=10, now=0)
        assert not other.add(b"a" * 32, expires_at=10, now=5)
        assert other.add(b"a" * 32, expires_at=20, now=11)
        # and a full window overwrites the entry that expires first (counted)
        for i in range(15):
            assert other.add(bytes([i + 1]) * 32, expires_at=100 + i, now=12)
        assert other.add(b"z" * 32, expires_at=200, now=12) and other.evicted == 1
        assert guard.add(b"a" * 32, expires_at=30, now=12)  # it was the one forgotten
    finally:
        other.close()
        guard.unlink()
    assert not os.path.exists(guard.path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux: /proc/self/fd")
def test_the_shared_replay_guard_has_no_name_to_leave_behind() -> None:
    # Given a table as a supervisor makes it
    guard = SharedReplayGuard.create(messages=8)
    try:
        # Then its file was unlinked at once: it lives only as long as a process holds it
        target = os.readlink(guard.path)
        assert target.endswith(" (deleted)"), target
        assert not os.path.exists(target.removesuffix(" (deleted)"))
        assert guard.held is not None and guard.path == f"/proc/self/fd/{guard.held}"
        # and a second mapping of it (as a child opens it) is still the same table
        other = SharedReplayGuard.attach(guard.spec)
        assert guard.add(b"a" * 32, expires_at=10, now=0)
        assert not other.add(b"a" * 32, expires_at=10, now=5)
        other.close()
    finally:
        guard.unlink()
    assert guard.held is None


def _replay_tables() -> set[str]:
    where = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return {name for name in os.listdir(where) if name.startswith("aioqueue.replay.")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux: /proc/self/fd")
async def test_a_killed_supervisor_leaves_no_replay_guard_behind(spawn_worker: Any) -> None:
    # Given a supervisor of two signing processes (sharing a replay guard), both ready
    before = _replay_tables()
    env = {"AIOQUEUE_SIGNING_KEYS": f"k2:{K2.hex()},k1:{K1.hex()}"}
    worker: WorkerProcess = spawn_worker("--processes", "2", env=env)
    await two_ready(worker)
    banner = next(line for line in worker.output().splitlines() if "(pids " in line)
    children = [int(pid) for pid in banner.split("(pids ")[1].split(")")[0].split(", ")]
    assert "replay guard: shared by this worker's processes" in worker.output()
    # When the supervisor is killed outright (no clean-up of its own can run)
    worker.proc.kill()
    worker.proc.wait(timeout=30)
    await wait_until(
        lambda: not any(alive(pid) for pid in children), timeout=60, what="the children to exit"
    )
    # Then no table is left in shared memory
    assert _replay_tables() <= before


async def test_the_processes_of_one_worker_share_its_replay_guard(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    # Given a supervisor of two signing processes, each running one task at a time
    keys = SigningKeys(KEYS)
    env = {"AIOQUEUE_SIGNING_KEYS": f"k2:{K2.hex()},k1:{K1.hex()}"}
    worker: WorkerProcess = spawn_worker("--processes", "2", "--concurrency", "1", env=env)
    await wait_until(
        lambda: worker.output().count(" ready\n") >= 2 or worker.proc.poll() is not None,
        timeout=60,
        what="both worker processes' banners",
    )
    assert worker.proc.poll() is None, worker.output()
    async with await aio_pika.connect(rabbit.url) as conn:
        raw = await (await conn.channel()).get_underlay_channel()
        app = App("c", broker_url=rabbit.url, default_queue=queue_name, signing_keys=KEYS)
        env_ = Env(app, raw, queue_name)
        # When a task runs in one process (held there) and copies of it arrive meanwhile
        envelope = Envelope(id=uuid.uuid4().hex, task="tests.gated", args=("g",), kwargs={})
        original = task_message(envelope, keys, due_at=time.time())
        await env_.publish(*original)
        started = tmp_path / "started-g"
        await wait_until(started.exists, what="the original to start")
        for _ in range(3):
            await env_.publish(*original)
        # Then the other process refuses every copy (the guard is shared), none starts
        await wait_until(lambda: _depth_at_least(env_, 3), what="three refused copies")
        (tmp_path / "release-g").touch()
        assert [reason for _, reason in await env_.dead()] == ["signature"] * 3
        assert len(started.read_text().splitlines()) == 1
        assert "replayed" in worker.output()
        assert "replay guard: shared by this worker's processes" in worker.output()
        assert K1.hex() not in worker.output() and K2.hex() not in worker.output()
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0
    assert "aioqueue.replay." not in " ".join(os.listdir("/dev/shm"))


async def test_a_caller_with_keys_still_reads_celery_workers_replies() -> None:
    # Given a signing caller's reply consumer waiting for a task a Celery worker runs
    class Acker:
        def ack(self, tag: int) -> None:
            pass

    class Broker:
        settings = Settings()

    replies = ReplyConsumer(Broker(), "c", signing=SigningKeys(KEYS))  # type: ignore[arg-type]
    future, _ = replies.expect("t1", celery_task="tasks.add")
    # When the Celery worker's (unsigned: Celery cannot sign) rpc:// reply arrives
    body, props = encode_reply(Outcome("t1", "tasks.add", value=5))
    props.correlation_id = "t1"
    delivery = Delivery(body, props, False, "q", 1, Acker())  # type: ignore[arg-type]
    replies._on_reply(delivery)
    # Then it resolves the handle; an unsigned aioqueue reply would not
    assert future.done() and future.result().value == 5
    plain, _ = replies.expect("t2")
    unsigned = Delivery(
        Outcome("t2", "x", value=1).encode(), reply_properties("t2"), False, "q", 2, Acker()
    )  # type: ignore[arg-type]
    replies._on_reply(unsigned)
    assert not plain.done() and replies.unreadable == 1


def test_a_worker_with_a_too_short_key_refuses_to_start(tmp_path: Path) -> None:
    # Given a worker command whose environment holds an 8-byte key
    env = {**os.environ, "AIOQUEUE_SIGNING_KEYS": "k1:0123456789abcdef"}
    env["AIOQUEUE_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:1/"  # never reached
    # When it starts, Then it exits at once, naming the key by its id, never its secret
    done = subprocess.run(
        [sys.executable, "-m", "aioqueue.worker", "tests.apps.basic:app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "signing key 'k1' is too short" in done.stderr
    assert "0123456789abcdef" not in done.stderr + done.stdout
