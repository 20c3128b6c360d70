"""The scheduler's lease in RabbitMQ: an exclusive queue held by a plain (non-robust) connection.

``aioqueue.scheduler.<app>.lease`` is declared ``exclusive``: RabbitMQ lets exactly one
connection hold it, refuses it to every other one (``RESOURCE_LOCKED``) and deletes it the moment
the holder's connection closes — when the process exits or is killed (the kernel closes its
socket), or, if its machine or network is lost, when the AMQP heartbeat times out. On a cluster
the lease lives on the node the leader is connected to (an exclusive queue is not replicated):
if that node goes, so does the leader's connection, and another instance leads from another
node. Each new connection goes to the next node of the broker URL's list (`NodeRing`).

The connection is a plain aiormq connection, outside aio-pika's ``connect_robust``, which would
re-declare the queue after a reconnect and could loop on ``RESOURCE_LOCKED``. Losing it means
losing the lease: the scheduler stops firing and campaigns again on a fresh connection.

Each ``RESOURCE_LOCKED`` refusal is logged by RabbitMQ as an error, so followers do not poll the
lease itself. The leader also consumes ``aioqueue.scheduler.<app>.leader`` (a durable queue no one
publishes to); followers re-declare that queue every ``poll_interval`` — which returns its
consumer count without an error — and try for the lease only when the count is zero.

Fencing: the leader fires each slot through this connection, on a channel with publisher
confirms (see ``slots.py``); a publish RabbitMQ confirmed was taken while the connection, and so
the lease, was alive. A leader that lost the connection cannot fire any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any, Final

import aiormq
import aiormq.abc
from pamqp import commands as spec
from yarl import URL

from ..errors import BrokerConnectionError
from ..scheduler.records import (
    LeaseLost,
    describe_error,
    leader_queue_arguments,
    leader_queue_name,
    lease_queue_name,
)
from ..settings import broker_nodes, mask_url, scrub
from ..topology import QueueType
from .connection import NodeRing, plain_connection

__all__ = ["CONNECTION_ERRORS", "Lease"]

log = logging.getLogger("aioqueue.scheduler")

# Trouble with the connection or a channel: reconnect and campaign again.
CONNECTION_ERRORS: Final = (
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
)


class Lease:
    """One attempt at leadership: a connection that campaigns, then holds the lease.

    Args:
        url: The broker URL.
        app_name: Whose scheduler this is (names the queues).
        identity: This instance's name, shown as the connection name.
        poll_interval: Seconds between a follower's looks for a free lease.
        heartbeat: AMQP heartbeat of the connection, in seconds: a leader whose machine or
            network vanished loses the lease after about two to three of them.
        timeout: Seconds any single broker operation may take.
        queue_type: Type of the followers' beacon queue (the app's).
        role: What the leader does; names the queues (``"scheduler"``, or ``"ratelimit"``
            for the rate limits' pacer: ``aioqueue.ratelimit.<app>.lease``).
    """

    def __init__(
        self,
        url: str,
        app_name: str,
        *,
        identity: str,
        poll_interval: float = 0.5,
        heartbeat: int = 5,
        timeout: float = 10.0,
        queue_type: QueueType = "classic",
        role: str = "scheduler",
    ) -> None:
        self._url = url
        self._role = role
        self._nodes = NodeRing([URL(node) for node in broker_nodes(url)])
        self._beacon_arguments = leader_queue_arguments(queue_type)
        self._app_name = app_name
        self._identity = identity
        self.poll_interval = poll_interval
        self.heartbeat = heartbeat
        self.timeout = timeout
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._probe: aiormq.abc.AbstractChannel | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._publisher: aiormq.abc.AbstractChannel | None = None

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        name = lease_queue_name(self._app_name, self._role)
        return f"<Lease {name} {state} at {mask_url(self._url)}>"

    @property
    def held(self) -> bool:
        """Whether this lease's connection holds the lease and is still open."""
        parts = (self._connection, self._channel, self._publisher)
        return all(part is not None and not part.is_closed for part in parts)

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        """The leader's plain channel (declare, get, ack); `LeaseLost` once the lease is gone."""
        self.check()
        assert self._channel is not None
        return self._channel

    @property
    def publisher(self) -> aiormq.abc.AbstractChannel:
        """The leader's channel with publisher confirms (fires); `LeaseLost` once the lease is
        gone."""
        self.check()
        assert self._publisher is not None
        return self._publisher

    def check(self) -> None:
        """Raise `LeaseLost` unless the lease is held right now."""
        if not self.held:
            raise LeaseLost(f"lost the lease {lease_queue_name(self._app_name, self._role)}")

    def contended(self) -> bool:
        """Whether another instance may hold the lease: unless held here, a follower learns
        it only by polling, so yes (for the in-memory broker's idle check; unused here)."""
        return not self.held

    async def connect(self, timeout: float) -> None:
        """Open the connection, retrying for ``timeout`` seconds, then `BrokerConnectionError`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.1
        while True:
            try:
                await self._probe_channel()
                return
            except CONNECTION_ERRORS as exc:
                await self.release()
                if loop.time() + delay > deadline:
                    raise BrokerConnectionError(
                        f"cannot reach the broker at {mask_url(self._url)} within {timeout:g}s: "
                        f"{self.describe(exc)}"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def acquire(self) -> None:
        """Return once this connection holds the lease, (re)connecting as needed."""
        delay = 0.2
        while True:
            try:
                if await self._try_acquire():
                    return
                delay = 0.2
                await asyncio.sleep(self.poll_interval * random.uniform(0.8, 1.2))
            except CONNECTION_ERRORS as exc:
                log.warning(
                    "%s lease: broker unavailable (%s); retrying", self._role, self.describe(exc)
                )
                await self.release()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def describe(self, exc: BaseException) -> str:
        """``describe_error(exc)`` with any broker URL in it masked."""
        return scrub(describe_error(exc), self._url)

    def _connect_url(self) -> URL:
        url = self._nodes.next()
        if "heartbeat" not in url.query:
            url = url.update_query(heartbeat=str(self.heartbeat))
        return url

    async def wait_lost(self) -> None:
        """Return when the lease connection or its channel closes."""
        if not self.held:
            return
        parts = (self._connection, self._channel, self._publisher)
        observers = [part.closing for part in parts if part is not None]
        try:
            await asyncio.wait(observers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for observer in observers:
                observer.cancel()

    async def release(self) -> None:
        """Close the connection: the lease, if held, is free for another instance at once."""
        connection, self._connection = self._connection, None
        self._probe = self._channel = self._publisher = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self.timeout)

    async def _try_acquire(self) -> bool:
        leader_queue = leader_queue_name(self._app_name, self._role)
        ok = await self.declare(leader_queue, self._beacon_arguments)
        if ok.consumer_count:
            return False
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False, timeout=self.timeout)
        try:
            await channel.queue_declare(
                lease_queue_name(self._app_name, self._role), exclusive=True, timeout=self.timeout
            )
        except aiormq.exceptions.ChannelLockedResource:
            return False  # another instance was quicker
        await channel.basic_consume(leader_queue, _ignore, no_ack=True, timeout=self.timeout)
        publisher = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True, timeout=self.timeout
        )
        self._channel, self._publisher = channel, publisher
        return True

    async def declare(self, queue: str, arguments: dict[str, Any]) -> spec.Queue.DeclareOk:
        """Declare a durable ``queue`` on the probe channel, whose loss costs nothing: one that
        exists with other arguments (declared by an older version, or classic before the app
        went quorum) is used as it is, with a warning, rather than failing every term."""
        try:
            return await (await self._probe_channel()).queue_declare(
                queue, durable=True, arguments=arguments, timeout=self.timeout
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning("scheduler: using %r as it is (%s)", queue, exc)
        return await (await self._probe_channel()).queue_declare(
            queue, passive=True, timeout=self.timeout
        )

    async def _probe_channel(self) -> aiormq.abc.AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            name = f"aioqueue {self._app_name} {self._role} lease {self._identity}"
            self._connection = plain_connection(self._connect_url(), name=name)
            self._probe = None
            await asyncio.wait_for(self._connection.connect(), self.timeout)
        if self._probe is None or self._probe.is_closed:
            self._probe = await self._connection.channel(
                publisher_confirms=False, timeout=self.timeout
            )
        return self._probe


async def _ignore(message: Any) -> None:
    """The beacon queue never has messages; its consumer only marks the leader."""
