"""A RabbitMQ consumer that comes back after reconnects and after a server-side cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from ..broker import ConsumeArguments, Delivery, DeliveryCallback, LostCallback
from .acks import Acker
from .errors import FATAL_CHANNEL, TRANSIENT
from .reader import consume_directly, stop_consuming_directly

if TYPE_CHECKING:
    from .broker import RabbitBroker

__all__ = ["Subscription"]

log = logging.getLogger("aioqueue.broker")


class Subscription:
    """A consumer that comes back after reconnects and after a server-side cancel."""

    def __init__(
        self,
        broker: RabbitBroker,
        queue: str,
        callback: DeliveryCallback,
        prefetch: int,
        on_lost: LostCallback | None = None,
        arguments: ConsumeArguments | None = None,
    ) -> None:
        self._broker = broker
        self._arguments = arguments
        self._on_lost = on_lost
        self.queue = queue
        self._callback = callback
        self._prefetch = prefetch
        self._tag = f"aioqueue.{uuid.uuid4().hex}"
        self._channel: AbstractRobustChannel | None = None
        self._active = False
        self._recover_task: asyncio.Task[None] | None = None
        self._acker: Acker | None = None
        self._consuming_on: aiormq.Channel | None = None
        self._handling: set[asyncio.Task[None]] = set()  # direct deliveries' callbacks
        self._loop = asyncio.get_running_loop()

    async def start(self) -> None:
        self._channel = await self._broker.channel()
        self._active = True
        self._channel.reopen_callbacks.add(self._on_reopen)
        try:
            await self._channel.set_qos(prefetch_count=self._prefetch)
            await self._consume()
        except FATAL_CHANNEL:
            raise
        except TRANSIENT as exc:
            # the robust channel re-applies the QoS when it reopens, and _on_reopen consumes
            log.info("consuming %r interrupted (%s); resumes on reconnect", self.queue, exc)

    def _on_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._active or self._on_lost is None:
            return
        exc = None if closing.cancelled() else closing.exception()
        self._on_lost(self.queue, exc)

    async def _on_reopen(self, sender: Any, *_: Any) -> None:
        if self._active and sender is self._channel:
            log.info("channel of %r reopened; consuming again", self.queue)
            self._recover_soon()

    async def _consume(self, *, again: bool = False) -> None:
        assert self._channel is not None
        channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        if channel is self._consuming_on and not channel.is_closed:
            return  # already consuming on this very channel (a reopen raced a recovery)
        if again:
            # the queue may be gone (deleted, or lost by a node killed soon after its declare):
            # one declared here is declared again as it was, on this channel (the one that
            # declared it may not be restored yet); another one is probed on a channel of its own
            arguments = self._broker.declared_arguments(self.queue)
            if arguments is None:
                await self._broker.probe_queue(self.queue)
            else:
                await channel.queue_declare(self.queue, durable=True, arguments=arguments)
                await self._broker.rebind_delay_route(channel, self.queue)
        channel.on_consumer_cancel_callbacks.add(self._on_cancel)
        channel.closing.add_done_callback(self._on_close)
        self._acker = Acker(channel)
        arguments = self._arguments() if callable(self._arguments) else self._arguments
        # read straight from the connection's frames (`aioqueue.rabbit.reader`); aiormq's
        # consumer below gets what that does not take
        consume_directly(channel, self._tag, self._on_direct)
        await channel.basic_consume(
            self.queue,
            self._on_message,
            no_ack=False,
            consumer_tag=self._tag,
            arguments=arguments,
        )
        self._consuming_on = channel

    def _on_cancel(self, frame: Any) -> Awaitable[None] | None:
        if getattr(frame, "consumer_tag", None) != self._tag or not self._active:
            return None
        if isinstance(frame, spec.Basic.CancelOk):
            return None
        log.warning("consumer of %r cancelled by the server; re-consuming", self.queue)
        self._consuming_on = None
        self._recover_soon()
        return None

    def _recover_soon(self) -> None:
        """Consume again in one task of our own, whatever asked (a reopen, a server cancel).

        Not inside aio-pika's reopen callback: aio-pika drops that callback's exception, and a
        refusal there (the queue is missing after a node restart) would leave the subscription
        silently dead.
        """
        if self._recover_task is None or self._recover_task.done():
            self._recover_task = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay = 0.2
        while self._active:
            try:
                await self._consume(again=True)
                return
            except Exception as exc:
                log.warning(
                    "consuming %r again failed (%s); retrying in %.1fs", self.queue, exc, delay
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_direct(
        self, deliver: spec.Basic.Deliver, properties: spec.Basic.Properties, body: bytes
    ) -> None:
        assert self._acker is not None  # made before the consumer is registered
        self._spawn(self._delivery(deliver, properties, body, self._acker))

    def _spawn(self, delivery: Delivery) -> None:
        """The callback for ``delivery``; what it returns to await in a task of its own (the
        broker seam's promise): nothing cancels it when its channel closes."""
        try:
            pending = self._callback(delivery)
        except Exception:  # a consumer's bug must not end the connection's reader
            log.exception("consumer of %r failed", self.queue)
            return
        if pending is None:  # handled at once
            return
        # `ensure_future` would look the loop up again (a system call, to check the process)
        loop = self._loop
        if asyncio.iscoroutine(pending):
            task = loop.create_task(pending)
        else:
            task = asyncio.ensure_future(pending, loop=loop)
        self._handling.add(task)
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("consumer of %r failed", self.queue, exc_info=task.exception())

    async def _on_message(self, message: DeliveredMessage) -> None:
        """A delivery `aioqueue.rabbit.reader` did not take (aiormq's consumer path, in a
        task aiormq cancels when the channel closes: the callback gets one of its own)."""
        deliver = message.delivery
        assert isinstance(deliver, spec.Basic.Deliver)
        acker = self._acker or Acker(cast(aiormq.Channel, message.channel))
        self._spawn(self._delivery(deliver, message.header.properties, message.body, acker))

    def _delivery(
        self,
        deliver: spec.Basic.Deliver,
        properties: spec.Basic.Properties,
        body: bytes,
        acker: Acker,
    ) -> Delivery:
        return Delivery(
            body=body,
            properties=properties,
            redelivered=bool(deliver.redelivered),
            queue=self.queue,
            delivery_tag=deliver.delivery_tag or 0,
            acker=acker,
        )

    async def cancel(self) -> None:
        """Stop new deliveries; deliveries in hand can still be settled."""
        self._active = False
        stop_consuming_directly(self._tag)
        if self._recover_task is not None:
            self._recover_task.cancel()
        if self._channel is None:
            return
        with contextlib.suppress(*TRANSIENT, asyncio.TimeoutError):
            channel = await self._channel.get_underlay_channel()
            await channel.basic_cancel(self._tag, timeout=5)

    async def close(self) -> None:
        await self.cancel()
        if self._acker is not None:
            await self._acker.flush()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
