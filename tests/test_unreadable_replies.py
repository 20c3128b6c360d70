"""A reply or progress event the caller cannot read is dropped, never taken for the outcome.

Issue 13, the caller's side: a malformed message on a client's reply queue with the task id of
a waiting handle is logged, counted and dropped; the handle keeps waiting for the real outcome,
and real progress events are not hidden by an unreadable one. On RabbitMQ and in memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from pamqp import commands as spec

from aioqueue import App, task_context
from aioqueue.broker import Delivery
from aioqueue.errors import DecodeError
from aioqueue.message import CONTENT_TYPE, H_EVENT, H_SEQ, H_UNDECODABLE
from aioqueue.metrics import PrometheusObserver
from aioqueue.results import ReplyConsumer
from aioqueue.streams import EventSink, Progress, Result
from tests.conftest import running_worker, wait_until

PROGRESS = {H_EVENT: "progress", H_SEQ: 1}


async def forge(app: App, task_id: str, body: bytes, headers: dict[str, Any] | None) -> None:
    """Publish ``body`` to ``app``'s reply queue as if it answered ``task_id``."""
    replies = app._replies
    assert replies is not None
    properties = spec.Basic.Properties(
        content_type=CONTENT_TYPE, delivery_mode=2, correlation_id=task_id, headers=headers
    )
    await app.broker.publish(replies.queue, body, properties)


def reply_consumer(app: App) -> ReplyConsumer:
    assert app._replies is not None
    return app._replies


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, '"ok"'),
        (b'{"task": "r.gated", "ok": "yes", "value": 1}', None, '"ok"'),
        (b'{"task": "r.gated", "ok": false, "error": "boom"}', None, '"error"'),
        (b'{"task": "r.gated", "ok": false}', None, '"error"'),
        # properties the frame reader could not decode: whatever the body says, it is unreadable
        (
            b'{"task": "r.gated", "ok": true, "value": "forged"}',
            {H_UNDECODABLE: {"message_id": bytearray(b"\xff\xfe")}},
            "undecodable properties: message_id",
        ),
        (
            b'{"task": "r.gated", "ok": true, "value": "forged"}',
            {H_UNDECODABLE: {"reply_to": bytearray(b"\xff")}, **PROGRESS},
            "undecodable properties: reply_to",
        ),
    ],
    ids=[
        "not-json",
        "wrong-shape",
        "ok-not-bool",
        "error-not-object",
        "error-missing",
        "undecodable",
        "undecodable-progress",
    ],
)
async def test_an_unreadable_reply_is_dropped_and_the_handle_waits_for_the_real_one(
    make_any_app: Any,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    headers: dict[str, Any] | None,
    reason: str,
) -> None:
    # Given a task that runs until released, and metrics on the caller's app
    app: App = make_any_app()
    release = asyncio.Event()
    observer = PrometheusObserver()
    app.on_unreadable_reply.append(observer.unreadable_reply)

    @app.task(name="r.gated")
    async def gated() -> str:
        await release.wait()
        return "real"

    caplog.set_level(logging.WARNING, logger="aioqueue.results")
    async with app, running_worker(app):
        handle = await gated.submit()
        # When a reply it cannot read arrives with the handle's task id
        await forge(app, handle.id, body, headers)
        replies = reply_consumer(app)
        await wait_until(lambda: replies.unreadable or handle.done(), what="the forged reply read")
        # Then it is dropped, logged with the task id and the reason, and counted ...
        assert not handle.done()
        assert replies.pending == 1 and replies.dropped == 0
        assert observer.registry.get_sample_value("aioqueue_replies_unreadable_total") == 1
        lines = [r.getMessage() for r in caplog.records if r.name == "aioqueue.results"]
        assert len(lines) == 1 and handle.id in lines[0] and reason in lines[0], lines
        # ... and the real outcome, arriving later, resolves the handle
        release.set()
        assert await handle.result(timeout=30) == "real"
        assert [e async for e in handle.events()] == [Result("real")]  # no forged progress
    assert replies.unreadable == 1


async def test_an_unreadable_progress_event_hides_no_real_one(make_any_app: Any) -> None:
    # Given a task that reports progress 1-4 once released
    app: App = make_any_app()
    release = asyncio.Event()

    @app.task(name="r.steps")
    async def steps() -> str:
        await release.wait()
        for i in range(1, 5):
            await task_context().progress(i)
        return "done"

    async with app, running_worker(app):
        handle = await steps.submit()
        # When a progress event numbered 50 with an unreadable body arrives first (confirmed
        # in the reply queue before the task sends anything: the queue delivers it first)
        await forge(app, handle.id, b"{not json", {H_EVENT: "progress", H_SEQ: 50})
        replies = reply_consumer(app)
        release.set()
        # Then the real events 1-4 all reach the reader, and the forged one was counted
        events = [event async for event in handle.events()]
    assert events == [*(Progress(i, i) for i in range(1, 5)), Result("done")]
    assert replies.unreadable == 1


def event(seq: int, body: bytes) -> Delivery:
    properties = spec.Basic.Properties(headers={H_EVENT: "progress", H_SEQ: seq})
    return Delivery(body, properties, False, "q", seq, acker=None)  # type: ignore[arg-type]


def test_event_sink_counts_a_sequence_number_only_once_its_body_was_read() -> None:
    sink = EventSink(10)
    with pytest.raises(DecodeError):
        sink.push(event(50, b"{not json"), max_size=1000)
    with pytest.raises(DecodeError):
        sink.push(event(51, b"x" * 2000), max_size=1000)  # over the size limit
    assert sink.last_seq == 0 and not sink.events
    for seq in (1, 2, 2, 3):  # 2 repeated, as a redelivered run would
        sink.push(event(seq, str(seq).encode()), max_size=1000)
    assert list(sink.events) == [Progress(1, 1), Progress(2, 2), Progress(3, 3)]
    assert sink.last_seq == 3
