"""Socket writes coalesced per event-loop iteration, frames read leniently.

aiormq's writer task hands every frame to ``StreamWriter.write`` on its own; on a busy
connection that is one ``send()`` system call per publish, ack and confirm, and one TCP segment
for RabbitMQ to read each. `CoalescingWriter` keeps what is written during one iteration of
the event loop and sends it in one write at the end of it: the same bytes, in the same order,
at most one iteration later. ``drain()`` and ``close()`` send what is pending first, so
aiormq's flow control and its ``wait=True`` operations mean what they did.

It is plugged in through aiormq's public ``transport_factory`` parameter, by the connection
class `RobustConnection` (aio-pika's, which passes its keyword arguments down to aiormq).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import aio_pika
import aiormq
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from .inbound import read_leniently

__all__ = [
    "CoalescingTransportFactory",
    "CoalescingWriter",
    "RobustConnection",
    "plain_connection",
]


class CoalescingWriter(asyncio.StreamWriter):
    """A `StreamWriter` whose writes leave together once per event-loop iteration."""

    _pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._pending.append(bytes(data))

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


class CoalescingTransportFactory(TransportFactory):
    """aiormq's TCP or TLS transport (by the URL's scheme) with a `CoalescingWriter`, for a
    connection that reads frames leniently (`aioqueue.rabbit.inbound`)."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        factory = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await factory.create(url, **kwargs)
        writer.__class__ = CoalescingWriter  # same object and state, coalescing `write`
        read_leniently()  # frames pamqp cannot read, made readable (in this connection's tasks)
        return reader, writer


# Frames parsed ahead for one channel. aiormq's default, 10, makes its connection reader hand
# over to the channel's reader task every 10 frames (3 deliveries); a read from the socket holds
# hundreds. Deliveries are bounded by prefetch and confirms by the in-flight cap anyway.
CHANNEL_FRAME_BUFFER = 512


class RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, its socket writes coalesced and its channels' frame
    buffers deeper (reconnects included)."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any):
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransportFactory()

    async def _on_connected(self) -> None:
        # aio-pika opens (and after a reconnect restores) every channel through the aiormq
        # connection's `channel()`, without a way to pass its `frame_buffer_size`: give this
        # connection's method that default, before the channels are restored
        transport = self.transport
        if transport is not None:
            connection = transport.connection
            connection.channel = functools.partial(  # type: ignore[method-assign]
                type(connection).channel, connection, frame_buffer_size=CHANNEL_FRAME_BUFFER
            )
        await super()._on_connected()


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
