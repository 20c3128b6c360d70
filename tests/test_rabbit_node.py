"""The tests' own RabbitMQ node (tests/rabbit.py + services/rabbitmq/broker.sh) works.

Plain sync test with ``asyncio.run``, so it does not depend on pytest-asyncio's configuration.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from tests.rabbit import RabbitNode

QUEUE = "rabbit-node-selftest"
BODY = b"survives a broker restart"


async def publish_persistent(url: str) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()  # publisher confirms: stored once publish returns
        await channel.declare_queue(QUEUE, durable=True)
        message = aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key=QUEUE)


async def get_one(url: str) -> bytes | None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, durable=True)
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return None
        await message.ack()
        return message.body


def test_node_keeps_durable_messages_across_app_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-selftest"))
    node.start()
    try:
        asyncio.run(publish_persistent(node.url))
        assert node.queue_stats()[QUEUE]["messages"] == 1

        node.restart()  # stop_app + start_app: the queue is recovered from disk

        stats = node.queue_stats()[QUEUE]
        assert stats["messages"] == 1, stats
        assert asyncio.run(get_one(node.url)) == BODY
        assert node.queue_stats()[QUEUE]["messages"] == 0
    finally:
        node.stop()
