"""Questions about a queue asked on a short-lived channel of their own.

A passive declare of a missing queue, or a declare whose arguments differ from the queue's,
closes the channel that asked (NOT_FOUND, PRECONDITION_FAILED): these never ask on a channel
that publishes or consumes.
"""

from __future__ import annotations

import logging
from typing import Any

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractRobustChannel, AbstractRobustQueue

from ..topology import EVENTS_STREAM, INFRA_PREFIX

__all__ = ["declare", "probe", "refusal"]

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
