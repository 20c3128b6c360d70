"""The read side of our connections: whole socket buffers parsed at once, deliveries handed
straight to their consumer.

aiormq reads a frame with three awaited ``readexactly`` calls under a lock, copies it through
a ``BytesIO``, hands it to the channel's reader task through a queue, and starts a task per
delivered message once the channel task has read its three frames (method, header, body). On
a busy consumer that machinery costs more than the rest of a delivery.

`WholeBufferReceiver` replaces aiormq's ``FrameReceiver`` for our connections only (those
whose reader our transport factory made a `WholeBufferReader`; any other aiormq connection in
the process keeps aiormq's receiver). It reads what the socket has (up to `READ_SIZE`), splits
it into frames, and:

- assembles a ``Basic.Deliver`` and its content for a consumer registered with
  `consume_directly` (our `Subscription`) on this connection and channel, and calls it at once,
  in the connection's reader task — no channel queue, no task per message;
- hands RabbitMQ's publisher confirms (``Basic.Ack``, ``Basic.Nack``) for a channel registered
  with `take_confirms_directly` (our `ChannelPublisher`'s) to it at once, in the same task:
  aiormq's way costs a put on the channel's queue, a turn of its reader task, a scan of every
  outstanding publish and a ``call_soon`` per confirmed one before the publisher's future is
  resolved. A ``Basic.Return`` on such a channel goes to aiormq, which matches it to its
  publish, and so does every later confirm of that channel, in order: a return must be applied
  before the confirm that follows it, or an unroutable publish would pass as confirmed;
- yields every other frame to aiormq exactly as its own receiver would, in order: RPC replies,
  returns, heartbeats, closes, and deliveries for consumers aiormq knows alone.

A delivery's ``Basic.Deliver`` and content header are read by `aioqueue.rabbit.decode`'s
`fast_frame`, which builds exactly what pamqp would or declines; content bodies are their
payload; every other frame, and any the fast read declines, is decoded by
``pamqp.frame.unmarshal`` — the module attribute, so the lenient reading of
`aioqueue.rabbit.inbound` applies unchanged. A malformed frame ends the connection as aiormq's
receiver would (InvalidFrameError), and so does a frame out of place inside a delivery. The
hook (aiormq's module attribute ``FrameReceiver``, looked up by ``Connection.connect``) and
``Connection._reader_task`` (a ``TaskWrapper`` whose ``task`` reads the frames) are listed in
`aioqueue.rabbit.internals`; ``tests/test_reader.py`` checks this receiver against aiormq's own
over the same bytes, ``tests/test_reader_decode.py`` the fast read against pamqp's.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

import aiormq
import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from .decode import fast_frame

__all__ = [
    "KEEPALIVE",
    "READ_SIZE",
    "ConfirmTaker",
    "DirectConsumer",
    "WholeBufferReader",
    "WholeBufferReceiver",
    "consume_directly",
    "install",
    "stop_consuming_directly",
    "stop_taking_confirms",
    "take_confirms_directly",
]

log = logging.getLogger("aioqueue.broker")

READ_SIZE: Final = 256 * 1024  # bytes asked of the socket per read (it returns what it has)

_HEADER: Final = struct.Struct(">BHI")  # frame type, channel, payload size
_METHOD, _CONTENT_HEADER, _BODY = 1, 2, 3
_FRAME_END: Final = 0xCE
_DELIVER: Final = b"\x00\x3c\x00\x3c"  # class 60 (basic), method 60 (deliver)
# After deliveries or confirms taken here, a read hands aiormq a heartbeat at most this often
# (`_keep_alive`): well inside the shortest grace aiormq allows, 3 * (1 + 1) s for a 1 s
# heartbeat.
KEEPALIVE: Final = 1.0
_ALIVE: Final = (8, 0, Heartbeat())  # a heartbeat frame as aiormq's receiver yields it

# consumer(deliver, properties, body): called in the connection's reader task; must not block
DirectConsumer = Callable[[spec.Basic.Deliver, spec.Basic.Properties, bytes], None]
_CONFIRM_KINDS: Final = (spec.Basic.Ack, spec.Basic.Nack, spec.Basic.Return)


class ConfirmTaker(Protocol):
    """What takes a channel's publisher confirms as they are read (`take_confirms_directly`)."""

    @property
    def channel(self) -> aiormq.Channel: ...

    def take_confirm(self, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        """Resolve the publishes ``frame`` confirms (called in the connection's reader task)."""

    def confirms_elsewhere(self) -> None:
        """From now on aiormq resolves this channel's confirms (a return was read)."""


class WholeBufferReader(asyncio.StreamReader):
    """The `StreamReader` of a connection whose frames `WholeBufferReceiver` reads (the same
    object, class switched by our transport factory: nothing else changes)."""


class _Direct:
    __slots__ = ("callback", "channel")

    def __init__(self, channel: aiormq.Channel, callback: DirectConsumer) -> None:
        self.channel = channel
        self.callback = callback


_DIRECT: dict[str, _Direct] = {}  # consumer tag -> its consumer (tags are unique per process)


def consume_directly(channel: aiormq.Channel, consumer_tag: str, callback: DirectConsumer) -> None:
    """Hand deliveries for ``consumer_tag`` on ``channel`` to ``callback`` as they are read.
    Register before ``basic.consume``; deliveries on any other channel (or a connection not
    read by `WholeBufferReceiver`) still reach the consumer aiormq was given."""
    _DIRECT[consumer_tag] = _Direct(channel, callback)


def stop_consuming_directly(consumer_tag: str) -> None:
    """Deliveries for ``consumer_tag`` read from now on go to aiormq's consumer, if any (after
    ``basic.cancel`` aiormq has none: they stay unacked until the channel closes)."""
    _DIRECT.pop(consumer_tag, None)


_TAKERS: dict[int, list[ConfirmTaker]] = {}  # channel number -> takers (of any connection)


def take_confirms_directly(taker: ConfirmTaker) -> None:
    """Hand the confirms of ``taker.channel`` to ``taker.take_confirm`` as they are read, until
    a ``Basic.Return`` is read on it (then `ConfirmTaker.confirms_elsewhere`) or
    `stop_taking_confirms`. Every publish on the channel must be the taker's."""
    _TAKERS.setdefault(taker.channel.number, []).append(taker)


def stop_taking_confirms(taker: ConfirmTaker) -> None:
    """Confirms for ``taker``'s channel read from now on go to aiormq."""
    takers = _TAKERS.get(taker.channel.number, [])
    if taker in takers:
        takers.remove(taker)
        if not takers:
            del _TAKERS[taker.channel.number]


class _Assembly:
    """A delivery whose content frames are still to come."""

    __slots__ = ("body", "consumer", "deliver", "properties", "size")

    def __init__(self, deliver: spec.Basic.Deliver, consumer: _Direct) -> None:
        self.deliver = deliver
        self.consumer = consumer
        self.properties: spec.Basic.Properties | None = None
        self.size = 0
        self.body: list[bytes] = []


class WholeBufferReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading whole buffers for a `WholeBufferReader` (see the
    module's doc); for any other reader, aiormq's own behaviour."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._whole = isinstance(reader, WholeBufferReader)
        self._me: asyncio.Task[Any] | None = None
        self._buffer = bytearray()
        self._frames: deque[tuple[int, int, Frame | ContentBody | Any]] = deque()
        self._assembling: dict[int, _Assembly] = {}  # channel -> its delivery in progress
        self._takers: dict[int, ConfirmTaker] = {}  # channel -> its confirm taker, once found
        self._took = False  # deliveries or confirms taken here since the last keep-alive
        self._alive_at = time.monotonic()  # ... which was then

    async def get_frame(self) -> tuple[int, int, Any]:
        if not self._whole:
            return await super().get_frame()
        frames = self._frames
        while True:
            while not frames:
                await self._fill()
            weight, channel, frame = frames.popleft()
            kind = type(frame)
            if self._assembling or kind is spec.Basic.Deliver:
                if self._direct(channel, frame):
                    continue
            if kind in _CONFIRM_KINDS and self._confirm(channel, frame):
                continue
            return weight, channel, frame

    async def _fill(self) -> None:
        """Read what the socket has and split it into frames (at least one more, or raise)."""
        reader = self.reader
        try:
            data = await reader.read(READ_SIZE)
        except (ConnectionError, OSError) as exc:
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        buffer = self._buffer
        if not data:
            if buffer:
                raise AMQPConnectionError(
                    f"Server connection unexpectedly closed with {len(buffer)} bytes of a "
                    "frame unread"
                )
            raise StopAsyncIteration
        buffer += data
        if not self.started:
            if len(buffer) < 4:
                return
            if buffer[:4] == b"AMQP":
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        self._split()
        if self._took:
            self._keep_alive()

    def _keep_alive(self) -> None:
        """After deliveries or confirms taken here, hand aiormq a heartbeat frame, at most
        every `KEEPALIVE` seconds.

        aiormq closes a connection that handed it no frame for three heartbeat intervals, and
        RabbitMQ sends no heartbeat while it sends deliveries or confirms: a connection that
        only received deliveries taken here (a worker with events off running fire-and-forget
        tasks, an event reader) was closed every ``3 * (heartbeat + 1)`` seconds, its unacked
        messages redelivered; one that only published (a producer submitting task after task)
        too, its publish in flight sent twice. The frame is what RabbitMQ's own heartbeat
        would be: read and ignored, the connection known alive."""
        now = time.monotonic()
        if now - self._alive_at >= KEEPALIVE:
            self._alive_at, self._took = now, False
            self._frames.append(_ALIVE)

    def _split(self) -> None:
        buffer = self._buffer
        size = len(buffer)
        offset = 0
        append = self._frames.append
        unmarshal = pamqp.frame.unmarshal  # looked up now: lenient reading may wrap it
        while size - offset >= 8:
            kind, channel, length = _HEADER.unpack_from(buffer, offset)
            end = offset + 7 + length
            if end >= size:
                break  # the rest of this frame is still on its way
            if kind == _BODY:
                if buffer[end] != _FRAME_END:
                    raise InvalidFrameError("Last byte error")
                append((end + 1 - offset, channel, ContentBody(bytes(buffer[offset + 7 : end]))))
            else:
                frame = fast_frame(kind, buffer, offset + 7, end)  # a delivery's, or None
                if frame is not None:
                    append((end + 1 - offset, channel, frame))
                    offset = end + 1
                    continue
                try:
                    weight, channel, frame = unmarshal(bytes(buffer[offset : end + 1]))
                except PAMQPException as exc:
                    raise InvalidFrameError(str(exc)) from exc
                append((weight, channel, frame))
            offset = end + 1
        if offset:
            del buffer[:offset]

    def _direct(self, channel: int, frame: Any) -> bool:
        """Whether ``frame`` belongs to a delivery for a direct consumer (and was taken)."""
        assembly = self._assembling.get(channel)
        if assembly is None:
            if type(frame) is not spec.Basic.Deliver:
                return False
            consumer = _DIRECT.get(frame.consumer_tag or "")
            if consumer is None or not self._owns(consumer.channel, channel):
                return False
            self._assembling[channel] = _Assembly(frame, consumer)
            return True
        if assembly.properties is None:
            if type(frame) is not ContentHeader:
                raise InvalidFrameError(f"Unexpected frame {frame!r} instead of ContentHeader")
            assembly.properties = frame.properties
            assembly.size = frame.body_size
        elif type(frame) is ContentBody:
            assembly.body.append(frame.value)
            assembly.size -= len(frame.value)
        else:
            raise InvalidFrameError(f"Unexpected frame {frame!r} inside a delivery")
        if assembly.size <= 0:
            del self._assembling[channel]
            self._took = True
            body = assembly.body
            self._deliver(assembly, body[0] if len(body) == 1 else b"".join(body))
        return True

    def _confirm(self, channel: int, frame: Any) -> bool:
        """Whether ``frame``, a confirm or a return, was taken by its channel's taker."""
        taker = self._takers.get(channel)
        if taker is None or taker.channel.is_closed:
            self._takers.pop(channel, None)
            taker = next(
                (t for t in _TAKERS.get(channel, ()) if self._owns(t.channel, channel)), None
            )
            if taker is None:
                return False
            self._takers[channel] = taker
        if type(frame) is spec.Basic.Return:  # aiormq applies it, then every later confirm
            del self._takers[channel]
            stop_taking_confirms(taker)
            taker.confirms_elsewhere()
            return False
        self._took = True  # (aiormq never sees it: `_keep_alive`)
        try:
            taker.take_confirm(frame)
        except Exception:  # a taker's failure must not end the connection
            log.exception("taking a confirm on channel %d failed", channel)
        return True

    def _owns(self, mine: aiormq.Channel, channel: int) -> bool:
        """``mine`` is this very channel of this very connection."""
        if mine.number != channel or mine.is_closed:
            return False
        # aiormq keeps its reader task wrapped (``TaskWrapper.task``)
        reader_task = getattr(mine.connection, "_reader_task", None)
        if self._me is None:  # the task reading this receiver: always the same one
            self._me = asyncio.current_task()
        return getattr(reader_task, "task", reader_task) is self._me

    @staticmethod
    def _deliver(assembly: _Assembly, body: bytes) -> None:
        assert assembly.properties is not None
        try:
            assembly.consumer.callback(assembly.deliver, assembly.properties, body)
        except Exception:  # a consumer's failure must not end the connection
            log.exception("consumer of %s failed", assembly.deliver.consumer_tag)


def install() -> None:
    """Make aiormq build a `WholeBufferReceiver` for every connection (harmless for
    connections whose reader is not a `WholeBufferReader`: they read as before)."""
    if aiormq.connection.FrameReceiver is not WholeBufferReceiver:
        aiormq.connection.FrameReceiver = WholeBufferReceiver  # type: ignore[misc]
