"""``lean``: the thinnest client this machine can run, to measure what RabbitMQ itself allows.

Not a product and not a baseline to beat: a yardstick. Issue 20's targets are ratios to `raw`
("half the broker's limit"); this shows where the broker's limit is on the machine at hand, with
a client that does next to nothing in Python. One `asyncio.Protocol` per process, frames built
and parsed with `struct` (pamqp only for the connection handshake), one write per event-loop
iteration, and the same wire guarantees as aioqueue's hot path:

- tasks published persistent to a durable queue, each awaited until RabbitMQ confirmed it;
- the worker acks a task only after its reply (if any) was confirmed, acks batched with
  ``multiple`` over unbroken runs, prefetch as `raw` has it (100; 1,000 for fire);
- replies persistent, to a durable reply queue of the producer's that expires when unused, and
  acked there (batched the same way), matched by correlation id.

What it leaves out, and aioqueue does not: task events, an envelope (ids, attempts, deadlines,
retries), argument checks, timeouts, reconnection, cancellation, tracing, signing, metrics.
So `lean` is an upper bound for any client with these guarantees on this broker and machine,
not a fair competitor.

The message format is `raw`'s (``{"task": name, "args": [...]}`` in, ``{"value": ...}`` back),
and so are the three tasks (noop, fire, executed).

Worker: ``python -m bench.lean AMQP_URL QUEUE`` (prints ``lean worker ready`` on stderr;
SIGTERM stops it).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import struct
import sys
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from pamqp import commands, frame, header

from .loop import run
from .procs import RAW_PREFETCH_ENV
from .raw import RawWorker

__all__ = ["LeanClient", "serve"]

_FRAME = struct.Struct(">BHI")
_METHOD = struct.Struct(">HH")
_ACK = struct.Struct(">BHIHHQBB")  # a whole Basic.Ack frame, end octet included
_DELIVER_TAG = struct.Struct(">QB")
_HEADER = struct.Struct(">HHQH")
_FRAME_END = b"\xce"
_JSON = b"application/json"
_PERSISTENT = 2


def _short(value: bytes) -> bytes:
    return bytes((len(value),)) + value


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + _FRAME_END


def publish_frames(
    channel: int,
    routing_key: bytes,
    body: bytes,
    *,
    delivery_mode: int,
    correlation_id: bytes,
    reply_to: bytes = b"",
) -> bytes:
    """Basic.Publish to the default exchange, its content header and its body, as bytes."""
    method = _METHOD.pack(60, 40) + b"\x00\x00\x00" + _short(routing_key) + b"\x00"
    flags = 0x8000 | 0x1000 | 0x0400  # content_type, delivery_mode, correlation_id
    props = _short(_JSON) + bytes((delivery_mode,)) + _short(correlation_id)
    if reply_to:
        flags |= 0x0200
        props += _short(reply_to)
    head = _HEADER.pack(60, 0, len(body), flags) + props
    return _frame(1, channel, method) + _frame(2, channel, head) + _frame(3, channel, body)


class _Delivery:
    __slots__ = ("body", "correlation_id", "reply_to", "size", "tag")

    def __init__(self, tag: int) -> None:
        self.tag = tag
        self.correlation_id = b""
        self.reply_to = b""
        self.size = 0
        self.body = bytearray()


def _header_props(payload: memoryview) -> tuple[int, bytes, bytes]:
    """Body size, correlation_id and reply_to of a content header (other properties skipped)."""
    _, _, size, flags = _HEADER.unpack_from(payload)
    pos = _HEADER.size
    correlation_id = reply_to = b""
    for bit in range(15, 1, -1):
        mask = 1 << bit
        if not flags & mask:
            continue
        if mask in (0x1000, 0x0800):  # delivery_mode, priority: an octet
            pos += 1
        elif mask == 0x0040:  # timestamp
            pos += 8
        elif mask == 0x2000:  # headers: a table, skipped whole
            (length,) = struct.unpack_from(">I", payload, pos)
            pos += 4 + length
        else:  # a short string
            length = payload[pos]
            value = bytes(payload[pos + 1 : pos + 1 + length])
            pos += 1 + length
            if mask == 0x0400:
                correlation_id = value
            elif mask == 0x0200:
                reply_to = value
    return size, correlation_id, reply_to


class LeanProtocol(asyncio.Protocol):
    """One AMQP connection with one channel (1) in confirm mode."""

    def __init__(self) -> None:
        self.transport: Any = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flushing = False
        self._waiters: collections.deque[tuple[type, asyncio.Future[Any]]] = collections.deque()
        self._sent = 0  # publishes so far (their confirm sequence numbers)
        self._confirms: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._delivery: _Delivery | None = None
        self.on_delivery: Any = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- plumbing ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        error = ConnectionError(f"connection lost: {exc}")
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        for _, future in self._confirms:
            if not future.done():
                future.set_exception(error)

    def write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one loop iteration leaves in one write."""
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def close(self) -> None:
        """Connection.Close after whatever is pending, and wait until RabbitMQ closed it."""
        await self.rpc(
            commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0),
            commands.Connection.CloseOk,
            0,
        )
        self.transport.close()
        await self.closed

    def _flush(self) -> None:
        self._flushing = False
        data, self._out = b"".join(self._out), []
        self.transport.write(data)

    async def rpc(self, method: Any, reply: type, channel: int = 1) -> Any:
        """Send a method frame and wait for the synchronous reply of type ``reply``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append((reply, future))
        self.write(frame.marshal(method, channel))
        return await future

    # -- reading ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        view = memoryview(buffer)
        pos, end = 0, len(buffer)
        try:
            while end - pos >= 7:
                kind, _channel, size = _FRAME.unpack_from(view, pos)
                stop = pos + 7 + size
                if stop >= end:
                    break
                self._frame(kind, view[pos + 7 : stop], view[pos : stop + 1])
                pos = stop + 1
        finally:
            view.release()
            del buffer[:pos]

    def _frame(self, kind: int, payload: memoryview, whole: memoryview) -> None:
        if kind in (2, 3):
            self._content(kind, payload)
        elif kind != 8:  # not a heartbeat
            self._method(payload, whole)

    def _content(self, kind: int, payload: memoryview) -> None:
        """A content header or body frame: of the delivery in hand."""
        delivery = self._delivery
        assert delivery is not None
        if kind == 2:
            delivery.size, delivery.correlation_id, delivery.reply_to = _header_props(payload)
        else:
            delivery.body += payload
        if len(delivery.body) >= delivery.size:
            self._delivery = None
            self.on_delivery(delivery)

    def _method(self, payload: memoryview, whole: memoryview) -> None:
        class_id, method_id = _METHOD.unpack_from(payload)
        if class_id == 60 and method_id == 60:  # Basic.Deliver
            pos = 4 + 1 + payload[4]  # after the consumer tag
            tag, _ = _DELIVER_TAG.unpack_from(payload, pos)
            self._delivery = _Delivery(tag)
            return
        if class_id == 60 and method_id in (80, 120):  # a confirm: Basic.Ack or Basic.Nack
            tag, multiple = _DELIVER_TAG.unpack_from(payload, 4)
            self._confirmed(tag, bool(multiple & 1), nack=method_id == 120)
            return
        _, _, value = frame.unmarshal(bytes(whole))
        if isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
            error = ConnectionError(f"{value.reply_code} {value.reply_text}")
            for _, waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            self.transport.close()
            return
        if self._waiters and isinstance(value, self._waiters[0][0]):
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(value)

    def _confirmed(self, tag: int, multiple: bool, *, nack: bool) -> None:
        confirms = self._confirms
        while confirms and confirms[0][0] <= tag:
            seq, future = confirms.popleft()
            if not multiple and seq != tag:
                confirms.appendleft((seq, future))
                break
            if not future.done():
                if nack:
                    future.set_exception(RuntimeError(f"publish {seq} was nacked"))
                else:
                    future.set_result(None)

    # -- what the client and the worker use --------------------------------------------

    def publish(self, data: bytes) -> asyncio.Future[None]:
        """Write one publish's frames; the future of its confirm."""
        self._sent += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirms.append((self._sent, future))
        self.write(data)
        return future

    def ack(self, tag: int, multiple: bool) -> None:
        self.write(_ACK.pack(1, 1, 13, 60, 80, tag, multiple, 0xCE))


async def connect(url: str, *, prefetch: int = 0) -> LeanProtocol:
    """Open a connection and channel 1 (confirm mode; ``prefetch`` set when not 0)."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        LeanProtocol, parts.hostname or "localhost", parts.port or 5672
    )
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    start = loop.create_future()
    protocol._waiters.append((commands.Connection.Start, start))
    protocol.write(header.ProtocolHeader().marshal())
    await start
    tune = loop.create_future()
    protocol._waiters.append((commands.Connection.Tune, tune))
    protocol.write(
        frame.marshal(
            commands.Connection.StartOk(
                client_properties={"product": "bench.lean"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
            0,
        )
    )
    tuned = await tune
    protocol.write(
        frame.marshal(
            commands.Connection.TuneOk(
                channel_max=tuned.channel_max, frame_max=tuned.frame_max, heartbeat=0
            ),
            0,
        )
    )
    await protocol.rpc(commands.Connection.Open(virtual_host=vhost), commands.Connection.OpenOk, 0)
    await protocol.rpc(commands.Channel.Open(), commands.Channel.OpenOk)
    await protocol.rpc(commands.Confirm.Select(), commands.Confirm.SelectOk)
    if prefetch:
        await protocol.rpc(commands.Basic.Qos(prefetch_count=prefetch), commands.Basic.QosOk)
    return protocol


class Acks:
    """Acks of one channel's deliveries, written at the end of the event-loop iteration: one
    ``multiple`` ack up to the top of the unbroken run of settled tags, any above a gap alone."""

    def __init__(self, protocol: LeanProtocol) -> None:
        self._protocol = protocol
        self._floor = 0  # every tag up to this one is settled
        self._settled: set[int] = set()  # settled above the floor (for contiguity)
        self._unsent: set[int] = set()  # settled, ack not written yet
        self._scheduled = False

    def settle(self, tag: int) -> None:
        self._settled.add(tag)
        self._unsent.add(tag)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Write the acks now (before a close: an ack still waiting for the end of the
        iteration would be lost with the connection, and its message redelivered)."""
        if self._scheduled:
            self._flush()

    def _flush(self) -> None:
        self._scheduled = False
        floor = self._floor
        while floor + 1 in self._settled:
            floor += 1
            self._settled.discard(floor)
        if floor > self._floor:
            self._protocol.ack(floor, True)  # tags in it acked alone before are not outstanding
            self._floor = floor
        for tag in sorted(self._unsent):
            if tag > floor:
                self._protocol.ack(tag, False)
        self._unsent.clear()


REPLY_PREFETCH = 1000  # aioqueue's reply consumer's
REPLY_EXPIRES_MS = 60_000


class LeanClient:
    """The producer side: ``call`` waits for the reply, ``send`` for the confirm."""

    def __init__(self, protocol: LeanProtocol, queue: str, reply_queue: str) -> None:
        self._protocol = protocol
        self._queue = queue.encode()
        self.reply_queue = reply_queue
        self._reply_to = reply_queue.encode()
        self._futures: dict[bytes, asyncio.Future[Any]] = {}
        self._acks = Acks(protocol)
        protocol.on_delivery = self._on_reply

    @classmethod
    async def connect(cls, url: str, queue: str) -> LeanClient:
        protocol = await connect(url, prefetch=REPLY_PREFETCH)
        await protocol.rpc(
            commands.Queue.Declare(queue=queue, durable=True), commands.Queue.DeclareOk
        )
        reply_queue = f"bench.lean.reply.{uuid.uuid4().hex[:12]}"
        await protocol.rpc(
            commands.Queue.Declare(
                queue=reply_queue, durable=True, arguments={"x-expires": REPLY_EXPIRES_MS}
            ),
            commands.Queue.DeclareOk,
        )
        client = cls(protocol, queue, reply_queue)
        await protocol.rpc(commands.Basic.Consume(queue=reply_queue), commands.Basic.ConsumeOk)
        return client

    async def close(self) -> None:
        """Write what is pending (the last acks), then close the connection."""
        self._acks.flush()
        await self._protocol.close()

    async def call(self, task: str, *args: Any) -> Any:
        """Publish ``task`` with a reply queue, wait for its confirm, then for its reply."""
        correlation_id = uuid.uuid4().hex.encode()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[correlation_id] = future
        body = orjson.dumps({"task": task, "args": args})
        data = publish_frames(
            1,
            self._queue,
            body,
            delivery_mode=_PERSISTENT,
            correlation_id=correlation_id,
            reply_to=self._reply_to,
        )
        await self._protocol.publish(data)
        return await future

    async def send(self, task: str, *args: Any) -> None:
        """Publish ``task`` and wait for its confirm."""
        body = orjson.dumps({"task": task, "args": args})
        correlation_id = uuid.uuid4().hex.encode()
        data = publish_frames(
            1, self._queue, body, delivery_mode=_PERSISTENT, correlation_id=correlation_id
        )
        await self._protocol.publish(data)

    def _on_reply(self, delivery: _Delivery) -> None:
        future = self._futures.pop(delivery.correlation_id, None)
        if future is not None and not future.done():
            future.set_result(orjson.loads(delivery.body)["value"])
        self._acks.settle(delivery.tag)


class LeanWorker:
    """Runs noop, fire and executed; acks each task once its reply (if any) is confirmed."""

    def __init__(self, protocol: LeanProtocol) -> None:
        self._protocol = protocol
        self.executed = 0
        self._acks = Acks(protocol)
        protocol.on_delivery = self.on_delivery

    def close(self) -> None:
        """Write the acks still waiting (the connection closes next)."""
        self._acks.flush()

    run_task = RawWorker.run_task  # raw's three tasks, counting in ``self.executed``

    def on_delivery(self, delivery: _Delivery) -> None:
        request = orjson.loads(delivery.body)
        value = self.run_task(request["task"], request["args"])
        if not delivery.reply_to:
            self._acks.settle(delivery.tag)
            return
        data = publish_frames(
            1,
            delivery.reply_to,
            orjson.dumps({"value": value}),
            delivery_mode=_PERSISTENT,
            correlation_id=delivery.correlation_id,
        )
        tag = delivery.tag
        self._protocol.publish(data).add_done_callback(
            lambda confirm: confirm.exception() or self._acks.settle(tag)
        )


async def serve(url: str, queue: str) -> None:
    """Consume ``queue`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    protocol = await connect(url, prefetch=int(os.environ.get(RAW_PREFETCH_ENV, 100)))
    worker = LeanWorker(protocol)
    await protocol.rpc(commands.Queue.Declare(queue=queue, durable=True), commands.Queue.DeclareOk)
    await protocol.rpc(commands.Basic.Consume(queue=queue), commands.Basic.ConsumeOk)
    print(f"lean worker ready (queue {queue})", file=sys.stderr, flush=True)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopped, protocol.closed], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not protocol.closed.done():
        worker.close()
        await protocol.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.lean AMQP_URL QUEUE")
    run(serve(sys.argv[1], sys.argv[2]))
