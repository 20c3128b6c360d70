"""The broker seam: what the app, the worker and the results need of a broker.

Two brokers implement `Broker`: `aioqueue.rabbit.RabbitBroker` (RabbitMQ through aio-pika, with
aiormq on the per-message path) and `aioqueue.memory.MemoryBroker` (this process's memory, for
users' tests). Deliveries from either arrive as light `Delivery` objects, settled with `settle`
on the channel they came from. A delivery whose channel died is redelivered by RabbitMQ anyway,
so its stale ack is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from pamqp import commands as spec

from .settings import Settings
from .topology import QueueType

__all__ = [
    "Broker",
    "ConsumeArguments",
    "Consumer",
    "Delivery",
    "DeliveryCallback",
    "Held",
    "HeldQueue",
    "HoldContext",
    "LostCallback",
    "Settler",
    "StaleDelivery",
    "ack_soon",
    "run_callback",
    "settle",
]

log = logging.getLogger("aioqueue.broker")


class StaleDelivery(Exception):
    """A settle that cannot reach the broker: the delivery's channel is gone, and the broker
    redelivers the message anyway. `settle` drops it; a `Settler` raises it."""


class Settler(Protocol):
    """Settles the deliveries of one channel (`aioqueue.rabbit.acks.Acker` on RabbitMQ).

    A settle on a channel that is gone raises `StaleDelivery`."""

    def ack(self, tag: int) -> None: ...
    async def ack_now(self, tag: int) -> None: ...
    async def reject(self, tag: int, *, requeue: bool, flush: bool = False) -> None: ...
    async def flush(self) -> None: ...


class Consumer(Protocol):
    """A running subscription: `cancel` stops deliveries, `close` also releases the channel."""

    queue: str

    async def cancel(self) -> None: ...
    async def close(self) -> None: ...


@dataclass(slots=True)
class Delivery:
    """One message delivered to a consumer; settle it with the broker that delivered it."""

    body: bytes
    properties: spec.Basic.Properties
    redelivered: bool
    queue: str
    delivery_tag: int
    acker: Settler


class Held(Protocol):
    """A message taken from a queue and held unacked (`Broker.hold`): `ack` removes it."""

    @property
    def body(self) -> bytes: ...
    @property
    def properties(self) -> spec.Basic.Properties: ...
    async def ack(self) -> None: ...


@dataclass(slots=True)
class HeldQueue:
    """What `Broker.hold` gives: the queue's ready count when asked, and the messages held."""

    ready: int
    messages: Sequence[Held]


HoldContext = AbstractAsyncContextManager[HeldQueue | None]  # what `Broker.hold` returns
# Called with each delivery. What it returns to await runs in a task of its own, which no
# broker cancels (a closing channel included): the callback may run the whole delivery in it.
# A callback that returns None handled the delivery at once (settled it, or will): a broker may
# then make no task for it (the reply consumer: one event-loop hop less per reply).
DeliveryCallback = Callable[[Delivery], Awaitable[None] | None]
LostCallback = Callable[[str, BaseException | None], None]
# ``basic.consume`` arguments (e.g. ``x-stream-offset`` on a stream), or a function giving them
# afresh each time the consumer starts (again after a reconnect: a stream reader resumes after
# the last offset it saw)
ConsumeArguments = dict[str, Any] | Callable[[], dict[str, Any]]


class Broker(Protocol):
    """The one seam: what the app, the worker and the results need from a broker.

    `aioqueue.rabbit.RabbitBroker` is the real one; `aioqueue.memory.MemoryBroker` keeps all in
    memory for users' tests (``App(..., broker_url="memory://")``).
    """

    settings: Settings

    @property
    def url(self) -> str: ...
    @property
    def connected(self) -> bool: ...
    def now(self) -> float: ...  # the broker's time, for expires/eta (a VirtualClock in memory)
    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    def is_declared(self, name: str) -> bool: ...
    async def declare_queue(self, name: str, arguments: dict[str, Any]) -> None: ...
    async def redeclare_queue(self, name: str, arguments: dict[str, Any]) -> None: ...
    async def ensure_delay_route(self, queue: str, queue_type: QueueType) -> None: ...
    async def delete_queue(self, name: str) -> None: ...
    def hold(self, name: str, limit: int) -> HoldContext:
        """``name``'s ready count and up to ``limit`` of its messages, held unacked for the
        block (what is not acked goes back when it ends); None if ``name`` does not exist."""
        ...

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        exchange: str = "",
        timeout: float | None = None,
    ) -> None: ...
    async def subscribe(
        self,
        queue: str,
        callback: DeliveryCallback,
        *,
        prefetch: int,
        on_lost: LostCallback | None = None,
        arguments: ConsumeArguments | None = None,
    ) -> Consumer: ...


async def run_callback(callback: DeliveryCallback, delivery: Delivery) -> None:
    """``callback(delivery)``, and what it returns to await, if anything: for a broker that
    runs every callback in a task."""
    pending = callback(delivery)
    if pending is not None:
        await pending


def ack_soon(delivery: Delivery) -> None:
    """Ack a delivery with the acks of this event-loop iteration (batched, see
    `aioqueue.rabbit.acks`), without awaiting anything; a stale one is dropped."""
    try:
        delivery.acker.ack(delivery.delivery_tag)
    except StaleDelivery as exc:
        _dropped(delivery, exc)


async def settle(
    delivery: Delivery, *, ack: bool, requeue: bool = False, flush: bool = False
) -> None:
    """Ack (or reject) a delivery on its own channel; a stale one is dropped, never raised.

    Acks are batched per channel (`ack_soon`); ``flush`` sends this one on its own and waits
    until it is written to the socket.
    """
    if ack and not flush:
        ack_soon(delivery)
        return
    try:
        if ack:
            await delivery.acker.ack_now(delivery.delivery_tag)
        else:
            await delivery.acker.reject(delivery.delivery_tag, requeue=requeue, flush=flush)
    except StaleDelivery as exc:
        _dropped(delivery, exc)


def _dropped(delivery: Delivery, exc: StaleDelivery) -> None:
    log.debug(
        "dropped stale settle of delivery %s on %r (%s): RabbitMQ redelivers it",
        delivery.delivery_tag,
        delivery.queue,
        exc,
    )
