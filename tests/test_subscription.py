"""Consumers come back when their queue went missing: deleted under them, or lost by the broker.

A RabbitMQ node killed (``kill -9``) a few seconds after a durable queue was declared came back
without it (seen once, with a client's reply queue), and aio-pika drops the exception of a
channel's reopen callback: a consumer that re-consumed there stayed silently dead (a flaky
``test_callers_wait_across_a_broker_outage_and_get_their_results[kill]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
from pamqp import commands as spec

from aioqueue import App, Settings
from aioqueue.broker import Delivery, ack_soon, settle
from aioqueue.rabbit import RabbitBroker
from tests.conftest import running_worker, wait_until
from tests.proxy import Proxy
from tests.rabbit import RabbitNode
from tests.test_reconnect import consumers


@pytest.fixture
async def admin(rabbit: RabbitNode) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel of a connection of its own, to change the broker behind the client's back."""
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        yield await connection.channel()


def reply_queue(app: App) -> str:
    replies = app._replies
    assert replies is not None
    return replies.queue


async def test_a_reply_queue_deleted_under_a_connected_client_is_declared_and_consumed_again(
    make_app: Callable[..., App], rabbit: RabbitNode, admin: aio_pika.abc.AbstractChannel
) -> None:
    # Given a client that received a result, so its reply queue is consumed
    app = make_app()

    @app.task(name="s.echo")
    async def echo(x: int) -> int:
        return x

    async with app, running_worker(app):
        assert await (await echo.submit(1)).result(timeout=30) == 1
        queue = reply_queue(app)
        # When the reply queue is deleted (RabbitMQ cancels its consumer)
        await admin.queue_delete(queue)
        # Then the client declares it again and consumes it, and results arrive again
        await wait_until(lambda: consumers(rabbit, queue), timeout=60, what="re-consuming")
        assert await (await echo.submit(2)).result(timeout=60) == 2


async def test_a_consumer_of_a_missing_queue_keeps_trying_and_resumes_when_it_is_back(
    rabbit: RabbitNode,
    queue_name: str,
    admin: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a subscription to a queue declared by someone else (its arguments unknown here)
    await admin.declare_queue(queue_name, durable=True)
    broker = RabbitBroker(rabbit.url, Settings(), connection_name="subscription")
    await broker.connect()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_delivery(delivery: Delivery) -> None:
        await received.put(delivery.body)
        await settle(delivery, ack=True)

    caplog.set_level(logging.WARNING, logger="aioqueue.broker")
    try:
        subscription = await broker.subscribe(queue_name, on_delivery, prefetch=10)
        # When the queue is deleted, and only declared again after a failed attempt to consume
        await admin.queue_delete(queue_name)
        await wait_until(
            lambda: any(str(r.msg).startswith("consuming %r again") for r in caplog.records),
            timeout=60,
            what="a failed attempt to consume again",
        )
        await admin.declare_queue(queue_name, durable=True)
        await admin.default_exchange.publish(aio_pika.Message(b"back"), routing_key=queue_name)
        # Then the subscription consumes it again (on the channel it had: a missing queue was
        # found on a probe channel, not by closing the consuming one)
        assert await asyncio.wait_for(received.get(), 60) == b"back"
        await subscription.close()
    finally:
        await broker.close()
        await admin.queue_delete(queue_name)


async def test_results_arrive_after_a_reconnect_that_finds_the_reply_queue_gone(
    make_app: Callable[..., App],
    rabbit: RabbitNode,
    admin: aio_pika.abc.AbstractChannel,
) -> None:
    # Given a client behind a proxy, and a worker connected directly
    async with Proxy(rabbit.port) as proxy:
        client = make_app(broker_url=proxy.url(rabbit.url))
        worker_app = make_app()

        @worker_app.task(name="s.double")
        async def double(x: int) -> int:
            return 2 * x

        async with client, worker_app, running_worker(worker_app):
            assert await (await client.submit("s.double", 1)).result(timeout=30) == 2
            queue = reply_queue(client)
            # When the client's connection drops, and its reply queue is gone when it returns
            # (what a node killed soon after the declare can do)
            proxy.blackhole()
            accepted = proxy.accepted
            proxy.reset()
            await wait_until(lambda: proxy.accepted > accepted, timeout=60, what="a reconnect")
            await admin.queue_delete(queue)
            proxy.passthrough()
            # Then its reply queue is consumed again and results arrive. (aio-pika restores
            # channels in no set order: when the consuming one comes before the one that
            # declared the queue, consuming meets a missing queue; the other order is fine.)
            await wait_until(lambda: consumers(rabbit, queue), timeout=60, what="re-consuming")
            assert await (await client.submit("s.double", 21)).result(timeout=60) == 42


@contextlib.asynccontextmanager
async def own_broker(
    rabbit: RabbitNode,
    admin: aio_pika.abc.AbstractChannel,
    queue: str,
    settings: Settings,
    name: str,
) -> AsyncIterator[RabbitBroker]:
    """A connected broker of its own, and ``queue`` declared for it; both gone afterwards."""
    await admin.declare_queue(queue, durable=True)
    broker = RabbitBroker(rabbit.url, settings, connection_name=name)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()
        await admin.queue_delete(queue)


async def test_a_callback_that_returns_nothing_handles_each_delivery_at_once(
    rabbit: RabbitNode,
    queue_name: str,
    admin: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a subscription whose callback is a plain function (as the reply consumer's)
    bodies: list[bytes] = []
    tasks: set[asyncio.Task[object] | None] = set()

    def on_delivery(delivery: Delivery) -> None:
        tasks.add(asyncio.current_task())
        ack_soon(delivery)
        if delivery.body == b"boom":
            raise RuntimeError("a consumer's bug")
        bodies.append(delivery.body)

    caplog.set_level(logging.ERROR, logger="aioqueue.broker")
    async with own_broker(rabbit, admin, queue_name, Settings(), "plain-callback") as broker:
        subscription = await broker.subscribe(queue_name, on_delivery, prefetch=2)
        # When messages arrive, one of which makes the callback raise
        for body in (b"1", b"boom", b"2", b"3", b"4"):
            await admin.default_exchange.publish(aio_pika.Message(body), routing_key=queue_name)
        # Then every delivery is handled, each acked (prefetch 2: five arrive only if acked),
        await wait_until(lambda: len(bodies) == 4, timeout=60, what="four deliveries")
        assert bodies == [b"1", b"2", b"3", b"4"]
        # with no task made per delivery (they run in the task that reads the connection),
        assert len(tasks) == 1 and None not in tasks
        # and the callback's failure was logged, not raised into the connection
        assert any("consumer of" in r.getMessage() for r in caplog.records)
        await subscription.close()
        declared = await admin.declare_queue(queue_name, durable=True, passive=True)
        assert declared.declaration_result.message_count == 0


async def test_a_connection_that_only_receives_deliveries_is_not_taken_for_stuck(
    rabbit: RabbitNode,
    queue_name: str,
    admin: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiormq closes a connection that handed it no frame for 3 * (heartbeat + 1) seconds, and
    # RabbitMQ sends no heartbeat while it sends deliveries: a consumer whose deliveries are
    # all taken by our reader, and that publishes nothing (so no confirms come back), was
    # closed every 6 s here, its unacked messages redelivered.
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_delivery(delivery: Delivery) -> None:
        await settle(delivery, ack=True)
        await received.put(delivery)

    caplog.set_level(logging.INFO)
    settings = Settings(heartbeat=1)
    async with own_broker(rabbit, admin, queue_name, settings, "deliveries-only") as broker:
        subscription = await broker.subscribe(queue_name, on_delivery, prefetch=10)
        loop = asyncio.get_running_loop()
        grace = 3 * (1 + 1)
        # When only deliveries reach it, one after another, for longer than that grace
        until, sent = loop.time() + 1.5 * grace, 0
        while loop.time() < until:
            body = str(sent).encode()
            await admin.default_exchange.publish(aio_pika.Message(body), routing_key=queue_name)
            sent += 1
            delivery = await asyncio.wait_for(received.get(), 30)
            # Then each arrives once, never redelivered by a reconnect
            assert delivery.body == body and not delivery.redelivered
        assert sent > 100
        stuck = [r for r in caplog.records if "was stuck" in r.getMessage()]
        assert stuck == []
        await subscription.close()


async def test_a_connection_that_only_publishes_is_not_taken_for_stuck(
    rabbit: RabbitNode,
    queue_name: str,
    admin: aio_pika.abc.AbstractChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Our reader takes publisher confirms before aiormq sees them: a connection that only
    # published (a producer submitting one task after another, nothing consumed) handed aiormq
    # no frame at all, was closed as stuck after 3 * (heartbeat + 1) seconds, and the publish
    # in flight went out twice (found as 100,001 messages after the 100,000 of `backlog`).
    caplog.set_level(logging.INFO)
    settings = Settings(heartbeat=1)
    async with own_broker(rabbit, admin, queue_name, settings, "publishes-only") as broker:
        loop = asyncio.get_running_loop()
        grace = 3 * (1 + 1)
        # When it only publishes, each confirmed before the next, for longer than that grace
        until, sent = loop.time() + 1.5 * grace, 0
        while loop.time() < until:
            await broker.publish(queue_name, str(sent).encode(), spec.Basic.Properties())
            sent += 1
        assert sent > 100
        # Then it was never taken for stuck, and each message is in the queue once
        stuck = [r for r in caplog.records if "was stuck" in r.getMessage()]
        assert stuck == []
        assert await broker.queue_depth(queue_name) == (sent, 0)
