"""AMQP frames written byte by byte, below pamqp's encoder (which refuses what these carry).

Used by ``tests/test_inbound.py`` to send RabbitMQ messages that our own encoder, or pamqp's,
could never produce: header names and short strings that are not UTF-8, timestamps out of
range. RabbitMQ 3.10 accepts and relays every one of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson
import pamqp.frame
from pamqp import commands as spec

from aioqueue.message import H_ATTEMPT, H_PROTOCOL, H_TASK, PROTOCOL_VERSION

FRAME_END = b"\xce"


def short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def long(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def entry(key: bytes, typed_value: bytes) -> bytes:
    """A field-table entry: key (raw bytes) and value (type octet + its bytes)."""
    return short(key) + typed_value


def s_value(text: str) -> bytes:
    return b"S" + long(text.encode())


def i_value(number: int) -> bytes:
    return b"l" + struct.pack(">q", number)


def t_value(stamp: int) -> bytes:
    return b"T" + struct.pack(">Q", stamp)


def table(*entries: bytes) -> bytes:
    return long(b"".join(entries))


@dataclass(frozen=True)
class Props:
    """Basic.Properties as raw field bytes (None: absent). Short strings are raw, unprefixed."""

    content_type: bytes | None = b"application/json"
    headers: bytes | None = None  # a whole table, length included
    delivery_mode: int | None = 2
    correlation_id: bytes | None = None
    reply_to: bytes | None = None
    message_id: bytes | None = None
    timestamp: int | None = None

    def encode(self) -> tuple[int, bytes]:
        flags, parts = 0, []
        if self.content_type is not None:
            flags |= 1 << 15
            parts.append(short(self.content_type))
        if self.headers is not None:
            flags |= 1 << 13
            parts.append(self.headers)
        if self.delivery_mode is not None:
            flags |= 1 << 12
            parts.append(bytes([self.delivery_mode]))
        if self.correlation_id is not None:
            flags |= 1 << 10
            parts.append(short(self.correlation_id))
        if self.reply_to is not None:
            flags |= 1 << 9
            parts.append(short(self.reply_to))
        if self.message_id is not None:
            flags |= 1 << 7
            parts.append(short(self.message_id))
        if self.timestamp is not None:
            flags |= 1 << 6
            parts.append(struct.pack(">Q", self.timestamp))
        return flags, b"".join(parts)


def task_headers(task: str, *extra: bytes) -> bytes:
    return table(
        entry(H_TASK.encode(), s_value(task)),
        entry(H_ATTEMPT.encode(), i_value(1)),
        entry(H_PROTOCOL.encode(), i_value(PROTOCOL_VERSION)),
        *extra,
    )


def header_payload(props: Props, body_size: int) -> bytes:
    flags, raw = props.encode()
    return struct.pack(">HHQH", 60, 0, body_size, flags) + raw


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + FRAME_END


def publish_frames(channel: int, routing_key: str, props: Props, body: bytes) -> bytes:
    """Basic.Publish to the default exchange, then the raw header and the body."""
    method = pamqp.frame.marshal(spec.Basic.Publish(exchange="", routing_key=routing_key), channel)
    return method + frame(2, channel, header_payload(props, len(body))) + frame(3, channel, body)


def task_body(*args: object) -> bytes:
    return orjson.dumps({"args": list(args), "kwargs": {}})


# The cases issue 13 reproduced, each alone enough to stall a worker: (name, props for an id)
def broken_cases(task: str, fid: str) -> dict[str, Props]:
    mid = fid.encode()
    return {
        "T 10**17 header": Props(
            message_id=mid, headers=task_headers(task, entry(b"when", t_value(10**17)))
        ),
        "T 2**64-1 header": Props(
            message_id=mid, headers=task_headers(task, entry(b"when", t_value(2**64 - 1)))
        ),
        "T 2**63 in an array": Props(
            message_id=mid,
            headers=task_headers(task, entry(b"list", b"A" + long(t_value(2**63)))),
        ),
        "timestamp 10**17": Props(message_id=mid, headers=task_headers(task), timestamp=10**17),
        "header name not UTF-8": Props(
            message_id=mid, headers=task_headers(task, entry(b"x-\xff\xfe", s_value("v")))
        ),
        "nested header name not UTF-8": Props(
            message_id=mid,
            headers=task_headers(task, entry(b"nest", b"F" + table(entry(b"\xff", i_value(1))))),
        ),
        "message_id not UTF-8": Props(message_id=mid + b"\xff\xfe", headers=task_headers(task)),
        "reply_to not UTF-8": Props(
            message_id=mid, reply_to=b"aioqueue.reply.\xff", headers=task_headers(task)
        ),
    }
