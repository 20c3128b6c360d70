"""RabbitMQ through aio-pika, with aiormq on the per-message path.

aio-pika owns the connection, its recovery and the topology (robust channels re-declare queues
after a reconnect). Per message we go one level down to the aiormq channel under the robust
channel — fetched afresh for every operation, because it is a new object after each reconnect:

- publishes go through `ChannelPublisher` (aiormq's confirm bookkeeping, without its
  per-publish lock, timer and writer-queue wait; see `aioqueue.rabbit.publisher`) and each awaits
  its own publisher confirm, under a deadline that spans reconnects;
- consuming is a `aioqueue.rabbit.subscription.Subscription`, which comes back after reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, AbstractRobustQueue
from pamqp import commands as spec

from ..broker import ConsumeArguments, DeliveryCallback, LostCallback
from ..errors import AioqueueError, BrokerConnectionError, PublishError
from ..settings import Settings, broker_nodes, mask_url, scrub
from ..topology import DELIVER_EXCHANGE, QueueType, delay_ladder, deliver_pattern
from .connection import connect
from .declare import declare, hold_queue, probe
from .errors import FATAL_CHANNEL, TRANSIENT, publish_retry, unconfirmed
from .publisher import ChannelPublisher, Deadlines, Slots
from .subscription import Subscription

__all__ = ["RabbitBroker"]

log = logging.getLogger("aioqueue.broker")
_T = TypeVar("_T")


class RabbitBroker:
    """One robust connection to RabbitMQ with a confirmed publishing channel.

    ``url`` is one AMQP URL or a comma-separated list of the nodes of one cluster: every
    connection attempt goes to the next of them (`aioqueue.rabbit.connection.NodeRing`).

    Raises:
        ValueError: ``url`` is not an AMQP URL or a list of them (see
            `aioqueue.settings.broker_nodes`).
    """

    def __init__(self, url: str, settings: Settings, *, connection_name: str) -> None:
        broker_nodes(url)  # raises for a malformed URL
        self._url = url
        self.settings = settings
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._publisher: ChannelPublisher | None = None  # of the current publishing channel
        self._deadlines = Deadlines()
        self._inflight = Slots(settings.max_inflight_publishes, self._deadlines)
        self._declared: dict[str, aio_pika.abc.AbstractRobustQueue] = {}
        self._declare_lock = asyncio.Lock()
        self._ladders: set[str] = set()
        self._delay_routes: set[str] = set()
        self._deliver: aio_pika.abc.AbstractRobustExchange | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the connection's (a lookup: getpid)

    def __repr__(self) -> str:
        return f"<RabbitBroker {mask_url(self._url)}>"

    @property
    def url(self) -> str:
        """The broker URL with the password masked."""
        return mask_url(self._url)

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    def now(self) -> float:
        return time.time()

    async def connect(self) -> None:
        """Connect, retrying with back-off for ``settings.connect_timeout`` seconds."""
        self._loop = asyncio.get_running_loop()
        self._connection = await connect(self._url, self.settings, name=self._connection_name)
        self._publish_channel = await self.channel(publisher_confirms=True)

    def _scrub(self, exc: BaseException) -> str:
        return scrub(f"{type(exc).__name__}: {exc}", self._url)

    async def close(self) -> None:
        connection, self._connection, self._loop = self._connection, None, None
        self._declared.clear()
        self._ladders.clear()
        self._delay_routes.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def channel(self, *, publisher_confirms: bool = False) -> AbstractRobustChannel:
        """A new robust channel on this connection (re-opened after reconnects)."""
        connection = self._connection
        if connection is None:
            raise BrokerConnectionError("not connected: use `async with app:` first")
        channel = await self._retrying(
            "opening a channel",
            lambda: connection.channel(
                publisher_confirms=publisher_confirms, on_return_raises=publisher_confirms
            ),
        )
        assert isinstance(channel, AbstractRobustChannel)
        return channel

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """``operation()``, retried through connection trouble while the connection recovers.

        For ``settings.publish_timeout`` at most (a submit's own deadline is the same), then
        `BrokerConnectionError`; a refusal (access, not found, precondition) is raised at once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout
        delay = 0.05
        while True:
            try:
                return await operation()
            except FATAL_CHANNEL:
                raise
            except TRANSIENT as exc:
                closed = self._connection is None or self._connection.is_closed
                if closed or loop.time() + delay > deadline:
                    raise BrokerConnectionError(f"{what} failed: {self._scrub(exc)}") from None
                log.info("%s interrupted (%s); retrying", what, self._scrub(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _channel(self) -> AbstractRobustChannel:
        if self._publish_channel is None:
            raise BrokerConnectionError("not connected: use `async with app:` first")
        return self._publish_channel

    def is_declared(self, name: str) -> bool:
        """Whether ``name`` was declared on this connection (so `declare_queue` is a no-op)."""
        return name in self._declared

    async def declare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        """Declare a durable queue once per connection; aio-pika re-declares it after reconnects."""
        if name in self._declared:
            return
        async with self._declare_lock:
            if name not in self._declared:
                self._declared[name] = await self._retrying(
                    f"declaring queue {name!r}", lambda: self._declare(name, arguments)
                )

    async def _declare(self, name: str, arguments: dict[str, Any]) -> AbstractRobustQueue:
        transport = None if self._connection is None else self._connection.transport
        if transport is None:  # reconnecting: transient, `_retrying` waits for it
            raise ConnectionError(f"not connected: cannot declare queue {name!r}")
        return await declare(self._channel(), transport.connection, name, arguments)

    async def redeclare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        """Declare ``name`` again although it was declared here: it was deleted since (a
        publish to it came back unroutable). With the arguments it was declared with here,
        else ``arguments``; on a channel of its own, since a refused declare (other arguments)
        closes the channel that asked, and that must never be the publishing channel.

        Raises:
            PublishError: the declare failed.
        """
        recorded = self.declared_arguments(name)
        arguments = arguments if recorded is None else recorded
        try:
            channel = await self.channel()
            try:
                await channel.declare_queue(name, durable=True, arguments=arguments, robust=False)
                await self.rebind_delay_route(await channel.get_underlay_channel(), name)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        except (AioqueueError, *TRANSIENT, *FATAL_CHANNEL) as exc:
            raise PublishError(f"could not declare queue {name!r} again: {exc}") from exc
        log.debug("declared queue %r on a channel of its own", name)

    async def rebind_delay_route(self, channel: aiormq.abc.AbstractChannel, name: str) -> None:
        """Bind ``name`` to the delay ladder's exit again if it was bound here: a queue deleted
        and declared again lost its bindings with it, and a delayed message meeting no binding
        is dropped by RabbitMQ. (Idempotent when the binding is still there.)"""
        if name in self._delay_routes:
            await channel.queue_bind(name, DELIVER_EXCHANGE, routing_key=deliver_pattern(name))

    def declared_arguments(self, name: str) -> dict[str, Any] | None:
        """The arguments ``name`` was declared with here, or None if it was not declared here."""
        queue = self._declared.get(name)
        return None if queue is None else dict(queue.arguments or {})

    async def probe_queue(self, name: str) -> None:
        """Raise `ChannelNotFoundEntity` unless ``name`` exists (asked on a channel of its own)."""
        await probe(self._transport(name), name)

    def _transport(self, name: str) -> aiormq.abc.AbstractConnection:
        connection = self._connection
        transport = None if connection is None else connection.transport
        if transport is None:
            raise BrokerConnectionError(f"not connected: cannot check queue {name!r}")
        return transport.connection

    async def delete_queue(self, name: str) -> None:
        """Delete a queue of ours (e.g. a finished stream)."""
        self._declared.pop(name, None)
        self._delay_routes.discard(name)
        channel = await self._channel().get_underlay_channel()
        await channel.queue_delete(name)

    hold = hold_queue  # Broker.hold: on channels of its own (aioqueue.rabbit.declare)

    async def ensure_delay_route(self, queue: str, queue_type: QueueType) -> None:
        """Declare the delay ladder of ``queue_type`` (once) and route its exit to ``queue``.

        ``queue`` must have been declared. See `aioqueue.topology` for the ladder's design.
        """
        if queue in self._delay_routes:
            return
        async with self._declare_lock:
            if queue_type not in self._ladders:
                # idempotent, so a connection lost midway (a node going) just starts it again
                await self._retrying(
                    "declaring the delay queues", lambda: self._declare_ladder(queue_type)
                )
                self._ladders.add(queue_type)
            if queue not in self._delay_routes:
                deliver = self._deliver
                assert deliver is not None
                await self._retrying(
                    f"routing delayed messages to {queue!r}",
                    lambda: self._declared[queue].bind(deliver, routing_key=deliver_pattern(queue)),
                )
                self._delay_routes.add(queue)

    async def _declare_ladder(self, queue_type: QueueType) -> None:
        channel = self._channel()
        topic = aio_pika.ExchangeType.TOPIC
        if self._deliver is None:
            self._deliver = await channel.declare_exchange(DELIVER_EXCHANGE, topic, durable=True)
        exchanges = {DELIVER_EXCHANGE: self._deliver}
        ladder = delay_ladder(queue_type)
        for exchange, *_ in ladder:
            exchanges[exchange] = await channel.declare_exchange(exchange, topic, durable=True)
        for exchange, queue, arguments, to_queue, onward in ladder:
            level = await channel.declare_queue(queue, durable=True, arguments=arguments)
            await level.bind(exchanges[exchange], routing_key=to_queue)
            await exchanges[arguments["x-dead-letter-exchange"]].bind(
                exchanges[exchange], routing_key=onward
            )

    async def queue_depth(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of an existing queue, from a passive declare."""
        channel = await self._channel().get_underlay_channel()
        ok = await channel.queue_declare(name, passive=True)
        return ok.message_count or 0, ok.consumer_count or 0

    def publish(
        self,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        exchange: str = "",
        timeout: float | None = None,
    ) -> Coroutine[Any, Any, None]:
        """Publish to the default exchange and return once RabbitMQ confirmed it.

        The message is ``mandatory``: an unroutable message is a `PublishError`, not a silent
        drop. Connection trouble is retried on the recovered channel until ``timeout``
        (default ``settings.publish_timeout``); then `PublishError`. (A plain function that
        returns the one coroutine to await: a publish in flight keeps no other alive.)
        """
        timeout = self.settings.publish_timeout if timeout is None else timeout
        loop = self._loop or asyncio.get_running_loop()
        return self._publish_until_confirmed(
            exchange, routing_key, body, properties, loop.time() + timeout, loop, timeout
        )

    async def _publish_until_confirmed(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
    ) -> None:
        """Publish until confirmed, refused, or ``deadline`` (``loop``'s time, ``timeout``
        after the start): then `PublishError`.

        The deadline is handed down instead of wrapping the whole in ``asyncio.timeout``
        (a timer per publish): `Deadlines` bounds the waits for a slot and for confirms with
        one timer, and the channel we last published on is taken as it is while open (the
        wait for a channel, bounded by a timer, only when it is not).
        """
        delay = 0.05
        robust = self._channel()
        while True:
            try:
                publisher = self._publisher
                if publisher is not None and self._publisher_ready():
                    channel = publisher.channel  # open: aio-pika would hand us the same
                else:
                    async with asyncio.timeout_at(deadline):  # it may wait for a reconnect
                        channel = cast(aiormq.Channel, await robust.get_underlay_channel())
                if not self._inflight.try_acquire():
                    await self._inflight.acquire(deadline, loop)
                try:
                    # one publish and its confirm, cancelled at the deadline (awaited here,
                    # not in a coroutine of its own: a publish in flight keeps one alive)
                    publisher = self._publisher_on(channel)
                    tag, confirm = publisher.publish(exchange, routing_key, body, properties)
                    self._deadlines.add(confirm, deadline)
                    try:
                        acked = await confirm
                    except BaseException as exc:
                        failure = unconfirmed(exc, confirm, channel)
                        if failure is exc:
                            raise
                        raise failure from None
                    finally:
                        publisher.forget(tag, properties.message_id or "")
                finally:
                    self._inflight.release()
            except Exception as exc:
                left = deadline - loop.time()
                pause = publish_retry(
                    exc, routing_key, left=left, delay=delay, timeout=timeout, describe=self._scrub
                )
                if pause is None:
                    raise
                await asyncio.sleep(pause)
                delay = min(delay * 2, 1.0)
                continue
            if not isinstance(acked, spec.Basic.Ack):
                raise PublishError(f"RabbitMQ did not confirm a message to {routing_key!r}")
            return

    def _publisher_ready(self) -> bool:
        """Whether the channel we last published on is open, so getting the channel cannot
        block: aio-pika may still call the connection connected just after that channel
        closed with it."""
        connection = self._connection
        publisher = self._publisher
        return (
            connection is not None
            and connection.connected.is_set()
            and publisher is not None
            and not publisher.channel.is_closed
        )

    def _publisher_on(self, channel: aiormq.Channel) -> ChannelPublisher:
        publisher = self._publisher
        if publisher is None or publisher.channel is not channel:
            publisher = self._publisher = ChannelPublisher(channel)
        return publisher

    async def subscribe(
        self,
        queue: str,
        callback: DeliveryCallback,
        *,
        prefetch: int,
        on_lost: LostCallback | None = None,
        arguments: ConsumeArguments | None = None,
    ) -> Subscription:
        """Consume ``queue`` with manual acks and ``prefetch`` unacked messages at most.

        ``arguments`` go with each ``basic.consume`` (a function is called afresh each time,
        again after a reconnect), e.g. ``x-stream-offset`` on a stream.

        ``on_lost(queue, exc)`` is called when the consuming channel closes under us (its
        unacked deliveries go back to the queue); the subscription then recovers by itself.
        """
        subscription = Subscription(self, queue, callback, prefetch, on_lost, arguments)
        await subscription.start()
        return subscription
