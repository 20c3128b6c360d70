"""The RabbitMQ operations of aioqueue's tools: queue depths, purges, messages held for review.

`aioqueue status`, `aioqueue purge`, `aioqueue dlq` and the Prometheus collector reach RabbitMQ
through these functions only. Each works on channels of its own: a passive declare of a queue
that does not exist makes RabbitMQ close the channel that asked, and that must never be the
publishing channel.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from pamqp import commands as spec

from .broker import RabbitBroker

__all__ = ["HeldMessage", "held_messages", "purge_queue", "queue_depths"]


async def queue_depths(
    broker: RabbitBroker, names: Iterable[str]
) -> dict[str, tuple[int, int] | None]:
    """``{queue: (messages ready, consumers)}`` from passive declares; None for a queue that
    does not exist. Creates nothing."""
    depths: dict[str, tuple[int, int] | None] = {}
    channel: AbstractRobustChannel | None = None
    try:
        for name in names:
            if channel is None:
                channel = await broker.channel()
            try:
                queue = await channel.declare_queue(name, passive=True, robust=False)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                depths[name] = None
                await channel.close()  # closed by the broker; also stops its reopening
                channel = None
                continue
            ok = queue.declaration_result
            depths[name] = (ok.message_count or 0, ok.consumer_count or 0)
    finally:
        if channel is not None:
            await channel.close()
    return depths


async def purge_queue(broker: RabbitBroker, name: str) -> int | None:
    """Delete the ready messages of ``name``: how many, or None if it does not exist."""
    channel = await broker.channel()
    try:
        try:
            queue = await channel.declare_queue(name, passive=True, robust=False)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        purged = await queue.purge()
        return purged.message_count or 0
    finally:
        if not channel.is_closed:
            await channel.close()


@dataclass(frozen=True)
class HeldMessage:
    """A message taken from a queue and held unacked: `ack` removes it, else it goes back."""

    body: bytes
    properties: spec.Basic.Properties
    _message: AbstractIncomingMessage

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> HeldMessage:
        return cls(body=message.body, properties=message.properties, _message=message)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    async def ack(self) -> None:
        await self._message.ack()


@contextlib.asynccontextmanager
async def held_messages(
    broker: RabbitBroker, queue: str, limit: int
) -> AsyncIterator[list[HeldMessage] | None]:
    """Up to ``limit`` messages of ``queue``, held unacked for the block (None: no such queue).

    What the block did not `HeldMessage.ack` goes back to the queue when it ends.
    """
    channel = await broker.channel()
    try:
        try:
            source = await channel.get_queue(queue, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            yield None
            return
        held: list[HeldMessage] = []
        for _ in range(limit):
            message = await source.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(HeldMessage.of(message))
        yield held
    finally:
        if not channel.is_closed:
            await channel.close()  # what was held and not acked goes back, unacked
