"""docs/protocol.md, followed to the letter by a producer that knows only AMQP.

The producer side (`Producer`, `declare_ladder`) is plain aio-pika, json and the standard
library — no aioqueue import, no aioqueue constant — built from what the document says. The
worker side is an ordinary aioqueue worker. Every header and property name this producer uses
is checked to be in the document.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from aioqueue import App, task_context
from tests.conftest import ROOT, running_worker, wait_until
from tests.rabbit import RabbitNode

DOC = (ROOT / "docs" / "protocol.md").read_text()

# -- the producer: only what docs/protocol.md says ----------------------------------------------

HEADERS_USED = (
    "aioqueue-protocol",
    "aioqueue-task",
    "aioqueue-attempt",
    "aioqueue-deadline",
    "aioqueue-stream-to",
    "aioqueue-event",
    "aioqueue-seq",
    "aioqueue-dead-reason",
    "aioqueue-dead-error",
    "aioqueue-dead-at",
    "aioqueue-dead-queue",
    "aioqueue-dead-worker",
    "aioqueue-dead-traceback",
    "x-queue-type",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-strategy",
    "x-overflow",
    "x-expires",
    "aioqueue.delay.deliver",
)


class Producer:
    """Submits tasks to ``queue`` and collects what comes back on its own reply queue."""

    def __init__(self, channel: AbstractChannel, queue: str, queue_type: str) -> None:
        self.channel = channel
        self.queue = queue
        self.queue_type = queue_type
        self.reply_queue = f"{queue}.replies"
        self.inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def declare(self) -> None:
        """§1: the work queue as the workers declare it; §4: a durable reply queue."""
        await self.channel.declare_queue(
            self.queue, durable=True, arguments={"x-queue-type": self.queue_type}
        )
        replies = await self.channel.declare_queue(
            self.reply_queue, durable=True, arguments={"x-expires": 600_000}
        )
        await replies.consume(self.inbox.put)

    def message(
        self,
        task: str,
        args: list[Any] | None = None,
        *,
        reply: bool = True,
        persistent: bool = True,
        headers: dict[str, Any] | None = None,
        body: bytes | None = None,
        correlation_id: str | None = None,
    ) -> tuple[str, aio_pika.Message]:
        """§2: a task message; returns (task id, message)."""
        task_id = uuid.uuid4().hex
        mode = (
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        )
        return task_id, aio_pika.Message(
            json.dumps({"args": args or [], "kwargs": {}}).encode() if body is None else body,
            content_type="application/json",
            delivery_mode=mode,
            message_id=task_id,
            correlation_id=correlation_id or task_id,
            reply_to=self.reply_queue if reply else None,
            timestamp=datetime.now(UTC),
            headers={
                "aioqueue-protocol": 1,
                "aioqueue-task": task,
                "aioqueue-attempt": 1,
                **(headers or {}),
            },
        )

    async def submit(self, task: str, args: list[Any] | None = None, **options: Any) -> str:
        """§2: publish to the default exchange, mandatory, confirmed."""
        task_id, message = self.message(task, args, **options)
        await self.channel.default_exchange.publish(message, self.queue, mandatory=True)
        return task_id

    async def submit_in(self, seconds: float, task: str, args: list[Any]) -> str:
        """§3: the same message, through the delay ladder."""
        units = math.ceil(seconds / 0.1)
        bits = ".".join("1" if units >> level & 1 else "0" for level in range(24, -1, -1))
        exchange = await self.channel.get_exchange(f"aioqueue.delay.{self.queue_type}.24")
        task_id, message = self.message(task, args)
        await exchange.publish(message, f"{bits}.{self.queue}", mandatory=True)
        return task_id

    async def next_message(self, timeout: float = 60) -> AbstractIncomingMessage:
        message = await asyncio.wait_for(self.inbox.get(), timeout)
        await message.ack()
        return message

    async def outcome(self, timeout: float = 60) -> tuple[AbstractIncomingMessage, Any]:
        """§4: the next outcome (a message without an aioqueue-event header) and its body."""
        while True:
            message = await self.next_message(timeout)
            if "aioqueue-event" not in (message.headers or {}):
                return message, json.loads(message.body)

    async def dead_letter(self) -> AbstractIncomingMessage:
        """§6: the next copy in the queue's dead-letter queue."""
        dlq = await self.channel.get_queue(f"{self.queue}.dlq", ensure=True)
        message = await wait_until(lambda: dlq.get(fail=False), what="a dead letter")
        await message.ack()
        return message  # type: ignore[no-any-return]


async def declare_ladder(channel: AbstractChannel, queue: str, queue_type: str) -> None:
    """§3: the delay ladder of ``queue_type``, and ``queue`` bound to its exit."""
    topic = aio_pika.ExchangeType.TOPIC
    deliver = await channel.declare_exchange("aioqueue.delay.deliver", topic, durable=True)
    exchanges = {"aioqueue.delay.deliver": deliver}
    for k in range(24, -1, -1):
        name = f"aioqueue.delay.{queue_type}.{k}"
        exchanges[name] = await channel.declare_exchange(name, topic, durable=True)
    for k in range(24, -1, -1):
        below = f"aioqueue.delay.{queue_type}.{k - 1}" if k else "aioqueue.delay.deliver"
        arguments: dict[str, Any] = {
            "x-queue-type": queue_type,
            "x-message-ttl": 100 * 2**k,
            "x-dead-letter-exchange": below,
        }
        if queue_type == "quorum":
            arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        level = await channel.declare_queue(
            f"aioqueue.delay.{queue_type}.{k}.q", durable=True, arguments=arguments
        )
        here = exchanges[f"aioqueue.delay.{queue_type}.{k}"]
        await level.bind(here, routing_key="*." * (24 - k) + "1.#")
        await exchanges[below].bind(here, routing_key="*." * (24 - k) + "0.#")
    work: AbstractQueue = await channel.get_queue(queue)
    await work.bind(deliver, routing_key="*." * 25 + queue)


# -- the worker side: an ordinary aioqueue app ------------------------------------------------


class Tasks:
    def __init__(self, app: App) -> None:
        self.app = app
        self.ran: list[tuple[str, float]] = []

        @app.task(name="p.add")
        async def add(x: int, y: int) -> int:
            self.ran.append(("p.add", time.monotonic()))
            return x + y

        @app.task(name="p.fail")
        async def fail(message: str) -> None:
            raise ValueError(message)

        @app.task(name="p.progress")
        async def progress(steps: int) -> str:
            for step in range(1, steps + 1):
                await task_context().progress({"step": step})
            return "done"

        @app.task(name="p.items")
        async def items(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i * 10


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def amqp(rabbit: RabbitNode) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        yield await connection.channel(on_return_raises=True)


@pytest.fixture
async def producer(amqp: AbstractChannel, queue_name: str, queue_type: str) -> Producer:
    producer = Producer(amqp, queue_name, queue_type)
    await producer.declare()
    return producer


@pytest.fixture
def tasks(make_app: Callable[..., App], queue_type: str) -> Tasks:
    return Tasks(make_app(queue_type=queue_type))


def test_the_doc_names_every_header_and_argument_this_producer_uses() -> None:
    for name in HEADERS_USED:
        assert f"`{name}" in DOC, name
    for name in ("message_id", "correlation_id", "content_type", "reply_to", "delivery_mode"):
        assert f"`{name}`" in DOC, name


async def test_a_task_submitted_before_any_worker_runs_and_its_outcome_reads_as_documented(
    producer: Producer, tasks: Tasks
) -> None:
    # Given tasks published as §2 says, to a queue declared as §1 says, before any worker
    # (a correlation id of the producer's own on the second)
    first = await producer.submit("p.add", [2, 3])
    second = await producer.submit("p.add", [4, 5], correlation_id="the-producer-s-own")
    # When an aioqueue worker starts (it declares the queue too: the arguments must match)
    async with tasks.app, running_worker(tasks.app):
        outcomes = [await producer.outcome(), await producer.outcome()]
    # Then each outcome comes with the task message's message id as its correlation id, no
    # headers, and the documented body
    by_id = {message.correlation_id: (message, body) for message, body in outcomes}
    assert set(by_id) == {first, second}
    for task_id, value in ((first, 5), (second, 9)):
        message, body = by_id[task_id]
        assert message.message_id == task_id
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert not message.headers
        assert body == {"task": "p.add", "ok": True, "value": value}


async def test_errors_and_dead_letters_read_as_documented(
    producer: Producer, tasks: Tasks, queue_name: str
) -> None:
    async with tasks.app, running_worker(tasks.app):
        # Given a task that raises
        task_id = await producer.submit("p.fail", ["boom"])
        message, body = await producer.outcome()
        # Then its outcome is an error of kind "error", with the exception's type and traceback
        assert message.correlation_id == task_id
        error = body.pop("error")
        assert body == {"task": "p.fail", "ok": False}
        assert (error["kind"], error["type"], error["message"]) == ("error", "ValueError", "boom")
        assert "Traceback" in error["traceback"] and "ValueError: boom" in error["traceback"]
        # and the message is in Q.dlq with the documented headers
        dead = await producer.dead_letter()
        headers = dead.headers or {}
        assert dead.message_id == task_id and json.loads(dead.body)["args"] == ["boom"]
        assert headers["aioqueue-dead-reason"] == "failed"
        assert headers["aioqueue-dead-error"] == "ValueError: boom"
        assert headers["aioqueue-dead-queue"] == queue_name
        assert re.fullmatch(r".+:\d+", str(headers["aioqueue-dead-worker"]))
        assert "ValueError: boom" in str(headers["aioqueue-dead-traceback"])
        dead_at = datetime.fromisoformat(str(headers["aioqueue-dead-at"]))  # an ISO-8601 string
        assert dead_at.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - dead_at) < timedelta(minutes=5)
        assert headers["aioqueue-task"] == "p.fail"  # the original headers stay
        assert "x-death" not in headers

        # Given a task whose deadline (Unix milliseconds) passed before it started
        past = round(time.time() * 1000) - 1000
        task_id = await producer.submit("p.add", [1, 1], headers={"aioqueue-deadline": past})
        message, body = await producer.outcome()
        # Then it is not run: kind "dead_lettered", type "expired", reason "expired"
        assert message.correlation_id == task_id
        assert (body["ok"], body["error"]["kind"], body["error"]["type"]) == (
            False,
            "dead_lettered",
            "expired",
        )
        assert (await producer.dead_letter()).headers["aioqueue-dead-reason"] == "expired"
        assert not tasks.ran

        # Given a name no worker registered, and a body that is not the documented object
        cases = [
            ({"task": "p.nosuch"}, "not_found", "TaskNotFoundError", "not_found"),
            ({"task": "p.add", "body": b"[2, 3]"}, "decode", "DecodeError", "decode"),
        ]
        for options, kind, type_name, reason in cases:
            task = options.pop("task")
            task_id = await producer.submit(str(task), [1], **options)
            message, body = await producer.outcome()
            # Then the outcome and the dead letter say which
            assert message.correlation_id == task_id
            assert (body["error"]["kind"], body["error"]["type"]) == (kind, type_name)
            assert (await producer.dead_letter()).headers["aioqueue-dead-reason"] == reason


async def test_no_reply_to_asks_for_no_result_and_a_transient_message_is_accepted(
    producer: Producer, tasks: Tasks
) -> None:
    async with tasks.app, running_worker(tasks.app) as worker:
        # Given a transient task message without reply_to
        await producer.submit("p.add", [1, 2], reply=False, persistent=False)
        # Then it runs, and nothing is sent back
        await wait_until(lambda: tasks.ran, what="the task to run")
        await wait_until(lambda: worker.statistics().in_hand == 0, what="it to be settled")
    assert producer.inbox.empty()


async def test_a_countdown_through_the_documented_ladder(
    producer: Producer, tasks: Tasks, amqp: AbstractChannel, queue_name: str, queue_type: str
) -> None:
    # Given the delay ladder and its binding declared as §3 says (an aioqueue client on this
    # node may have declared the ladder before: the arguments must be identical)
    await declare_ladder(amqp, queue_name, queue_type)
    async with tasks.app, running_worker(tasks.app):
        # When a task is published with a delay of 0.5 s
        sent = time.monotonic()
        task_id = await producer.submit_in(0.5, "p.add", [20, 22])
        message, body = await producer.outcome()
    # Then it ran no earlier, and its outcome came as usual
    assert message.correlation_id == task_id and body["value"] == 42
    ((_, started),) = tasks.ran
    assert started - sent >= 0.5


async def test_progress_and_stream_items_read_as_documented(
    producer: Producer, tasks: Tasks, amqp: AbstractChannel, queue_name: str
) -> None:
    stream = await amqp.declare_queue(f"{queue_name}.stream", durable=True)
    items: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await stream.consume(items.put, no_ack=True)
    async with tasks.app, running_worker(tasks.app):
        # Given a task that reports progress twice
        task_id = await producer.submit("p.progress", [2])
        # Then two progress messages come to reply_to before the outcome
        events = [await producer.next_message() for _ in range(3)]
        for seq, event in enumerate(events[:2], start=1):
            assert event.correlation_id == task_id
            assert event.headers == {
                "aioqueue-protocol": 1,
                "aioqueue-event": "progress",
                "aioqueue-seq": seq,
            }
            assert json.loads(event.body) == {"step": seq}
        assert not events[2].headers
        assert json.loads(events[2].body) == {"task": "p.progress", "ok": True, "value": "done"}

        # Given a generator task with aioqueue-stream-to naming a queue of ours
        task_id = await producer.submit("p.items", [3], headers={"aioqueue-stream-to": stream.name})
        message, body = await producer.outcome()
        # Then its items came there, in order, and the outcome counts them
        assert message.correlation_id == task_id
        assert body == {"task": "p.items", "ok": True, "items": 3, "value": 3}
        received = [await asyncio.wait_for(items.get(), 30) for _ in range(3)]
    assert [json.loads(m.body) for m in received] == [0, 10, 20]
    for seq, item in enumerate(received, start=1):
        assert item.correlation_id == task_id
        assert (item.headers or {})["aioqueue-event"] == "item"
        assert (item.headers or {})["aioqueue-seq"] == seq
