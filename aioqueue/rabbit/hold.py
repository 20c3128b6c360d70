"""Messages held unacked on a channel of their own: how workflows keep their state in RabbitMQ.

A group's or chord's results wait in a queue, and a token message in another queue is a lock:
whoever holds it (``basic.get`` without an ack) is the only one joining, and the token comes back
by itself when the holder's channel or connection dies. `hold` gives a queue's ready count (from
a passive declare) and up to ``limit`` of its messages; what the block did not ack goes back to
the queue when the block ends (the channel is closed). A queue that does not exist gives None:
its passive declare closes only this channel of its own, never the publishing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from pamqp import commands as spec

from ..broker import HeldQueue

__all__ = ["hold"]


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
