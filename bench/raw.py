"""The baseline ``raw``: what a straightforward aio-pika producer and worker look like.

Deliberately naive, as the issue describes it: aio-pika `Message` objects, persistent tasks,
publisher confirms (aio-pika's default) awaited one ``exchange.publish`` at a time, RPC futures
keyed by correlation id, replies transient to an exclusive server-named queue, a worker with
prefetch 100 (1,000 for the fire workload: each naive configuration at its strongest, issue 20)
that acks each message after its reply is published (and confirmed). Both sides
encode JSON with orjson and run on uvloop. The wire protocol is the benchmark's own:
``{"task": name, "args": [...]}`` in, ``{"value": ...}`` back.

Worker: ``python -m bench.raw AMQP_URL QUEUE`` (prints ``raw worker ready`` on stderr; SIGTERM
stops it). With ``$AIOQUEUE_BENCH_QUEUE_TYPE=quorum`` (the cluster run) both sides declare the
task queue with ``x-queue-type: quorum``; the reply queue stays exclusive (hence classic).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from .loop import run
from .procs import QUEUE_TYPE_ENV, RAW_PREFETCH_ENV

PREFETCH = 100
JSON = "application/json"
QUORUM = {"x-queue-type": "quorum"}


class RawClient:
    """A naive aio-pika producer: ``call`` waits for the reply, ``send`` only for the confirm."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        exchange: AbstractExchange,
        queue: str,
        reply_queue: AbstractQueue,
    ) -> None:
        self._connection = connection
        self._exchange = exchange
        self._queue = queue
        self._reply_queue = reply_queue
        self._futures: dict[str, asyncio.Future[Any]] = {}

    @classmethod
    async def connect(cls, url: str, queue: str, *, quorum: bool = False) -> RawClient:
        connection = await aio_pika.connect_robust(url)
        channel = await connection.channel()  # publisher confirms on
        await channel.declare_queue(queue, durable=True, arguments=QUORUM if quorum else None)
        reply_queue = await channel.declare_queue(exclusive=True)
        client = cls(connection, channel.default_exchange, queue, reply_queue)
        await reply_queue.consume(client._on_reply, no_ack=True)
        return client

    @property
    def reply_queue(self) -> str:
        return self._reply_queue.name

    async def close(self) -> None:
        await self._connection.close()

    async def call(self, task: str, *args: Any) -> Any:
        """Publish a task with ``reply_to`` and wait for its reply's value."""
        correlation_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._futures[correlation_id] = future
        try:
            await self._publish(task, args, correlation_id, reply_to=self.reply_queue)
        except BaseException:
            self._futures.pop(correlation_id, None)
            raise
        return await future

    async def send(self, task: str, *args: Any) -> None:
        """Publish a task that sends no reply; returns once RabbitMQ confirmed it."""
        await self._publish(task, args, uuid.uuid4().hex, reply_to=None)

    async def _publish(
        self, task: str, args: tuple[Any, ...], correlation_id: str, *, reply_to: str | None
    ) -> None:
        message = aio_pika.Message(
            orjson.dumps({"task": task, "args": args}),
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id,
            message_id=correlation_id,
            reply_to=reply_to,
        )
        await self._exchange.publish(message, routing_key=self._queue)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._futures.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(orjson.loads(message.body)["value"])


class RawWorker:
    """A naive aio-pika worker running the three benchmark tasks."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self.executed = 0  # "fire" tasks run so far

    def run_task(self, task: str, args: list[Any]) -> Any:
        if task == "noop":
            return args[0]
        if task == "fire":
            self.executed += 1
            return None
        if task == "executed":
            return self.executed
        raise ValueError(f"unknown task {task!r}")

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        request = orjson.loads(message.body)
        value = self.run_task(request["task"], request["args"])
        if message.reply_to:
            reply = aio_pika.Message(
                orjson.dumps({"value": value}),
                content_type=JSON,
                correlation_id=message.correlation_id,
            )
            await self._channel.default_exchange.publish(reply, routing_key=message.reply_to)
        await message.ack()


async def serve(url: str, queue_name: str, *, quorum: bool = False) -> None:
    """Consume ``queue_name`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=int(os.environ.get(RAW_PREFETCH_ENV, PREFETCH)))
        arguments = QUORUM if quorum else None
        queue = await channel.declare_queue(queue_name, durable=True, arguments=arguments)
        worker = RawWorker(channel)
        await queue.consume(worker.on_message)
        print(f"raw worker ready (queue {queue_name})", file=sys.stderr, flush=True)
        await stop.wait()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.raw AMQP_URL QUEUE")
    quorum = os.environ.get(QUEUE_TYPE_ENV) == "quorum"
    run(serve(sys.argv[1], sys.argv[2], quorum=quorum))
