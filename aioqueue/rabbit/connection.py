"""Socket writes coalesced per event-loop iteration, frames read leniently.

aiormq's writer task hands every frame to ``StreamWriter.write`` on its own; on a busy
connection that is one ``send()`` system call per publish, ack and confirm, and one TCP segment
for RabbitMQ to read each. `CoalescingWriter` keeps what is written during one iteration of
the event loop and sends it in one write at the end of it: the same bytes, in the same order,
at most one iteration later. ``drain()`` and ``close()`` send what is pending first, so
aiormq's flow control and its ``wait=True`` operations mean what they did.

It is plugged in through aiormq's public ``transport_factory`` parameter, by the connection
class `RobustConnection` (aio-pika's, which passes its keyword arguments down to aiormq).

`RobustConnection` also knows every node of a cluster (`NodeRing`): aio-pika and aiormq take
one URL, so each connection attempt, the first and every reconnect, goes to the next node of a
ring that starts at a random node (clients spread over the cluster) and goes on through the
others at once when one refuses, like kombu's failover; aio-pika's interval only separates whole
rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import weakref
from collections.abc import Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from ..errors import BrokerConnectionError
from ..settings import Settings, broker_nodes, mask_url, scrub
from .errors import TRANSIENT
from .inbound import read_leniently
from .reader import WholeBufferReader
from .reader import install as install_reader

__all__ = [
    "CoalescingTransportFactory",
    "CoalescingWriter",
    "NodeRing",
    "RobustConnection",
    "connect",
    "plain_connection",
    "writer_for",
]

log = logging.getLogger("aioqueue.broker")


class CoalescingWriter(asyncio.StreamWriter):
    """A `StreamWriter` whose writes leave together once per event-loop iteration.

    aiormq's writer task, the one caller, writes every frame set its queue holds in one step:
    once it `follow`s that queue, the write that empties it sends at once, instead of one
    iteration later (the same batching: what is queued after it wakes the writer again)."""

    _pending: list[bytes] | None = None
    _queue: asyncio.Queue[Any] | None = None
    _loop_followed: asyncio.AbstractEventLoop | None = None  # the loop `follow` ran in

    def follow(self, queue: asyncio.Queue[Any]) -> None:
        """Send as soon as a write leaves ``queue`` (the connection's writer queue) empty; and
        take frames for this iteration's send past it while it is empty (`writer_for`)."""
        self._queue = queue
        self._loop_followed = asyncio.get_running_loop()
        _FOLLOWING[queue] = self

    def write_soon(self, data: bytes) -> None:
        """Send ``data`` with whatever else is written during this event-loop iteration (not
        through aiormq's writer queue: only while that queue is empty, so nothing of
        aiormq's is overtaken, see `aioqueue.rabbit.frames`)."""
        if self._pending is None:
            self._pending = [data]
            (self._loop_followed or asyncio.get_running_loop()).call_soon(self.flush)
        else:
            self._pending.append(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        queue = self._queue
        if queue is not None and queue.empty():  # the writer's last frame set for now: at once
            self._pending = [*(self._pending or ()), bytes(data)]
            self.flush()
        else:
            self.write_soon(bytes(data))

    def flush(self) -> None:
        """Hand what was written so far to the transport, in one write."""
        pending, self._pending = self._pending, None
        if pending:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    async def drain(self) -> None:
        self.flush()
        await super().drain()

    def close(self) -> None:
        self.flush()
        super().close()


# the writer following each connection's writer queue (weakly: a closed connection's go)
_FOLLOWING: weakref.WeakKeyDictionary[asyncio.Queue[Any], CoalescingWriter] = (
    weakref.WeakKeyDictionary()
)


def writer_for(queue: asyncio.Queue[Any]) -> CoalescingWriter | None:
    """The `CoalescingWriter` that frames for ``queue`` may be written to directly right
    now: ``queue`` is empty (everything put there before is written) and the socket is
    open. None: put them in ``queue``, as aiormq does."""
    if not queue.empty():
        return None
    writer = _FOLLOWING.get(queue)
    if writer is None or writer.transport.is_closing():
        return None
    return writer


class CoalescingTransportFactory(TransportFactory):
    """aiormq's TCP or TLS transport (by the URL's scheme) with a `CoalescingWriter`, for a
    connection that reads frames leniently (`aioqueue.rabbit.inbound`). ``writer``: the last
    one made (its connection makes it follow its writer queue once connected)."""

    writer: CoalescingWriter | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        factory = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await factory.create(url, **kwargs)
        writer.__class__ = CoalescingWriter  # same object and state, coalescing `write`
        self.writer = cast(CoalescingWriter, writer)
        reader.__class__ = WholeBufferReader  # read by `WholeBufferReceiver`, whole buffers
        install_reader()
        read_leniently()  # frames pamqp cannot read, made readable (in this connection's tasks)
        return reader, writer


# Frames parsed ahead for one channel. aiormq's default, 10, makes its connection reader hand
# over to the channel's reader task every 10 frames (3 deliveries); a read from the socket holds
# hundreds. Deliveries are bounded by prefetch and confirms by the in-flight cap anyway.
CHANNEL_FRAME_BUFFER = 512


# aio-pika's private (name-mangled) method for one connection attempt; listed in internals.py
_CONNECT_TRANSPORT = "_RobustConnection__connect_transport"


class NodeRing:
    """The nodes of one cluster, handed out in turn from a random start."""

    def __init__(self, nodes: Sequence[URL]) -> None:
        if not nodes:
            raise ValueError("no broker node")
        start = random.randrange(len(nodes))
        self._nodes = [*nodes[start:], *nodes[:start]]
        self._next = 0

    def __len__(self) -> int:
        return len(self._nodes)

    def next(self) -> URL:
        """The node to try now; the one after it next time."""
        node = self._nodes[self._next % len(self._nodes)]
        self._next += 1
        return node


class RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, its socket writes coalesced, its channels' frame
    buffers deeper (reconnects included), and every attempt made to the next node of
    ``nodes`` (default: ``url`` alone), trying the others at once if that one fails."""

    def __init__(
        self,
        url: URL,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        nodes: Sequence[URL] = (),
        **kwargs: Any,
    ):
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransportFactory()
        self.nodes = NodeRing(nodes or [URL(url)])

    async def _RobustConnection__connect_transport(self) -> None:
        # aio-pika's one connection attempt (first connect and every reconnect) connects to
        # `self.url`: an attempt of ours is a round over the nodes from the next one on
        attempt = getattr(aio_pika.RobustConnection, _CONNECT_TRANSPORT)
        for tries_left in reversed(range(len(self.nodes))):
            self.url = self.nodes.next()
            try:
                await attempt(self)
                return
            except CONNECTION_EXCEPTIONS as exc:
                if not tries_left or self.is_closed:
                    raise
                log.info("broker node %s not reachable (%s); trying the next", self, exc)

    async def _on_connected(self) -> None:
        # aio-pika opens (and after a reconnect restores) every channel through the aiormq
        # connection's `channel()`, without a way to pass its `frame_buffer_size`: give this
        # connection's method that default, before the channels are restored
        transport = self.transport
        if transport is not None:
            connection = transport.connection
            writer = self.kwargs["transport_factory"].writer
            if writer is not None:  # this connection's, just made
                writer.follow(connection.write_queue)
            connection.channel = functools.partial(  # type: ignore[method-assign]
                type(connection).channel, connection, frame_buffer_size=CHANNEL_FRAME_BUFFER
            )
        await super()._on_connected()


async def connect(url: str, settings: Settings, *, name: str) -> RobustConnection:
    """A robust connection to the broker at ``url`` (one node, or a comma-separated list of
    a cluster's nodes), retrying with back-off for ``settings.connect_timeout`` seconds.

    Raises:
        BrokerConnectionError: no node could be reached in time (the message masks passwords).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout
    delay = 0.1
    nodes = [
        node if "heartbeat" in node.query else node.update_query(heartbeat=settings.heartbeat)
        for node in map(URL, broker_nodes(url))  # the URL's own heartbeat wins
    ]
    while True:
        connection = RobustConnection(
            nodes[0],
            nodes=nodes,
            reconnect_interval=settings.reconnect_interval,
            client_properties={"connection_name": name},
            ssl_context=settings.ssl_context,
        )
        try:
            await connection.connect(timeout=max(1.0, min(10.0, deadline - loop.time())))
            return connection
        except (TimeoutError, *TRANSIENT) as exc:
            with contextlib.suppress(Exception):
                await connection.close()
            reason = scrub(f"{type(exc).__name__}: {exc}", url)
            if loop.time() + delay > deadline:
                raise BrokerConnectionError(
                    f"cannot reach the broker at {mask_url(url)} within "
                    f"{settings.connect_timeout:g}s: {reason}"
                ) from None
            log.warning("broker %s not reachable (%s); retrying", mask_url(url), reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def plain_connection(url: str | URL, *, name: str) -> aiormq.Connection:
    """An aiormq connection outside aio-pika's recovery (the scheduler's lease holds an
    exclusive queue on one, which automatic re-declaration could loop on) that reads frames
    leniently like every connection of ours: the slot records it reads are messages too. Not
    connected yet: ``await connection.connect()``."""
    return aiormq.Connection(
        url,
        client_properties={"connection_name": name},
        transport_factory=CoalescingTransportFactory(),
    )
