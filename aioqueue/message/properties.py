"""The AMQP properties of every message aioqueue publishes, built in one place.

Task messages (submits, retries, the scheduler), replies, progress and stream events, and the
dead-letter copy. `TaskProperties` encodes the fields we set with direct dispatch (pamqp's
generic path took 19 µs per task message, most of a submit's encoding work).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pamqp import commands as spec
from pamqp import encode

from .codec import Envelope
from .headers import (
    CONTENT_TYPE,
    DEAD_PREFIX,
    H_ATTEMPT,
    H_DELIVERIES,
    H_DUE_AT,
    H_EVENT,
    H_PROTOCOL,
    H_SEQ,
    H_SIGNATURE,
    PROTOCOL_VERSION,
)
from .signing import SigningKeys, sign

__all__ = [
    "TaskProperties",
    "dead_letter_copy",
    "encodable_headers",
    "event_properties",
    "replay_copy",
    "reply_properties",
    "task_message",
    "task_properties",
]


def task_properties(envelope: Envelope) -> spec.Basic.Properties:
    """The AMQP properties of a task message: persistent JSON, task id as message and
    correlation id, the envelope's metadata in headers. Submits, retries and the scheduler
    all publish with these."""
    return TaskProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        message_id=envelope.id,
        correlation_id=envelope.id,
        reply_to=envelope.reply_to,
        headers=envelope.headers(),
        timestamp=datetime.now(UTC),
    )


def task_message(
    envelope: Envelope, signing: SigningKeys | None, *, due_at: float
) -> tuple[bytes, spec.Basic.Properties]:
    """An aioqueue task message's body and properties, signed when ``signing`` is set
    (fresh from ``due_at``, Unix seconds: when it may run)."""
    body = envelope.encode()
    properties = task_properties(envelope)
    if signing is not None:
        sign(properties, body, signing, due_at=due_at)
    return body, properties


def reply_properties(task_id: str) -> spec.Basic.Properties:
    """A final outcome's properties. No headers: an outcome is told apart from progress events
    by having none, and its body says what it is ("ok", "task"); a header table costs a
    decode per reply."""
    return TaskProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        message_id=task_id,
        correlation_id=task_id,
    )


def event_properties(task_id: str, kind: str, seq: int) -> spec.Basic.Properties:
    """A progress event's or a stream item's properties (``kind``: "progress" or "item")."""
    return spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        correlation_id=task_id,
        headers={H_PROTOCOL: PROTOCOL_VERSION, H_EVENT: kind, H_SEQ: seq},
    )


# RabbitMQ's own record of a message's deaths and deliveries. It drops a message dead-lettered
# into a queue already in its ``x-death`` history (a "cycle"), so a copy re-entering our delay
# ladder must not carry it; a quorum queue's delivery count belongs to the delivered message,
# not to a copy published anew.
_RABBIT_DEATH = ("x-death", "x-first-death", "x-last-death", "x-delivery-count")


def dead_letter_copy(props: spec.Basic.Properties, extra: dict[str, Any]) -> spec.Basic.Properties:
    """Persistent copy of ``props`` with ``extra`` headers and without ``x-death``."""
    headers = _without(props.headers, _RABBIT_DEATH)
    headers.update(extra)
    return _persistent_copy(props, headers)


def replay_copy(props: spec.Basic.Properties) -> spec.Basic.Properties:
    """A dead letter ready to run again: its death headers gone (ours and RabbitMQ's), its
    attempt and crash counts back to the start."""
    headers = _without(props.headers, (DEAD_PREFIX, *_RABBIT_DEATH))
    headers.pop(H_ATTEMPT, None)
    headers.pop(H_DELIVERIES, None)
    return _persistent_copy(props, headers)


def _without(headers: dict[str, Any] | None, prefixes: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if not k.startswith(prefixes)}


def _persistent_copy(
    props: spec.Basic.Properties, headers: dict[str, Any]
) -> spec.Basic.Properties:
    """``props`` with ``headers``, persistent, without a per-message ``expiration`` (which
    would expire the copy silently)."""
    return spec.Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=encodable_headers(headers),
        delivery_mode=2,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=props.message_id,
        timestamp=props.timestamp,
        message_type=props.message_type,
        app_id=props.app_id,
    )


def encodable_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers``, with any value pamqp cannot write back replaced by its ``repr``.

    pamqp reads a 64-bit float (``d``, as Java and .NET clients send) but writes every float
    as 32-bit, so a copy of such a header could fail to encode — and a dead letter that can
    never be published would be requeued forever.
    """
    try:
        encode.field_table(headers)
    except (TypeError, ValueError, OverflowError, struct.error):
        return {key: _encodable_value(value) for key, value in headers.items()}
    return headers


def _encodable_value(value: Any) -> Any:
    if isinstance(value, dict):
        return encodable_headers(value)
    if isinstance(value, list):
        return [_encodable_value(item) for item in value]
    try:
        encode.encode_table_value(value)
    except (TypeError, ValueError, OverflowError, struct.error):
        return repr(value)
    return value


def _encode_headers(value: Any) -> bytes:
    if isinstance(value, dict) and H_SIGNATURE in value and H_DUE_AT in value:
        # a signed message: what varies per message (its due time and signature) is encoded
        # on its own, the rest through the cache, as one table (entries in any order)
        due, signature = value[H_DUE_AT], value[H_SIGNATURE]
        if type(due) is int and type(signature) is str and signature.isascii():
            common = {k: v for k, v in value.items() if k not in _PER_MESSAGE}
            shared = _encode_plain(common)[4:]
            own = (
                b"".join(  # as pamqp writes them: a 64-bit integer and a long string
                    (_DUE_KEY, struct.pack(">q", due), _SIGNATURE_KEY)
                )
                + struct.pack(">I", len(signature))
                + signature.encode()
            )
            return struct.pack(">I", len(shared) + len(own)) + shared + own
    return _encode_plain(value)


_PER_MESSAGE = (H_DUE_AT, H_SIGNATURE)
_DUE_KEY = encode.short_string(H_DUE_AT) + b"l"
_SIGNATURE_KEY = encode.short_string(H_SIGNATURE) + b"S"


def _encode_plain(value: Any) -> bytes:
    if isinstance(value, dict):
        try:
            # the types are part of the key: True == 1 == 1.0, but each encodes differently
            return _header_table((tuple(value.items()), tuple(map(type, value.values()))))
        except TypeError:  # an unhashable value: not one of ours, encode it as it is
            pass
    return encode.field_table(value)


@functools.lru_cache(maxsize=1024)
def _header_table(key: tuple[tuple[tuple[str, Any], ...], tuple[type, ...]]) -> bytes:
    # most task messages of one task share their headers (name, attempt, protocol)
    return encode.field_table(dict(key[0]))


_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "content_type": encode.short_string,
    "correlation_id": encode.short_string,
    "message_id": encode.short_string,
    "reply_to": encode.short_string,
    "delivery_mode": encode.octet,
    "timestamp": encode.timestamp,
    "headers": _encode_headers,
}


class TaskProperties(spec.Basic.Properties):
    """`Basic.Properties` whose own fields are encoded without pamqp's per-field type lookup.

    The bytes are pamqp's (the same encoders, the same order and flags); only the dispatch is
    direct, and a header table already seen is not encoded again. pamqp's generic path took
    19 µs per task message, most of a submit's encoding work.
    """

    def encode_property(self, name: str, value: Any) -> bytes:
        encoder = _ENCODERS.get(name)
        if encoder is None:
            return super().encode_property(name, value)
        return encoder(value)

    def marshal(self) -> bytes:
        """pamqp's `marshal` (same fields, order, flags and bytes), with short strings
        written here; anything else, and any string pamqp would refuse, through
        `encode_property`, so errors are pamqp's too."""
        flags = 0
        parts = []
        for name, flag, short in _LAYOUT:
            value = getattr(self, name)
            if value is None or value == "":
                continue
            flags |= flag
            if short and type(value) is str:
                data = value.encode()
                if len(data) <= _SHORT_MAX:
                    parts.append(_BYTE.pack(len(data)) + data)
                    continue
            parts.append(self.encode_property(name, value))
        return _FLAGS.pack(flags & 0xFFFE) + b"".join(parts)


# Each property in pamqp's order: its name, its flag bit, whether it is a short string.
# (Basic's flags fit in one 16-bit word, so pamqp writes no continuation word.)
_LAYOUT: tuple[tuple[str, int, bool], ...] = tuple(
    (name, spec.Basic.Properties.flags[name], spec.Basic.Properties.amqp_type(name) == "shortstr")
    for name in spec.Basic.Properties.__slots__
)
assert max(flag for _, flag, _ in _LAYOUT) <= 0xFFFF
_BYTE, _FLAGS = struct.Struct(">B"), struct.Struct(">H")
_SHORT_MAX = 255
