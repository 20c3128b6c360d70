"""`bench.lean`, the yardstick of the broker's limit: its frames are AMQP's, and against the real
RabbitMQ it does what `raw` does (round trips, confirmed sends, the executed count), leaving
nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator

import aiormq
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, frame
from pamqp import header as pamqp_header
from pamqp.body import ContentBody

from bench.lean import LeanClient, LeanProtocol, LeanWorker, _header_props, connect, publish_frames
from tests.rabbit import RabbitNode

short = st.binary(max_size=255).filter(lambda b: b.isascii())
text = st.text(st.characters(codec="ascii"), max_size=40)


@given(
    routing_key=short,
    body=st.binary(max_size=3000),
    correlation_id=short.filter(bool),  # lean always names one
    reply_to=short,
    persistent=st.booleans(),
)
def test_publish_frames_are_the_frames_pamqp_writes(
    routing_key: bytes, body: bytes, correlation_id: bytes, reply_to: bytes, persistent: bool
) -> None:
    mode = 2 if persistent else 1
    ours = publish_frames(
        1, routing_key, body, delivery_mode=mode, correlation_id=correlation_id, reply_to=reply_to
    )
    properties = commands.Basic.Properties(
        content_type="application/json",
        delivery_mode=mode,
        correlation_id=correlation_id.decode(),
        reply_to=reply_to.decode() or None,
    )
    theirs = (
        frame.marshal(commands.Basic.Publish(exchange="", routing_key=routing_key.decode()), 1)
        + frame.marshal(pamqp_header.ContentHeader(0, len(body), properties), 1)
        + frame.marshal(ContentBody(body), 1)
    )
    assert ours == theirs


@given(
    size=st.integers(0, 2**40),
    content_type=st.none() | text,
    headers=st.none() | st.dictionaries(text, st.integers(-(2**31), 2**31 - 1), max_size=3),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    correlation_id=st.none() | text,
    reply_to=st.none() | text,
    expiration=st.none() | st.integers(0, 10**6).map(str),
    message_id=st.none() | text,
    timestamp=st.none() | st.integers(0, 2**32),
    app_id=st.none() | text,
)
def test_a_content_header_is_read_as_pamqp_writes_it(
    size: int,
    content_type: str | None,
    headers: dict[str, int] | None,
    delivery_mode: int | None,
    priority: int | None,
    correlation_id: str | None,
    reply_to: str | None,
    expiration: str | None,
    message_id: str | None,
    timestamp: int | None,
    app_id: str | None,
) -> None:
    properties = commands.Basic.Properties(
        content_type=content_type,
        headers=headers,
        delivery_mode=delivery_mode,
        priority=priority,
        correlation_id=correlation_id,
        reply_to=reply_to,
        expiration=expiration,
        message_id=message_id,
        timestamp=None
        if timestamp is None
        else datetime.datetime.fromtimestamp(timestamp, datetime.UTC),
        app_id=app_id,
    )
    whole = frame.marshal(pamqp_header.ContentHeader(0, size, properties), 1)
    payload = memoryview(whole)[7:-1]
    assert _header_props(payload) == (
        size,
        (correlation_id or "").encode(),
        (reply_to or "").encode(),
    )


@contextlib.asynccontextmanager
async def lean_worker(url: str, queue: str) -> AsyncIterator[LeanWorker]:
    protocol = await connect(url, prefetch=100)
    worker = LeanWorker(protocol)
    await protocol.rpc(commands.Queue.Declare(queue=queue, durable=True), commands.Queue.DeclareOk)
    await protocol.rpc(commands.Basic.Consume(queue=queue), commands.Basic.ConsumeOk)
    try:
        yield worker
    finally:
        worker.close()
        await protocol.close()


async def held(url: str, queue: str) -> tuple[int, int]:
    """(messages, consumers) of ``queue``, from a passive declare."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return ok.message_count or 0, ok.consumer_count or 0
    finally:
        await connection.close()


async def delete(url: str, *queues: str) -> None:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
    finally:
        await connection.close()


async def test_lean_does_round_trips_and_confirmed_sends_on_rabbitmq(
    rabbit: RabbitNode, queue_name: str
) -> None:
    client: LeanClient | None = None
    try:
        async with lean_worker(rabbit.url, queue_name):
            client = await LeanClient.connect(rabbit.url, queue_name)
            values = await asyncio.wait_for(
                asyncio.gather(*(client.call("noop", i) for i in range(300))), 60
            )
            assert values == list(range(300))
            await asyncio.wait_for(asyncio.gather(*(client.send("fire") for _ in range(500))), 60)
            # the count comes back behind every fire task ahead of it in the queue
            assert await asyncio.wait_for(client.call("executed"), 60) == 500
            reply_queue = client.reply_queue
            await client.close()
            # every task and every reply was acked: nothing is left to redeliver
            assert await held(rabbit.url, queue_name) == (0, 1)
            assert await held(rabbit.url, reply_queue) == (0, 0)
    finally:
        queues = [queue_name] + ([client.reply_queue] if client is not None else [])
        await delete(rabbit.url, *queues)


async def test_a_refused_declare_fails_the_waiting_call_instead_of_hanging(
    rabbit: RabbitNode, queue_name: str
) -> None:
    protocol: LeanProtocol = await connect(rabbit.url)
    try:
        await protocol.rpc(
            commands.Queue.Declare(queue=queue_name, durable=True), commands.Queue.DeclareOk
        )
        # the same name, not durable: RabbitMQ closes the channel (406 PRECONDITION_FAILED)
        declare = commands.Queue.Declare(queue=queue_name, durable=False)
        try:
            await asyncio.wait_for(protocol.rpc(declare, commands.Queue.DeclareOk), 30)
        except ConnectionError as exc:
            assert "406" in str(exc)
        else:
            raise AssertionError("the refused declare returned")
    finally:
        protocol.transport.close()
        await delete(rabbit.url, queue_name)
