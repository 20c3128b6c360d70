"""Socket writes coalesced per event-loop iteration, through aiormq's transport factory.

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
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

__all__ = ["CoalescingTransportFactory", "CoalescingWriter", "RobustConnection"]


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
    """aiormq's TCP or TLS transport (by the URL's scheme) with a `CoalescingWriter`."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        factory = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await factory.create(url, **kwargs)
        writer.__class__ = CoalescingWriter  # same object and state, coalescing `write`
        return reader, writer


class RobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, its socket writes coalesced (reconnects included)."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any):
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = CoalescingTransportFactory()
