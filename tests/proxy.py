"""A small TCP proxy of the tests' own, to break connections between clients and the broker.

``toxiproxy`` is not available here, so this is the part of it the tests need, in asyncio::

    async with Proxy(rabbit.port) as proxy:
        url = proxy.url(rabbit.url)       # the broker URL, through the proxy
        proxy.blackhole()                 # stop forwarding both ways; sockets stay open
        proxy.delay(0.2)                  # forward again, 200 ms late per chunk
        proxy.passthrough()               # forward at once again
        n = proxy.linked                  # connections linked to the broker so far
        proxy.reset()                     # RST every connection (SO_LINGER 0), both sides
        await proxy.wait_linked(after=n)  # until a client is linked to the broker again

Blackholed data is held, not dropped (TCP would retransmit it through a short partition):
when the proxy passes again it flows on, unless a peer gave up on the connection meanwhile.
New connections are accepted in every mode and then treated like the old ones. ``accepted``
counts client connections the moment they arrive; ``linked`` counts those whose upstream
connection to the broker was made (only those can be reset): wait on ``linked``, not
``accepted``, before a `reset` that must find a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType

from tests.rabbit import free_port
from tests.waiting import wait_until

__all__ = ["Proxy"]

CHUNK = 64 * 1024


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = free_port(exclude=frozenset({target_port}))
        self.accepted = 0  # client connections accepted (the upstream may not exist yet)
        self.linked = 0  # of those, linked to the broker: in `connections` until they close
        self._server: asyncio.Server | None = None
        self._passing = asyncio.Event()
        self._passing.set()
        self._delay = 0.0
        self._links: set[_Link] = set()

    def __repr__(self) -> str:
        return f"<Proxy :{self.port} -> {self.target_host}:{self.target_port} {self.mode}>"

    @property
    def mode(self) -> str:
        if not self._passing.is_set():
            return "blackhole"
        return f"delay {self._delay:g}s" if self._delay else "pass"

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    def url(self, broker_url: str) -> str:
        """``broker_url`` with its port replaced by the proxy's."""
        return broker_url.replace(f":{self.target_port}/", f":{self.port}/", 1)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- modes ----------------------------------------------------------------------------

    def passthrough(self) -> None:
        """Forward everything at once (and release what a blackhole held)."""
        self._delay = 0.0
        self._passing.set()

    def blackhole(self) -> None:
        """Stop forwarding in both directions, keeping every socket open."""
        self._passing.clear()

    def delay(self, seconds: float) -> None:
        """Forward each chunk ``seconds`` late (both directions)."""
        self._delay = seconds
        self._passing.set()

    async def wait_linked(self, *, after: int, timeout: float = 30.0) -> None:
        """Wait until a connection linked after the ``after``-th one is open through the proxy
        (`AssertionError` after ``timeout`` seconds)."""
        await wait_until(
            lambda: any(link.serial > after and not link.closed for link in self._links),
            timeout=timeout,
            what=f"a connection linked through {self!r} (linked so far: {after})",
        )

    def reset(self) -> int:
        """Abort every connection with a TCP RST on both sides; returns how many."""
        links = list(self._links)
        for link in links:
            link.abort()
        return len(links)

    # -- forwarding -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _abort(writer)
            return
        self.linked += 1
        link = _Link(writer, up_writer, self.linked)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, link), self._pump(up_reader, writer, link)
            )
        finally:
            self._links.discard(link)
            link.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while not link.closed:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                # Whatever happened on this side (data, EOF, a reset) passes the gate first:
                # during a blackhole the other side learns nothing, as in a real partition.
                await self._passing.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)  # sleep-ok: the injected delay
                    await self._passing.wait()
                if not data or link.closed:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            link.close()


class _Link:
    """A client connection and its upstream connection to the broker."""

    def __init__(
        self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter, serial: int
    ) -> None:
        self.client = client
        self.serial = serial  # the how-manieth link of its proxy
        self.upstream = upstream
        self.closed = False

    def abort(self) -> None:
        self.closed = True
        _abort(self.client)
        _abort(self.upstream)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for writer in (self.client, self.upstream):
                with contextlib.suppress(Exception):
                    writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a RST: SO_LINGER on, timeout 0, then drop the socket without a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
