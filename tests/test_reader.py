"""The whole-buffer read path (`aioqueue.rabbit.reader`): the same frames as aiormq's own
receiver, byte for byte, however the socket splits them; its errors where aiormq has them; and
deliveries handed straight to our consumers on a real broker, of every size, in order."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from aioqueue import Settings
from aioqueue.broker import Delivery, settle
from aioqueue.rabbit import RabbitBroker
from aioqueue.rabbit import reader as whole
from aioqueue.rabbit.reader import WholeBufferReader, WholeBufferReceiver
from aioqueue.rabbit.subscription import Subscription
from tests.rabbit import RabbitNode

# aiormq's own receiver, whatever the module attribute is now
AIORMQ_RECEIVER: Any = WholeBufferReceiver.__mro__[1]

# -- the same frames as aiormq, byte for byte ---------------------------------------------------

text = st.text(alphabet="abcXYZ019.-_:", max_size=20)
properties = st.builds(
    spec.Basic.Properties,
    content_type=st.none() | text,
    headers=st.none() | st.dictionaries(text, st.integers(-(2**31), 2**31 - 1) | text),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    correlation_id=st.none() | text,
    message_id=st.none() | text,
)
frames = st.one_of(
    st.builds(
        spec.Basic.Deliver,
        consumer_tag=text,
        delivery_tag=st.integers(1, 2**63 - 1),
        redelivered=st.booleans(),
        exchange=text,
        routing_key=text,
    ),
    st.builds(spec.Basic.Ack, delivery_tag=st.integers(0, 2**63 - 1), multiple=st.booleans()),
    st.builds(spec.Basic.Publish, exchange=text, routing_key=text),
    st.builds(ContentHeader, body_size=st.integers(0, 2**40), properties=properties),
    st.builds(ContentBody, value=st.binary(min_size=1, max_size=3000)),
    st.just(Heartbeat()),
    st.just(spec.Channel.CloseOk()),
)


def wire(stream: list[tuple[int, Any]]) -> bytes:
    return b"".join(
        pamqp.frame.marshal(frame, 0 if type(frame) is Heartbeat else channel)
        for channel, frame in stream
    )


async def read_all(
    receiver: Any, reader: asyncio.StreamReader, chunks: list[bytes], count: int
) -> list[Any]:
    """The ``count`` frames ``receiver`` reads while ``chunks`` arrive one by one."""

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)  # let the receiver read what is there (no timing involved)
        reader.feed_eof()

    feeding = asyncio.ensure_future(feed())
    got = []
    try:
        for _ in range(count):
            _, channel, frame = await receiver.get_frame()
            got.append(pamqp.frame.marshal(frame, channel))
    finally:
        await feeding
    return got


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(st.tuples(st.integers(0, 5), frames), min_size=1, max_size=25),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
async def test_whole_buffers_give_aiormqs_frames_however_the_socket_splits_them(
    stream: list[tuple[int, Any]], cuts: list[int]
) -> None:
    # Given frames of every kind our connections see, arriving in arbitrary pieces
    data = wire(stream)
    chunks = split(data, cuts)
    # When aiormq's receiver and ours read them
    plain = asyncio.StreamReader()
    theirs = await read_all(AIORMQ_RECEIVER(plain), plain, chunks, len(stream))
    buffered = WholeBufferReader()
    ours = await read_all(WholeBufferReceiver(buffered), buffered, chunks, len(stream))
    # Then both read the same frames, byte for byte, in the same order (deliveries for no
    # consumer of ours are aiormq's, as they were)
    assert ours == theirs
    assert len(ours) == len(stream)


async def test_a_receiver_over_any_other_reader_is_aiormqs_own() -> None:
    plain = asyncio.StreamReader()
    receiver = WholeBufferReceiver(plain)
    frame = pamqp.frame.marshal(spec.Basic.Ack(7), 3)
    plain.feed_data(frame)
    _, channel, ack = await receiver.get_frame()
    assert pamqp.frame.marshal(ack, channel) == frame
    assert receiver._buffer == bytearray()  # not ours: aiormq's reads, untouched


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"AMQP\x00\x00\x09\x01", ProtocolSyntaxError),  # the server wants another protocol
        (pamqp.frame.marshal(spec.Basic.Ack(1), 1)[:-3], AMQPConnectionError),  # cut short
        (pamqp.frame.marshal(spec.Basic.Ack(1), 1)[:-1] + b"\x00", InvalidFrameError),
        (b"\x03\x00\x01\x00\x00\x00\x02ab\x00", InvalidFrameError),  # a body, bad frame end
    ],
    ids=["protocol-header", "truncated", "frame-end", "body-frame-end"],
)
async def test_broken_streams_fail_as_aiormqs_receiver_fails(data: bytes, error: type) -> None:
    reader = WholeBufferReader()
    reader.feed_data(data)
    reader.feed_eof()
    with pytest.raises(error):
        await WholeBufferReceiver(reader).get_frame()


# -- deliveries straight to our consumers, on a real broker -------------------------------------


@pytest.fixture
async def broker(rabbit: RabbitNode) -> AsyncIterator[RabbitBroker]:
    broker = RabbitBroker(rabbit.url, Settings(), connection_name="reader")
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


class Counted:
    """Deliveries a subscription got, and how many came through aiormq's consumer instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_aiormq = 0
        original = Subscription._on_message

        async def on_message(subscription: Subscription, message: Any) -> None:
            self.by_aiormq += 1
            await original(subscription, message)

        monkeypatch.setattr(Subscription, "_on_message", on_message)


async def collect(
    broker: RabbitBroker, queue: str, count: int, *, prefetch: int = 50
) -> tuple[Subscription, asyncio.Future[list[Delivery]]]:
    got: list[Delivery] = []
    done: asyncio.Future[list[Delivery]] = asyncio.get_running_loop().create_future()

    async def on_delivery(delivery: Delivery) -> None:
        got.append(delivery)
        await settle(delivery, ack=True)
        if len(got) == count and not done.done():
            done.set_result(got)

    await broker.declare_queue(queue, {"x-queue-type": "classic"})
    subscription = await broker.subscribe(queue, on_delivery, prefetch=prefetch)
    assert isinstance(subscription, Subscription)
    return subscription, done


async def test_deliveries_of_every_size_reach_our_consumer_directly_and_in_order(
    broker: RabbitBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = Counted(monkeypatch)
    frame_max = 131072  # RabbitMQ's default: bodies above it come in several frames
    sizes = [0, 1, 100, frame_max - 8, frame_max - 7, frame_max, 3 * frame_max + 5, 7]
    sizes += [n * 997 % 70000 for n in range(200)]
    bodies = [os.urandom(size) for size in sizes]
    # Given a subscription of ours
    subscription, done = await collect(broker, queue_name, len(bodies))
    # When messages of every size are published, with properties
    for i, body in enumerate(bodies):
        props = spec.Basic.Properties(message_id=f"m{i}", headers={"i": i}, delivery_mode=2)
        await broker.publish(queue_name, body, props)
    got = await asyncio.wait_for(done, 60)
    # Then each arrives whole, with its properties, in order, and none through aiormq's
    # channel task
    assert [d.body for d in got] == bodies
    assert [d.properties.message_id for d in got] == [f"m{i}" for i in range(len(bodies))]
    assert [(d.properties.headers or {}).get("i") for d in got] == list(range(len(bodies)))
    assert counted.by_aiormq == 0
    await subscription.close()


async def test_two_consumers_on_one_connection_get_their_own_deliveries(
    broker: RabbitBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = Counted(monkeypatch)
    # Given two subscriptions of one connection, each on its own channel
    first, first_done = await collect(broker, f"{queue_name}.a", 300, prefetch=7)
    second, second_done = await collect(broker, f"{queue_name}.b", 300, prefetch=13)
    # When messages for both are published interleaved
    publishes = []
    for i in range(300):
        for queue in (f"{queue_name}.a", f"{queue_name}.b"):
            body = f"{queue}:{i}".encode() * (1 + i % 5)
            publishes.append(broker.publish(queue, body, spec.Basic.Properties()))
    await asyncio.gather(*publishes)
    # Then each consumer gets its own, in order
    for queue, done in ((f"{queue_name}.a", first_done), (f"{queue_name}.b", second_done)):
        got = await asyncio.wait_for(done, 60)
        assert [d.body for d in got] == [f"{queue}:{i}".encode() * (1 + i % 5) for i in range(300)]
    assert counted.by_aiormq == 0
    await first.close()
    await second.close()


async def test_a_failing_consumer_leaves_the_connection_reading(
    broker: RabbitBroker, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a consumer that fails on its first delivery (before settling it)
    got: list[bytes] = []
    done = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        if delivery.body == b"boom":
            raise RuntimeError("consumer bug")
        got.append(delivery.body)
        await settle(delivery, ack=True)
        if len(got) == 3:
            done.set()

    await broker.declare_queue(queue_name, {"x-queue-type": "classic"})
    subscription = await broker.subscribe(queue_name, on_delivery, prefetch=10)
    # When it fails, then the error is logged and the next deliveries still arrive
    for body in (b"boom", b"1", b"2", b"3"):
        await broker.publish(queue_name, body, spec.Basic.Properties())
    await asyncio.wait_for(done.wait(), 60)
    assert got == [b"1", b"2", b"3"]
    assert "consumer bug" in caplog.text
    await subscription.close()


async def test_a_cancelled_consumer_is_no_longer_called_and_others_read_as_before(
    broker: RabbitBroker, rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a subscription of ours that was cancelled
    subscription, done = await collect(broker, queue_name, 1)
    await broker.publish(queue_name, b"one", spec.Basic.Properties())
    await asyncio.wait_for(done, 60)
    await subscription.cancel()
    assert subscription._tag not in whole._DIRECT
    # And a plain aiormq connection (not ours) consuming the same queue: it reads through
    # aiormq's own machinery, even with our receiver installed process-wide
    whole.install()
    connection = await aiormq.connect(rabbit.url)
    try:
        channel = await connection.channel()
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            await received.put(message.body)
            await channel.basic_ack(message.delivery.delivery_tag)

        await channel.basic_consume(queue_name, on_message)
        await broker.publish(queue_name, b"two", spec.Basic.Properties())
        # Then the message goes to the plain consumer
        assert await asyncio.wait_for(received.get(), 60) == b"two"
    finally:
        await connection.close()
    await subscription.close()
