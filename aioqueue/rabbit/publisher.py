"""Confirmed publishes on an aiormq channel, batched per event-loop iteration.

aiormq's ``basic_publish`` costs more than the publish: per call a timer (``asyncio.timeout``),
the channel lock, an awaited put on the writer queue (ten frame sets deep, so a burst queues on
the lock, one publish per iteration), a `ChannelFrame` built through pamqp's generic marshal,
and three done-callbacks on the confirmation future. `ChannelPublisher` keeps aiormq's own
bookkeeping — the channel's delivery tags, its ``confirmations`` (which aiormq resolves from
RabbitMQ's acks, nacks and returns) and its message-id map for returns — and replaces only the
way there: the frames of every publish made during one iteration go to the writer queue as one
frame set at its end (`aioqueue.rabbit.frames.FrameBatch`), tagged in the order they were written.
`Deadlines` (`aioqueue.admission`) bounds the confirm waits with one timer for all of them.

RabbitMQ's confirms come back the same short way: our connection's reader hands them to
`ChannelPublisher.take_confirm` as it reads them (`aioqueue.rabbit.reader.take_confirms_directly`),
which pops the confirmed tags in publish order, no scan of the outstanding ones. After a
``Basic.Return`` on the channel, aiormq takes its confirms again, in order behind the return.

Everything published on the channel must come through one `ChannelPublisher` (the delivery tags
are counted here); aioqueue's publishing channel is its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections import deque
from typing import Any

import aiormq
import pamqp.frame
from aiormq.channel import Returning
from pamqp import commands as spec

from ..admission import Deadlines, Slots
from ..message import new_id
from .frames import FrameBatch
from .reader import stop_taking_confirms, take_confirms_directly

__all__ = ["ChannelPublisher", "Deadlines", "Slots", "publish_frames"]  # (the last two: ..slots)

_FRAME = struct.Struct(">BHI")  # type, channel, size; then the payload and a frame end
_HEADER = struct.Struct(">HHQ")  # class id, weight, body size; then the properties
_FRAME_HEADER = 2
_FRAME_BODY = 3
_FRAME_END = b"\xce"
_BASIC_CLASS = 60

log = logging.getLogger("aioqueue.broker")


@functools.lru_cache(maxsize=1024)
def _method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    # one per destination: a task queue, a reply queue, a delay level
    publish = spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    return pamqp.frame.marshal(publish, channel)


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: spec.Basic.Properties,
    *,
    mandatory: bool,
    max_content: int,
) -> bytes:
    """The method, header and body frames of one publish, as aiormq's ``basic_publish`` writes
    them (bodies over ``max_content`` bytes split over several body frames)."""
    header = _HEADER.pack(_BASIC_CLASS, 0, len(body)) + properties.marshal()
    parts = [
        _method_frame(channel, exchange, routing_key, mandatory),
        _FRAME.pack(_FRAME_HEADER, channel, len(header)),
        header,
        _FRAME_END,
    ]
    for start in range(0, len(body), max_content):
        chunk = body[start : start + max_content]
        parts += (_FRAME.pack(_FRAME_BODY, channel, len(chunk)), chunk, _FRAME_END)
    return b"".join(parts)


class ChannelPublisher:
    """Publishes with confirms on one aiormq channel; see the module's docstring."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._frames = FrameBatch(channel)
        self._tags: deque[int] | None = deque()  # unconfirmed tags in publish order, or None
        # once aiormq takes the confirms
        channel.closing.add_done_callback(self._on_closing)
        take_confirms_directly(self)

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: spec.Basic.Properties
    ) -> tuple[int, asyncio.Future[Any]]:
        """Queue a mandatory publish for this iteration's write; return its delivery tag and
        the future of its confirm (a `Basic.Ack`, else aiormq's exception for the nack or
        return; the channel's close reason if it closes first).

        Raises:
            ChannelInvalidStateError: the channel is closed.
        """
        channel = self.channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        if not properties.message_id:  # returns are matched to publishes by message id
            properties.message_id = new_id()
        self._frames.add(
            publish_frames(
                channel.number,
                exchange,
                routing_key,
                body,
                properties,
                mandatory=True,
                max_content=channel.max_content_size,
            )
        )
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        future: asyncio.Future[Any] = self._loop.create_future()
        channel.confirmations[tag] = future
        channel.message_id_delivery_tag[properties.message_id] = tag
        if self._tags is not None:
            self._tags.append(tag)
        return tag, future

    def take_confirm(self, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        """Resolve the publishes a confirm covers, as aiormq would (an ack's result is the
        frame; a nack is aiormq's `DeliveryError`). Called by the connection's reader."""
        confirmations, tags = self.channel.confirmations, self._tags
        assert tags is not None
        tag = frame.delivery_tag
        if frame.multiple:
            while tags and tags[0] <= tag:
                _resolve(confirmations.pop(tags.popleft(), None), frame)
            return
        _resolve(confirmations.pop(tag, None), frame)
        while tags and tags[0] not in confirmations:  # those confirmed one by one
            tags.popleft()

    def confirms_elsewhere(self) -> None:
        self._tags = None  # aiormq resolves this channel's confirms from its own map

    def forget(self, tag: int, message_id: str) -> None:
        """Drop the message id of a publish that has its outcome (only returns look it up)."""
        if self.channel.message_id_delivery_tag.get(message_id) == tag:
            del self.channel.message_id_delivery_tag[message_id]

    def _on_closing(self, closing: asyncio.Future[Any]) -> None:
        """Fail the confirms still pending with the channel's close reason, as aiormq does
        for the publishes it made itself."""
        stop_taking_confirms(self)
        reason = None if closing.cancelled() else closing.exception()
        error = reason if isinstance(reason, Exception) else None
        for confirmation in self.channel.confirmations.values():
            if isinstance(confirmation, asyncio.Future) and not confirmation.done():
                confirmation.set_exception(
                    error or aiormq.exceptions.ChannelInvalidStateError("channel closed")
                )


def _resolve(confirmation: Any, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
    if confirmation is None or isinstance(confirmation, Returning):
        return  # confirmed before, or aiormq's placeholder for a returned publish
    if confirmation.done():  # its deadline passed, or its publisher was cancelled
        log.debug("confirm %r of a publish no longer awaited", frame)
    elif type(frame) is spec.Basic.Ack:
        confirmation.set_result(frame)
    else:
        confirmation.set_exception(aiormq.exceptions.DeliveryError(None, frame))
