"""Questions about a queue asked on a channel of their own, and messages held on one.

A passive declare of a missing queue, or a declare whose arguments differ from the queue's,
closes the channel that asked (NOT_FOUND, PRECONDITION_FAILED): these never ask on a channel
that publishes or consumes.

`hold` (`Broker.hold`): how workflows keep their state in RabbitMQ. A group's or chord's
results wait in a queue, and a token message in another queue is a lock: whoever holds it
(``basic.get`` without an ack) is the only one joining, and the token comes back by itself when
the holder's channel or connection dies. `hold` gives a queue's ready count (from a passive
declare) and up to ``limit`` of its messages; what the block did not ack goes back to the queue
when the block ends (the channel is closed). A queue that does not exist gives None.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from pamqp import commands as spec

from ..broker import HeldQueue, HoldContext
from ..topology import EVENTS_STREAM, INFRA_PREFIX

__all__ = ["declare", "hold", "hold_queue", "probe", "refusal"]

log = logging.getLogger("aioqueue.broker")


async def declare(
    channel: AbstractRobustChannel,
    connection: aiormq.abc.AbstractConnection,
    name: str,
    arguments: dict[str, Any],
) -> AbstractRobustQueue:
    """Declare durable queue ``name`` on the robust ``channel`` (re-declared after reconnects).

    A work queue (or its ``.dlq``) may have been declared first by another client with
    arguments of its own (a Celery producer's ``x-max-priority``): asked first on a channel of
    its own, such a queue is used as it is, with a warning, rather than the refusal closing
    ``channel``. aioqueue's own queues (``aioqueue.*``) are declared by aioqueue only, but
    the event stream is shared by every process of a vhost, whose settings (its retention)
    may differ: the first declaration's arguments stay, the others use it as it is.
    """
    refused = None
    if not name.startswith(INFRA_PREFIX) or name == EVENTS_STREAM:
        refused = await refusal(connection, name, arguments)
    if refused is None:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    else:
        log.warning(
            "queue %r exists with other arguments than aioqueue's %s: used as it is (%s)",
            name,
            arguments,
            refused,
        )
        queue = await channel.declare_queue(name, passive=True)
    return queue


async def probe(connection: aiormq.abc.AbstractConnection, name: str) -> None:
    """Raise `aiormq.exceptions.ChannelNotFoundEntity` unless queue ``name`` exists."""
    channel = await connection.channel()  # plain aiormq: nothing to restore
    try:
        await channel.queue_declare(name, passive=True)
    finally:
        if not channel.is_closed:
            await channel.close()


async def refusal(
    connection: aiormq.abc.AbstractConnection, name: str, arguments: dict[str, Any]
) -> str | None:
    """Why RabbitMQ refuses to declare durable queue ``name`` with ``arguments`` (it exists
    with others: declared first by another client, e.g. a Celery producer), or None when it
    accepts (the queue exists alike, or is made now)."""
    channel = await connection.channel()
    try:
        await channel.queue_declare(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        return str(exc)
    finally:
        if not channel.is_closed:
            await channel.close()
    return None


# -- messages held on a channel of their own (workflows) --------------------------------------


class _Held:
    """One message held unacked on the hold's channel."""

    __slots__ = ("_message", "body", "properties")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self._message = message
        self.body: bytes = message.body
        self.properties: spec.Basic.Properties = message.properties

    async def ack(self) -> None:
        await self._message.ack()


OpenChannel = Callable[[], Awaitable[AbstractRobustChannel]]
# a few channels per connection kept for counts alone (``limit=0``: every member of a group asks
# once): opening one per question costs three round trips and aio-pika's channel set-up, and
# one channel answers one question at a time
COUNTING_CHANNELS = 4
_counting: weakref.WeakKeyDictionary[object, list[asyncio.Future[AbstractRobustChannel] | None]] = (
    weakref.WeakKeyDictionary()
)
_turn = itertools.count()


async def _ready(open_channel: OpenChannel, name: str) -> int | None:
    owner = getattr(open_channel, "__self__", open_channel)
    pool = _counting.setdefault(owner, [None] * COUNTING_CHANNELS)
    slot = next(_turn) % COUNTING_CHANNELS
    pending = pool[slot]
    if pending is None or (pending.done() and (pending.exception() or pending.result().is_closed)):
        pending = pool[slot] = asyncio.ensure_future(open_channel())
    channel = await asyncio.shield(pending)
    try:
        ok = await (await channel.get_underlay_channel()).queue_declare(name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        if pool[slot] is pending:
            pool[slot] = None
        with contextlib.suppress(Exception):
            await channel.close()  # closed by the broker; also stops its reopening
        return None
    return ok.message_count or 0


@contextlib.asynccontextmanager
async def hold(open_channel: OpenChannel, name: str, limit: int) -> AsyncIterator[HeldQueue | None]:
    """``name``'s ready count and up to ``limit`` of its messages, held for the block."""
    if limit <= 0:
        ready = await _ready(open_channel, name)
        yield None if ready is None else HeldQueue(ready, [])
        return
    channel = await open_channel()
    try:
        try:
            queue = await channel.declare_queue(name, passive=True, robust=False)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            yield None
            return
        ready = queue.declaration_result.message_count or 0
        held: list[_Held] = []
        for _ in range(min(limit, ready)):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(_Held(message))
        yield HeldQueue(ready, held)
    finally:
        if not channel.is_closed:
            await channel.close()  # what was held and not acked goes back, unacked


class _Channels(Protocol):
    async def channel(self, *, publisher_confirms: bool = False) -> AbstractRobustChannel: ...


def hold_queue(broker: _Channels, name: str, limit: int) -> HoldContext:
    """`Broker.hold` of a `RabbitBroker` (its method): `hold` on the broker's channels."""
    return hold(broker.channel, name, limit)
