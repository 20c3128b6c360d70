"""Frames from RabbitMQ that pamqp cannot read, made readable instead of closing the connection.

RabbitMQ relays a message's properties and headers as the publisher wrote them. Some of what it
accepts cannot be read by pamqp, the frame decoder under aiormq: a header name or a
``message_id`` that is not UTF-8, a timestamp past the year 9999. aiormq treats such a frame as a
broken connection and closes it; RabbitMQ then redelivers the same message first, for ever, and
every message behind it waits. Any client allowed to publish could stall every worker this way.

`read_leniently` (called by our transport factory as each of our connections opens) makes
pamqp's ``frame.unmarshal`` lenient for that connection: a frame it cannot read is rewritten into
one it can, and read again:

- a content header keeps every property and header entry that can be read, byte for byte;
  what cannot is moved, as its raw bytes, into the table header ``aioqueue-undecodable``
  (property name, or ``headers.<key>``, -> bytes), so nothing is lost and every consumer can
  tell the message is unreadable (the worker dead-letters it with the reason ``decode``);
- a delivery's exchange or routing key that is not UTF-8 is replaced by readable text.

Frames that read fine cost nothing more than one call: the rewrite runs only after pamqp
refused a frame. The scope is a context variable set where aiormq opens the connection, which
its reader task inherits: other aiormq connections of the process keep pamqp's behaviour.
The hooks (``pamqp.frame.unmarshal``, called by aiormq's ``FrameReceiver.get_frame`` by module
attribute, in the reader task that ``Connection.connect`` starts) are listed in
`aioqueue.rabbit.internals`; ``tests/test_inbound.py`` runs aiormq's own receiver over bad
frames, so an upgrade that changes them fails there, loudly.
"""

from __future__ import annotations

import struct
from contextvars import ContextVar
from typing import Final

import pamqp.frame
from pamqp import decode
from pamqp.header import ContentHeader

from ..message import H_UNDECODABLE

__all__ = [
    "read_leniently",
    "readable_content_header",
    "readable_frame",
    "readable_method",
]

_METHOD, _HEADER = 1, 2
_SHORT, _TABLE, _OCTET, _STAMP = "s", "F", "o", "T"
# Basic.Properties in wire order: (flag bit, name, kind)
_PROPERTIES: Final = (
    (1 << 15, "content_type", _SHORT),
    (1 << 14, "content_encoding", _SHORT),
    (1 << 13, "headers", _TABLE),
    (1 << 12, "delivery_mode", _OCTET),
    (1 << 11, "priority", _OCTET),
    (1 << 10, "correlation_id", _SHORT),
    (1 << 9, "reply_to", _SHORT),
    (1 << 8, "expiration", _SHORT),
    (1 << 7, "message_id", _SHORT),
    (1 << 6, "timestamp", _STAMP),
    (1 << 5, "message_type", _SHORT),
    (1 << 4, "user_id", _SHORT),
    (1 << 3, "app_id", _SHORT),
    (1 << 2, "cluster_id", _SHORT),
)
_U32 = struct.Struct(">I")
_UNDECODABLE_KEY: Final = H_UNDECODABLE.encode()
# bytes a table value of each type takes after its type octet; None: a 4-byte length follows
_VALUE_SIZE: Final[dict[int, int | None]] = {
    **{ord(c): 1 for c in "tbB"},
    **{ord(c): 2 for c in "su"},
    **{ord(c): 4 for c in "Iif"},
    **{ord(c): 8 for c in "lLdT"},
    ord("D"): 5,
    ord("V"): 0,
    0: 0,
    **{ord(c): None for c in "SAFx"},
}


_LENIENT: ContextVar[bool] = ContextVar("aioqueue_lenient_frames", default=False)


def read_leniently() -> None:
    """Read frames leniently in this context and every task started from it (call it where
    aiormq opens a connection: its reader task inherits the context)."""
    _install()
    _LENIENT.set(True)


def _install() -> None:
    unmarshal = pamqp.frame.unmarshal
    if getattr(unmarshal, "_aioqueue_lenient", False):
        return

    def lenient_unmarshal(data_in: bytes) -> tuple[int, int, pamqp.frame.FrameTypes]:
        try:
            return unmarshal(data_in)
        except Exception:
            fixed = readable_frame(data_in) if _LENIENT.get() else None
            if fixed is None:
                raise
            return unmarshal(fixed)

    lenient_unmarshal._aioqueue_lenient = True  # type: ignore[attr-defined]
    pamqp.frame.unmarshal = lenient_unmarshal


def readable_frame(frame: bytes) -> bytes | None:
    """A method or content-header frame (header, payload, frame end) that pamqp can read in
    place of ``frame``, or None when there is nothing to rewrite."""
    if len(frame) < 8 or frame[0] not in (_METHOD, _HEADER):
        return None
    end = 7 + int.from_bytes(frame[3:7], "big")
    check = readable_method if frame[0] == _METHOD else readable_content_header
    try:
        fixed = check(bytes(frame[7:end]))
    except Exception:  # pragma: no cover - a frame RabbitMQ would not send: pamqp's error
        return None
    if fixed is None:
        return None
    return bytes(frame[:3]) + _U32.pack(len(fixed)) + fixed + bytes(frame[end : end + 1])


# -- content headers -------------------------------------------------------------------------


def readable_content_header(payload: bytes) -> bytes | None:
    """None if pamqp can read this content-header payload, else a readable rewrite of it."""
    try:
        ContentHeader().unmarshal(payload)  # pamqp's own read: what it reads is readable
        return None
    except Exception:  # anything at all that stops a read: rebuild below
        return _rebuild_header(payload)


def _rebuild_header(payload: bytes) -> bytes:
    """The header with every part that reads kept byte for byte, the rest moved, raw, into
    the ``aioqueue-undecodable`` table (nothing is decoded and encoded again: a value pamqp
    reads but cannot write, such as a long string that is not UTF-8, stays as it was)."""
    flags = (payload[12] << 8) | payload[13]
    kept: list[tuple[int, bytes]] = []  # (flag bit, raw field) of what reads
    bad: dict[str, bytes] = {}
    headers: list[bytes] = []  # raw entries of the header table that read
    offset = 14
    if flags & 1:  # a second flag word: a layout that is not Basic's; keep it all, raw
        bad["properties"], flags = payload[12:], 0
    for bit, name, kind in _PROPERTIES:
        if not flags & bit:
            continue
        try:
            end = _field_end(payload, offset, kind)
        except (IndexError, ValueError, struct.error):  # lengths past the end
            bad[name] = payload[offset:]
            offset = len(payload)
            break
        raw = payload[offset:end]
        if kind is _TABLE:
            headers = _readable_entries(raw[4:], bad)
        elif _field_reads(raw, kind):
            kept.append((bit, raw))
        else:
            bad[name] = raw[1:] if kind is _SHORT else raw
        offset = end
    if offset < len(payload):
        bad["..."] = payload[offset:]
    headers.append(_undecodable_entry(bad))
    kept.append((1 << 13, _long(b"".join(headers))))
    kept.sort(key=lambda item: -item[0])  # wire order is flag order, highest bit first
    new_flags = sum(bit for bit, _ in kept)
    return payload[:12] + struct.pack(">H", new_flags) + b"".join(raw for _, raw in kept)


def _field_end(payload: bytes, offset: int, kind: str) -> int:
    if kind is _SHORT:
        end = offset + 1 + payload[offset]
    elif kind is _TABLE:
        end = offset + 4 + int(_U32.unpack_from(payload, offset)[0])
    else:
        end = offset + (1 if kind is _OCTET else 8)
    if end > len(payload):
        raise ValueError("field past the end")
    return end


def _field_reads(raw: bytes, kind: str) -> bool:
    try:
        if kind is _SHORT:
            raw[1:].decode()
        elif kind is _STAMP:
            decode.timestamp(raw)
    except Exception:
        return False
    return True


def _readable_entries(body: bytes, bad: dict[str, bytes]) -> list[bytes]:
    """The raw entries of a field table (``body``: without its length) that pamqp reads; the
    others go to ``bad`` as ``headers.<name>`` -> raw value."""
    entries: list[bytes] = []
    offset = 0
    while offset < len(body):
        try:
            key_end = offset + 1 + body[offset]
            end = key_end + 1 + _value_size(body, key_end)
            if end > len(body):
                raise ValueError("value past the end")
        except (IndexError, KeyError, ValueError, struct.error):
            bad["headers..."] = body[offset:]  # the rest cannot be split into entries
            break
        raw_key = body[offset + 1 : key_end]
        try:
            raw_key.decode()
            decode.embedded_value(body[key_end:end])
            if bytes(raw_key) == _UNDECODABLE_KEY:
                raise ValueError("ours to set")
            entries.append(body[offset:end])
        except Exception:
            key = raw_key.decode(errors="backslashreplace")
            bad[f"headers.{key}"] = body[key_end:end]
        offset = end
    return entries


def _value_size(body: bytes, type_offset: int) -> int:
    size = _VALUE_SIZE[body[type_offset]]
    if size is None:
        return 4 + int(_U32.unpack_from(body, type_offset + 1)[0])
    return size


def _undecodable_entry(bad: dict[str, bytes]) -> bytes:
    """The header entry ``aioqueue-undecodable``: a table of name -> byte array ("x")."""
    entries = b"".join(
        _short(name.encode()[:128].decode(errors="ignore").encode()) + b"x" + _long(raw)
        for name, raw in bad.items()
    )
    return _short(_UNDECODABLE_KEY) + b"F" + _long(entries)


def _short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _long(raw: bytes) -> bytes:
    return _U32.pack(len(raw)) + raw


def _short_text(raw: bytes) -> bytes:
    """``raw`` as UTF-8 text (undecodable bytes escaped), cut to a short string's 255 bytes."""
    text = raw.decode(errors="backslashreplace").encode()[:255]
    return text.decode(errors="ignore").encode()


# -- method frames that carry strings the publisher chose ------------------------------------

# (class, method) -> layout after the 4-byte method id: "s" a short string, a number n bytes
_METHOD_LAYOUTS: Final[dict[tuple[int, int], tuple[str | int, ...]]] = {
    (60, 60): ("s", 8, 1, "s", "s"),  # Basic.Deliver: consumer tag, tag, redelivered, ex., key
    (60, 71): (8, 1, "s", "s", 4),  # Basic.GetOk: tag, redelivered, exchange, key, count
    (60, 50): (2, "s", "s", "s"),  # Basic.Return: code, text, exchange, key
}


def readable_method(payload: bytes) -> bytes | None:
    """None if this method frame's strings are UTF-8 (or it carries none of a publisher's),
    else the frame with each unreadable string replaced by readable text."""
    layout = _METHOD_LAYOUTS.get((payload[0] << 8 | payload[1], payload[2] << 8 | payload[3]))
    if layout is None:
        return None
    spans: list[tuple[int, int]] = []  # (start, end) of each short string, length octet first
    offset = 4
    try:
        for item in layout:
            if item == "s":
                end = offset + 1 + payload[offset]
                spans.append((offset, end))
                offset = end
            else:
                offset += int(item)
    except IndexError:  # pragma: no cover - RabbitMQ writes these frames itself
        return None
    bad = [span for span in spans if not _utf8(payload[span[0] + 1 : span[1]])]
    if not bad:
        return None
    parts, last = [], 0
    for start, end in bad:
        text = _short_text(payload[start + 1 : end])
        parts += [payload[last:start], bytes([len(text)]), text]
        last = end
    return b"".join([*parts, payload[last:]])


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True
