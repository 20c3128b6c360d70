"""Frames pamqp cannot read never cut a consumer off (issue 13).

Messages are written byte by byte below pamqp's encoder (``tests/inbound_frames.py``) and
relayed by a real RabbitMQ. Without `aioqueue.rabbit.inbound.read_leniently`, each one closes the
worker's connection, comes back first after the reconnect, and stalls the queue for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import pamqp.exceptions
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from aiormq.connection import FrameReceiver
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.header import ContentHeader

from aioqueue import App
from aioqueue.message import H_TASK, H_UNDECODABLE
from aioqueue.rabbit.inbound import read_leniently, readable_content_header, readable_method
from aioqueue.topology import dlq_name
from aioqueue.worker import Worker
from tests.conftest import running_worker, wait_until
from tests.flood import flood
from tests.inbound_frames import (
    Props,
    broken_cases,
    entry,
    frame,
    header_payload,
    i_value,
    publish_frames,
    s_value,
    t_value,
    table,
    task_body,
    task_headers,
)
from tests.rabbit import RabbitNode

TASK = "inbound.record"

# -- the rewrite, frame by frame (no broker) ---------------------------------------------------


def unmarshal(frame_type: int, payload: bytes) -> Any:
    return pamqp.frame.unmarshal(frame(frame_type, 1, payload))[2]


def undecodable_of(payload: bytes) -> tuple[spec.Basic.Properties, dict[str, Any]]:
    fixed = readable_content_header(payload)
    assert fixed is not None, "a frame pamqp cannot read was passed on unchanged"
    header = unmarshal(2, fixed)
    assert isinstance(header, ContentHeader)
    headers = header.properties.headers or {}
    return header.properties, dict(headers[H_UNDECODABLE])


@pytest.mark.parametrize("case", list(broken_cases(TASK, "id-1")))
def test_each_broken_header_is_rewritten_into_one_pamqp_reads_keeping_the_raw_bytes(
    case: str,
) -> None:
    # Given a content header that pamqp refuses (as aiormq would)
    payload = header_payload(broken_cases(TASK, "id-1")[case], body_size=10)
    with pytest.raises((pamqp.exceptions.UnmarshalingException, ValueError, OverflowError)):
        unmarshal(2, payload)
    # When it is made readable
    properties, undecodable = undecodable_of(payload)
    # Then every readable part is kept and each unreadable one is there as its raw bytes
    assert undecodable, "nothing was marked undecodable"
    assert all(isinstance(raw, bytes | bytearray) and raw for raw in undecodable.values())
    assert properties.content_type == "application/json"
    if "header" in case:
        assert (properties.headers or {})[H_TASK] == TASK
    if case == "message_id not UTF-8":
        assert properties.message_id is None
        assert bytes(undecodable["message_id"]) == b"id-1\xff\xfe"
    else:
        assert properties.message_id == "id-1"
    if case == "timestamp 10**17":
        assert bytes(undecodable["timestamp"]) == struct.pack(">Q", 10**17)
    if case == "header name not UTF-8":
        assert bytes(undecodable["headers.x-\\xff\\xfe"]) == s_value("v")


def test_a_readable_header_passes_untouched_and_the_body_size_is_kept() -> None:
    payload = header_payload(Props(message_id=b"id", headers=task_headers(TASK)), body_size=7)
    assert readable_content_header(payload) is None
    fixed = readable_content_header(
        header_payload(Props(message_id=b"\xff", headers=task_headers(TASK)), body_size=7)
    )
    assert fixed is not None
    assert unmarshal(2, fixed).body_size == 7


def test_a_delivery_with_a_routing_key_that_is_not_utf8_gets_readable_text() -> None:
    deliver = spec.Basic.Deliver("ctag", 5, False, "ex", "key")
    good = pamqp.frame.marshal(deliver, 1)[7:-1]
    assert readable_method(good) is None
    bad = good.replace(b"\x03key", b"\x03k\xff\xfe")
    with pytest.raises(pamqp.exceptions.UnmarshalingException):
        unmarshal(1, bad)
    fixed = readable_method(bad)
    assert fixed is not None
    method = unmarshal(1, fixed)
    assert (method.delivery_tag, method.exchange, method.routing_key) == (5, "ex", "k\\xff\\xfe")


def _frames_with_bad_ones() -> bytes:
    bad = Props(message_id=b"m\xff", headers=task_headers(TASK, entry(b"t", t_value(10**17))))
    good = Props(message_id=b"m2", headers=task_headers(TASK))
    data = publish_frames(1, "q", bad, b"{}") + publish_frames(1, "q", good, b"{}")
    deliver = pamqp.frame.marshal(spec.Basic.Deliver("ctag", 1, False, "ex", "key"), 1)
    return data + deliver.replace(b"\x03key", b"\x03k\xff\xfe") + frame(8, 0, b"")


async def _read_frames(data: bytes, count: int) -> list[Any]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    receiver = FrameReceiver(reader)  # type: ignore[arg-type]
    return [(await receiver.get_frame())[2] for _ in range(count)]


async def test_aiormqs_own_frame_receiver_reads_bad_frames_in_a_lenient_context() -> None:
    # Guard of the hook: aiormq's reader calls pamqp.frame.unmarshal, which read_leniently
    # wraps. If an upgrade changes that, this fails here instead of connections closing.
    # Given a context set to read leniently (as our connections' reader tasks are)
    read_leniently()
    # When aiormq's own receiver reads publishes with unreadable properties, a delivery with
    # a routing key that is not UTF-8 and a heartbeat
    frames = await _read_frames(_frames_with_bad_ones(), 8)
    # Then it reads every frame, the unreadable parts moved aside
    kinds = [type(f).__name__ for f in frames]
    assert kinds == ["Publish", "ContentHeader", "ContentBody"] * 2 + ["Deliver", "Heartbeat"]
    assert set(frames[1].properties.headers[H_UNDECODABLE]) == {"message_id", "headers.t"}
    assert frames[4].properties.message_id == "m2"
    assert H_UNDECODABLE not in frames[4].properties.headers
    assert frames[6].routing_key == "k\\xff\\xfe"


def test_outside_a_lenient_context_pamqp_still_refuses_them() -> None:
    # Given read_leniently called in another context (it installs the wrapper process-wide)
    contextvars.copy_context().run(read_leniently)
    # When another aiormq connection of the process reads the same frames, then it gets
    # pamqp's error as before: only our connections read leniently
    with pytest.raises(aiormq.exceptions.InvalidFrameError):
        asyncio.run(_read_frames(_frames_with_bad_ones(), 8))


_value = st.one_of(
    st.binary(max_size=8).map(lambda raw: b"S" + struct.pack(">I", len(raw)) + raw),
    st.integers(0, 2**64 - 1).map(t_value),
    st.integers(-(2**63), 2**63 - 1).map(i_value),
    st.binary(min_size=1, max_size=12),  # anything at all, type octet included
)
_entries = st.lists(st.tuples(st.binary(max_size=6), _value), max_size=4).map(
    lambda pairs: table(*(entry(k, v) for k, v in pairs))
)
_props = st.builds(
    Props,
    content_type=st.none() | st.binary(max_size=20),
    headers=st.none() | _entries,
    delivery_mode=st.none() | st.integers(0, 255),
    correlation_id=st.none() | st.binary(max_size=20),
    reply_to=st.none() | st.binary(max_size=20),
    message_id=st.none() | st.binary(max_size=20),
    timestamp=st.none() | st.integers(0, 2**64 - 1),
)


@settings(max_examples=400, deadline=None, database=None)
@given(props=_props, cut=st.integers(0, 40), flip=st.binary(max_size=3))
def test_any_header_bytes_come_out_readable_or_untouched(
    props: Props, cut: int, flip: bytes
) -> None:
    # Given header bytes of any shape, also cut short or with bytes changed
    payload = header_payload(props, body_size=3)
    if flip:
        at = 14 + cut % max(1, len(payload) - 14)
        payload = payload[:at] + flip + payload[at + len(flip) :]
    # When the reader checks it: either pamqp reads it as it is, or it reads the rewrite
    fixed = readable_content_header(payload)
    header = unmarshal(2, payload if fixed is None else fixed)
    # Then the body size survives, and a rewrite says what could not be read
    assert header.body_size == 3
    if fixed is not None:
        assert H_UNDECODABLE in (header.properties.headers or {})


# -- through a real RabbitMQ, to a worker ------------------------------------------------------


@dataclass
class Env:
    app: App
    worker: Worker
    raw: aiormq.Channel
    queue: str
    runs: list[str] = field(default_factory=list)

    async def send(self, props: Props, body: bytes) -> None:
        payload = publish_frames(self.raw.number, self.queue, props, body)
        await self.raw.write_queue.put(ChannelFrame(payload=payload, should_close=False))

    def connection_id(self) -> int:
        connection = self.app.broker._connection  # type: ignore[attr-defined]
        return id(connection.transport.connection)


@pytest.fixture
async def env(rabbit: RabbitNode) -> AsyncIterator[Env]:
    queue = f"inbound.{uuid.uuid4().hex[:8]}"
    app = App("inbound", broker_url=rabbit.url, default_queue=queue)
    runs: list[str] = []

    @app.task(name=TASK)
    async def record(key: str) -> str:
        runs.append(key)
        return key

    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        async with app, running_worker(app) as worker:
            yield Env(app, worker, raw, queue, runs)
        await raw.queue_delete(dlq_name(queue))
        await raw.queue_delete(queue)


async def dead_letters(env: Env) -> list[spec.Basic.Properties]:
    found = []
    while True:
        message = await env.raw.basic_get(dlq_name(env.queue), no_ack=True)
        if not isinstance(message.delivery, spec.Basic.GetOk):
            return found
        found.append(message.header.properties)


async def dlq_depth(env: Env) -> int:
    ok = await env.raw.queue_declare(dlq_name(env.queue), passive=True)
    return ok.message_count or 0


async def test_each_unreadable_message_is_dead_lettered_once_and_the_queue_moves_on(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker, and each of issue 13's unreadable messages, each followed by a valid one
    before = env.connection_id()
    cases = broken_cases(TASK, "bad")
    for i, props in enumerate(cases.values()):
        await env.send(props, task_body(f"bad-{i}"))
        await env.send(
            Props(message_id=f"ok-{i}".encode(), headers=task_headers(TASK)), task_body(f"ok-{i}")
        )
    # When RabbitMQ delivers them
    await wait_until(
        lambda: _settled(env, runs=len(cases), dead=len(cases)),
        timeout=60,
        what="every valid message run and every unreadable one dead-lettered",
    )
    # Then every valid message ran once, no unreadable one ran, on the same connection
    assert Counter(env.runs) == Counter(f"ok-{i}" for i in range(len(cases)))
    assert env.connection_id() == before, "the worker's connection was closed and reopened"
    assert "InvalidFrameError" not in caplog.text
    # and each unreadable one is in the dead-letter queue once, with the reason `decode` and
    # its unreadable parts kept as bytes
    dead = await dead_letters(env)
    assert len(dead) == len(cases)
    for properties in dead:
        headers = properties.headers or {}
        assert headers["aioqueue-dead-reason"] == "decode"
        assert "cannot be read" in headers["aioqueue-dead-error"]
        assert headers[H_UNDECODABLE]
    # and the worker still serves an ordinary submit
    handle = await env.app.submit(TASK, "probe")
    assert await handle.result(timeout=30) == "probe"


async def _settled(env: Env, *, runs: int, dead: int) -> bool:
    return len(env.runs) >= runs and await dlq_depth(env) >= dead


_typed = st.one_of(  # well-formed values: RabbitMQ relays them, pamqp may still refuse them
    st.binary(max_size=8).map(lambda raw: b"S" + struct.pack(">I", len(raw)) + raw),
    st.integers(0, 2**64 - 1).map(t_value),
    st.integers(-(2**63), 2**63 - 1).map(i_value),
)
_bad_props = st.builds(
    Props,
    content_type=st.just(b"application/json"),
    headers=st.lists(st.tuples(st.binary(min_size=1, max_size=6), _typed), max_size=3).map(
        lambda pairs: task_headers(TASK, *(entry(k, v) for k, v in pairs))
    ),
    message_id=st.binary(min_size=1, max_size=16),
    reply_to=st.none() | st.binary(max_size=16),
    timestamp=st.none() | st.integers(0, 2**64 - 1),
)


@settings(
    max_examples=10,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# distinct ids: two copies of one id in hand at once are one task, run once by design (the
# copy waits for the run and is acked with it: test_consumer_timeout, test_reconnect)
@given(batch=st.lists(_bad_props, min_size=5, max_size=5, unique_by=lambda p: p.message_id))
@pytest.mark.timeout(600)
async def test_random_property_bytes_never_stall_the_worker(env: Env, batch: list[Props]) -> None:
    # Given messages whose properties hold random bytes (readable by chance, or not)
    env.runs.clear()
    await _drain(env)
    for props in batch:
        await env.send(props, task_body("random"))
    probe = f"probe-{uuid.uuid4().hex[:6]}"
    await env.send(Props(message_id=probe.encode(), headers=task_headers(TASK)), task_body(probe))
    # When they are delivered, then the valid message behind them is served
    await wait_until(lambda: probe in env.runs, timeout=60, what="the message behind them")
    # and every message is run or dead-lettered, and settled (a run's reply may still be on
    # its way when the run is counted: wait for the worker's hands to empty, not a moment)
    await wait_until(
        lambda: _all_settled(env, len(batch) + 1),
        timeout=60,
        what="every message run or dead-lettered, and settled",
    )


async def _all_settled(env: Env, total: int) -> bool:
    done = len(env.runs) + await dlq_depth(env) >= total
    return done and env.worker.statistics().in_hand == 0


async def _drain(env: Env) -> None:
    await env.raw.queue_purge(dlq_name(env.queue))


@pytest.mark.timeout(600)
async def test_a_sample_flood_of_foreign_messages_is_accounted_for_one_by_one(
    rabbit: RabbitNode,
) -> None:
    # Given 400 messages of `make fuzz`'s kinds, a fifth unreadable at the frame level
    # When they are thrown at a worker
    report = await flood(rabbit.url, 400, seed=13, timeout=120)
    # Then each ran once or was dead-lettered once, with the reason its breakage implies,
    # and the worker never lost its connection
    assert report.sent == 400
    assert report.clean, str(report)
    assert report.ran == report.expected[""]
    assert report.dead == Counter({k: v for k, v in report.expected.items() if k})


async def test_dlq_commands_read_unreadable_dead_letters_and_replay_only_readable_ones(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given, straight in a dead-letter queue, a message with unreadable properties and one
    # whose header holds a long string that is not UTF-8 (readable, but not writable by pamqp)
    from tests.test_admin import admin

    dlq = dlq_name(queue_name)
    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        await raw.queue_declare(dlq, durable=True)
        await raw.queue_declare(queue_name, durable=True)
        odd = entry(b"odd", b"S" + struct.pack(">I", 2) + b"\xff\xfe")
        unreadable = Props(message_id=b"bad-\xff", headers=task_headers(TASK, odd))
        readable = Props(message_id=b"ok-1", headers=task_headers(TASK, odd))
        for props in (unreadable, readable):
            payload = publish_frames(raw.number, dlq, props, task_body("x"))
            await raw.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        await wait_until(
            lambda: _depth(raw, dlq, 2), timeout=30, what="two messages in the dead-letter queue"
        )
        # When they are listed and shown, then both are there
        code, out = await admin(rabbit, queue_name, "list")
        assert code == 0, out
        assert "2 dead letter(s)" in out and "ok-1" in out
        code, out = await admin(rabbit, queue_name, "show", "ok-1")
        assert code == 0, out
        # When every one is replayed, then the readable one goes back to its queue and the
        # unreadable one stays, with a line saying why
        code, out = await admin(rabbit, queue_name, "replay", "--all")
        assert code == 0, out
        assert "not replayed: (no readable id)" in out and "replayed 1 message(s)" in out
        assert await _depth(raw, dlq, 1)
        assert await _depth(raw, queue_name, 1)
        await raw.queue_delete(dlq)
        await raw.queue_delete(queue_name)


async def _depth(raw: aiormq.Channel, queue: str, count: int) -> bool:
    ok = await raw.queue_declare(queue, passive=True)
    return ok.message_count == count


# -- through a real RabbitMQ, to a caller ------------------------------------------------------


@dataclass
class Caller:
    """A connected app waiting on a task held until `release`, and a raw channel to forge with."""

    app: App
    raw: aiormq.Channel
    handle: Any
    release: asyncio.Event

    @property
    def replies(self) -> Any:
        assert self.app._replies is not None
        return self.app._replies

    async def forge(self, props: Props, body: bytes) -> None:
        """A reply below pamqp's encoder, with this caller's task id, to its reply queue."""
        forged = Props(**{**props.__dict__, "correlation_id": self.handle.id.encode()})
        payload = publish_frames(self.raw.number, self.replies.queue, forged, body)
        await self.raw.write_queue.put(ChannelFrame(payload=payload, should_close=False))


@contextlib.asynccontextmanager
async def waiting_caller(rabbit: RabbitNode, queue: str) -> AsyncIterator[Caller]:
    app = App(f"inbound-caller-{uuid.uuid4().hex[:6]}", broker_url=rabbit.url, default_queue=queue)
    release = asyncio.Event()

    @app.task(name="inbound.held")
    async def held() -> str:
        await release.wait()
        return "real"

    async with await aio_pika.connect(rabbit.url) as conn, app, running_worker(app):
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        yield Caller(app, raw, await held.submit(), release)


async def test_an_unreadable_reply_never_cuts_the_caller_off_from_its_results(
    rabbit: RabbitNode, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a caller waiting for a task held until released
    async with waiting_caller(rabbit, queue_name) as caller:
        connection = caller.app.broker._connection  # type: ignore[attr-defined]
        before = id(connection.transport.connection)
        # When a forged success with unreadable properties arrives on its reply queue
        forged = Props(message_id=b"\xff\xfe", headers=table(entry(b"x-\xff", s_value("v"))))
        await caller.forge(forged, b'{"task": "inbound.held", "ok": true}')
        await wait_until(
            lambda: caller.replies.unreadable == 1, timeout=30, what="the forged reply"
        )
        # Then it is dropped, the connection stays up, and the real outcome resolves the handle
        assert not caller.handle.done()
        caller.release.set()
        assert await caller.handle.result(timeout=30) == "real"
        assert id(connection.transport.connection) == before
        assert "InvalidFrameError" not in caplog.text


async def test_an_unreadable_stream_item_is_skipped_and_the_real_items_arrive(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a generator task that streams once released
    app = App("inbound-stream", broker_url=rabbit.url, default_queue=queue_name)
    release = asyncio.Event()

    @app.task(name="inbound.items")
    async def items() -> AsyncIterator[int]:
        await release.wait()
        for i in range(3):
            yield i

    async with await aio_pika.connect(rabbit.url) as conn, app, running_worker(app):
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        handle = await items.submit()
        # When an unreadable item claiming to be the first lands on its stream queue first
        headers = table(entry(b"aioqueue-seq", i_value(1)), entry(b"t", t_value(10**17)))
        stream_queue = f"aioqueue.stream.{handle.id}"
        payload = publish_frames(raw.number, stream_queue, Props(headers=headers), b'"forged"')
        await raw.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        await wait_until(
            lambda: rabbit.queue_stats().get(stream_queue, {}).get("messages"),
            timeout=30,
            what="the forged item in the stream queue",
        )
        release.set()
        # Then the reader skips it and reads the real items, in order
        assert [item async for item in handle.stream()] == [0, 1, 2]
        assert await handle.result(timeout=30) == 3


async def test_an_unreadable_slot_record_is_ignored_and_the_scheduler_fires_on(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a schedule whose state queue holds a forged record with unreadable properties,
    # claiming a slot far ahead (a readable one would make the scheduler skip to it)
    from aioqueue.scheduler import FakeClock
    from aioqueue.scheduler.records import STATE_QUEUE_ARGS, state_queue_name
    from tests.schedules import START, slot
    from tests.test_scheduler_broker import asleep_until, drain, minutes, new_app, step

    app = new_app(rabbit, queue_name, every=60)
    state = state_queue_name(app.name, "tests.tick")
    forged = b'{"v": 1, "slot": "2099-01-01T00:00:00+00:00", "by": "forger"}'
    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        await raw.queue_declare(state, durable=True, arguments=STATE_QUEUE_ARGS)
        props = Props(message_id=b"\xff", headers=table(entry(b"t", t_value(10**17))))
        payload = publish_frames(raw.number, state, props, forged)
        await raw.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        await wait_until(lambda: _depth(raw, state, 1), timeout=30, what="the forged record")
    # When the scheduler leads, then it reads past the record and fires each slot
    clock = FakeClock(START)
    async with app, app.scheduler(clock=clock) as scheduler:
        await asleep_until(clock, slot(1))
        await step(clock, slot(1), slot(2))
        assert scheduler.statistics().fired == 1
    assert minutes(await drain(rabbit.url, queue_name)) == [1]


@settings(
    max_examples=8,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(_bad_props, min_size=3, max_size=3))
@pytest.mark.timeout(600)
async def test_random_property_bytes_on_a_reply_queue_never_steal_a_result(
    rabbit: RabbitNode, queue_name: str, batch: list[Props]
) -> None:
    # Given a caller waiting for a task held until released
    async with waiting_caller(rabbit, queue_name) as caller:
        # When forged replies with random property bytes (readable by chance, or not) and
        # a body that is no outcome arrive with the handle's task id
        for props in batch:
            await caller.forge(props, b'{"task": "inbound.held", "ok": "forged"}')
        await wait_until(
            lambda: caller.replies.unreadable == len(batch), timeout=30, what="every forgery"
        )
        # Then none resolved the handle, and the real outcome does
        assert not caller.handle.done()
        caller.release.set()
        assert await caller.handle.result(timeout=30) == "real"
