"""Every private or undocumented part of aio-pika, aiormq and pamqp that we rely on.

Each entry names the library object, the attribute, and what of ours needs it. `missing()`
checks them all against the installed libraries; ``tests/test_internals.py`` fails with its
list, so an upgrade that removes one is caught by the test suite, not in production. The
dependency pins in pyproject.toml (aio-pika 10.x, aiormq 7.x, pamqp 4.x) are the lines tested.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Final

import aio_pika
import aiormq
import aiormq.abc
import aiormq.channel
import aiormq.connection
import pamqp.frame
from aio_pika.abc import UnderlayConnection
from pamqp import commands as spec
from pamqp import decode
from pamqp.header import ContentHeader

__all__ = ["INTERNALS", "Internal", "missing"]


@dataclass(frozen=True)
class Internal:
    """One part of a library we use beyond its documented API."""

    owner: Any  # a class or a module
    name: str
    kind: str  # "attribute" (set in __init__), "method", "parameter", "field", "function",
    # "source" (the owner's source code says it)
    used_by: str

    def present(self) -> bool:
        if self.kind in ("method", "function"):
            return callable(getattr(self.owner, self.name, None))
        if self.kind == "attribute":
            return f"self.{self.name}" in inspect.getsource(self.owner) or hasattr(
                self.owner, self.name
            )
        if self.kind == "parameter":
            method, _, parameter = self.name.partition("(")
            return (
                parameter.rstrip(")") in inspect.signature(getattr(self.owner, method)).parameters
            )
        if self.kind == "source":
            return self.name in inspect.getsource(self.owner)
        if self.kind == "field":
            return self.name in {f.name for f in dataclasses.fields(self.owner)}
        raise ValueError(self.kind)

    def __str__(self) -> str:
        owner = getattr(self.owner, "__qualname__", getattr(self.owner, "__name__", self.owner))
        module = self.owner.__module__ + "." if inspect.isclass(self.owner) else ""
        return f"{module}{owner}.{self.name} ({self.kind}; used by {self.used_by})"


INTERNALS: Final = (
    # aiormq channels: our publisher and frame batches write frames and keep confirms on them
    Internal(aiormq.Channel, "write_queue", "attribute", "frames.FrameBatch writes frame sets"),
    Internal(aiormq.Channel, "confirmations", "attribute", "publisher: confirm futures by tag"),
    Internal(aiormq.Channel, "delivery_tag", "attribute", "publisher: the publish counter"),
    Internal(
        aiormq.Channel, "message_id_delivery_tag", "attribute", "publisher: returns by message id"
    ),
    Internal(aiormq.Channel, "max_content_size", "attribute", "publisher: body frame size"),
    Internal(
        aiormq.channel,
        "Returning",
        "attribute",
        "publisher.take_confirm: aiormq's placeholder for a returned publish's confirm",
    ),
    Internal(
        aiormq.Channel,
        "on_consumer_cancel_callbacks",
        "attribute",
        "subscription: a server Basic.Cancel",
    ),
    Internal(aiormq.abc.ChannelFrame, "payload", "field", "frames: raw frame bytes"),
    Internal(
        aiormq.connection.Connection,
        "writer.write(channel_frame.payload)",
        "source",
        "frames.FrameBatch: aiormq's writer task writes each frame set as it takes it from the "
        "queue (no await between), so an empty queue means all of it is written and frames may "
        "go straight to the writer (tests/test_wire.py checks it on a live connection)",
    ),
    Internal(
        aiormq.connection.FrameGenerator,
        "await self.queue.get()",
        "source",
        "frames.FrameBatch: the writer task takes frame sets one at a time from the queue",
    ),
    Internal(aiormq.abc.ChannelFrame, "drain_future", "field", "frames: written() waits on it"),
    Internal(
        aiormq.Connection,
        "channel(frame_buffer_size)",
        "parameter",
        "connection: 512-frame channel buffers",
    ),
    Internal(
        aiormq.connection.FrameReceiver,
        "pamqp.frame.unmarshal(",
        "source",
        "inbound.read_leniently: aiormq's reader calls pamqp.frame.unmarshal by module "
        "attribute, so the lenient one is used (tests/test_inbound.py runs it)",
    ),
    Internal(pamqp.frame, "unmarshal", "function", "inbound.read_leniently wraps it"),
    Internal(
        aiormq.connection,
        "FrameReceiver",
        "attribute",
        "reader.install: Connection.connect builds its receiver from this module attribute",
    ),
    Internal(
        aiormq.connection.Connection,
        "FrameReceiver(reader)",
        "source",
        "reader.install: the receiver is built by name in connect (tests/test_reader.py)",
    ),
    Internal(
        aiormq.Connection,
        "_reader_task",
        "attribute",
        "reader: a direct consumer's delivery is read by its own connection's reader task",
    ),
    Internal(aiormq.abc.TaskWrapper, "task", "attribute", "reader: the wrapped reader task"),
    Internal(
        aiormq.Connection, "__init__(transport_factory)", "parameter", "connection: our transport"
    ),
    # aio-pika's robust connection: channel buffers set before its channels are restored
    Internal(aio_pika.RobustConnection, "_on_connected", "method", "connection.RobustConnection"),
    Internal(
        aio_pika.RobustConnection,
        "_RobustConnection__connect_transport",
        "method",
        "connection.RobustConnection: each attempt goes to the next node of a cluster",
    ),
    Internal(aio_pika.Connection, "url", "attribute", "connection: the node of this attempt"),
    Internal(
        aio_pika.Connection, "kwargs", "attribute", "connection: transport_factory for aiormq"
    ),
    Internal(
        UnderlayConnection,
        "connection",
        "attribute",
        "broker._transport (declare.probe, declare.refusal), connection",
    ),
    # pamqp: task properties encoded with direct dispatch, frames read leniently
    Internal(spec.Basic.Properties, "encode_property", "method", "message.TaskProperties"),
    Internal(decode, "field_table", "function", "inbound: header tables checked"),
    Internal(
        decode,
        "embedded_value",
        "function",
        "inbound: header entries checked one by one; decode: header types it does not read",
    ),
    Internal(decode, "timestamp", "function", "inbound: timestamps checked"),
    # pamqp: a delivery's frames built without __init__ by decode.fast_frame, exactly as pamqp's
    # own read builds them (tests/test_reader_decode.py compares every attribute)
    *(
        Internal(ContentHeader, name, "attribute", "decode.fast_frame sets it")
        for name in ("class_id", "weight", "body_size", "properties")
    ),
    Internal(spec.Basic.Properties, "flags", "attribute", "decode: the properties' flag bits"),
    Internal(spec.Basic.Properties, "amqp_type", "method", "decode: each property's type"),
    *(
        Internal(spec.Basic.Deliver, name, "attribute", "decode.fast_frame sets its slots")
        for name in ("consumer_tag", "delivery_tag", "redelivered", "exchange", "routing_key")
    ),
)


def missing() -> list[str]:
    """The internals the installed libraries no longer have (empty when all is well)."""
    return [str(internal) for internal in INTERNALS if not internal.present()]
