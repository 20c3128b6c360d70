"""The fast read of a delivery's frames (`aioqueue.rabbit.decode.fast_frame`): exactly what
``pamqp.frame.unmarshal`` reads from the same bytes — equal objects, every value of the same
type — or None, and then pamqp reads it; never an exception, whatever the bytes."""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import decimal
import math
import struct
from typing import Any

import pamqp.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.header import ContentHeader

from aioqueue.message import H_UNDECODABLE
from aioqueue.rabbit import decode
from aioqueue.rabbit.decode import fast_frame
from aioqueue.rabbit.inbound import read_leniently
from aioqueue.rabbit.reader import WholeBufferReader, WholeBufferReceiver

PAMQP_UNMARSHAL = pamqp.frame.unmarshal  # lenient only inside a read_leniently context
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fast(data: bytes, before: bytes = b"", after: bytes = b"") -> Any:
    """`fast_frame` over one whole frame ``data`` inside a buffer with other bytes around it."""
    buffer = bytearray(before + data + after)
    start = len(before) + 7
    end = start + int.from_bytes(data[3:7], "big")
    return fast_frame(data[0], buffer, start, end)


def pamqps(data: bytes) -> Any:
    """pamqp's frame, or None when pamqp refuses the bytes (any exception)."""
    try:
        weight, _, frame = PAMQP_UNMARSHAL(data)
    except Exception:
        return None
    assert weight == len(data)
    return frame


def same_value(ours: Any, theirs: Any) -> None:
    """Equal, and of the same type all the way down (dict order included)."""
    assert type(ours) is type(theirs), (ours, theirs)
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs)
        for key in theirs:
            same_value(ours[key], theirs[key])
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs)
        for mine, its in zip(ours, theirs, strict=True):
            same_value(mine, its)
    elif isinstance(theirs, float) and math.isnan(theirs):
        assert math.isnan(ours)
    elif isinstance(theirs, decimal.Decimal):
        assert ours.as_tuple() == theirs.as_tuple()
    elif isinstance(theirs, datetime.datetime):
        assert (ours, ours.tzinfo) == (theirs, theirs.tzinfo)
    else:
        assert ours == theirs


def has_nan(value: Any) -> bool:
    if isinstance(value, dict):
        return any(has_nan(item) for item in value.values())
    if isinstance(value, list):
        return any(has_nan(item) for item in value)
    return isinstance(value, float) and math.isnan(value)


def same_frame(ours: Any, theirs: Any) -> None:
    assert type(ours) is type(theirs)
    if isinstance(theirs, ContentHeader):
        assert vars(ours).keys() == vars(theirs).keys()
        assert (ours.class_id, ours.weight, ours.body_size) == (
            theirs.class_id,
            theirs.weight,
            theirs.body_size,
        )
        if not has_nan(theirs.properties.headers):  # NaN != NaN: same_value below checks
            assert ours.properties == theirs.properties
        ours, theirs = ours.properties, theirs.properties
    for slot in theirs.__slots__:
        same_value(getattr(ours, slot), getattr(theirs, slot))


def check(data: bytes, *, must_read: bool = False) -> Any:
    """The fast read equals pamqp's or declines; with ``must_read``, it reads what pamqp reads."""
    ours = fast(data, before=b"\x08\x00\x00", after=b"\xce\x01\x00")
    theirs = pamqps(data)
    if ours is not None:
        assert theirs is not None, "read what pamqp refuses"
        same_frame(ours, theirs)
    elif must_read:
        assert theirs is None, "declined a frame pamqp reads"
    return ours


def wire_frame(kind: int, payload: bytes, channel: int = 1) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


# -- frames pamqp writes -----------------------------------------------------------------------

text = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
name = st.text(alphabet="abcXYZ019.-_:", max_size=40)
floats32 = st.floats(width=32)
leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | floats32
    | st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False)
    | text
    | st.binary(max_size=30).map(bytearray)
    | st.datetimes(
        min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2105, 1, 1)
    ).map(lambda d: d.replace(microsecond=0, tzinfo=datetime.UTC))
)
field_values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
stamps = st.datetimes(min_value=datetime.datetime(1970, 1, 2)).map(
    lambda d: d.replace(microsecond=0, tzinfo=datetime.UTC)
)
properties = st.builds(
    spec.Basic.Properties,
    content_type=st.none() | text,
    content_encoding=st.none() | text,
    headers=st.none() | st.dictionaries(text, field_values, max_size=6),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 255),
    correlation_id=st.none() | text,
    reply_to=st.none() | text,
    expiration=st.none() | text,
    message_id=st.none() | text,
    timestamp=st.none() | stamps,
    message_type=st.none() | text,
    user_id=st.none() | text,
    app_id=st.none() | text,
)


@SETTINGS
@given(
    method=st.builds(
        spec.Basic.Deliver,
        consumer_tag=text,
        delivery_tag=st.integers(0, 2**63 - 1),
        redelivered=st.booleans(),
        exchange=name,
        routing_key=text,
    )
    | st.builds(spec.Basic.Ack, delivery_tag=st.integers(0, 2**63 - 1), multiple=st.booleans()),
    channel=st.integers(0, 2**16 - 1),
)
def test_deliveries_and_confirms_pamqp_writes_are_read_as_pamqp_reads_them(
    method: spec.Basic.Deliver | spec.Basic.Ack, channel: int
) -> None:
    # Given a Basic.Deliver or a publisher confirm (Basic.Ack) frame marshalled by pamqp
    data = pamqp.frame.marshal(method, channel)
    # When the fast path reads it, Then it is pamqp's own read (never declined)
    assert check(data, must_read=True) is not None


@SETTINGS
@given(props=properties, body_size=st.integers(0, 2**64 - 1), channel=st.integers(0, 99))
def test_content_headers_pamqp_writes_are_read_as_pamqp_reads_them(
    props: spec.Basic.Properties, body_size: int, channel: int
) -> None:
    # Given a content header with any properties and headers pamqp can write
    data = pamqp.frame.marshal(ContentHeader(0, body_size, props), channel)
    # When the fast path reads it, Then it is pamqp's own read (never declined)
    assert check(data, must_read=True) is not None


# -- frames written byte by byte: what pamqp cannot write (bytes that are not UTF-8, 'd', 'L',
# -- millisecond timestamps, stamps past year 9999, ...) -----------------------------------------


def short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def long(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def mostly(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> Any:
    """``usual`` four times in five: most frames stay readable, so their values get compared."""
    return st.one_of(usual, usual, usual, usual, rare)


readable_stamps = (
    st.integers(0, 2**32 - 1) | st.integers(2**32, 253_402_300_799_999)  # s; ms to 9999
).map(lambda n: struct.pack(">Q", n))
stamp_values = mostly(  # any 64 bits: mostly past the year 9999, which pamqp refuses
    readable_stamps, st.binary(min_size=8, max_size=8)
)
utf8 = st.text(max_size=30).map(str.encode)
raw_text = mostly(utf8, st.binary(max_size=30))  # short strings: pamqp refuses non-UTF-8


def raw_tables(keys: st.SearchStrategy[bytes], stamps: st.SearchStrategy[bytes]) -> Any:
    """Field tables of every type RabbitMQ relays (a long string's bytes need not be UTF-8)."""
    leaf = st.one_of(
        st.tuples(st.sampled_from(b"tbB"), st.binary(min_size=1, max_size=1)),
        st.tuples(st.sampled_from(b"su"), st.binary(min_size=2, max_size=2)),
        st.tuples(st.sampled_from(b"Iif"), st.binary(min_size=4, max_size=4)),
        st.tuples(st.sampled_from(b"lLd"), st.binary(min_size=8, max_size=8)),
        st.tuples(st.just(ord("D")), st.binary(min_size=5, max_size=5)),
        st.tuples(st.just(ord("T")), stamps),
        st.tuples(st.sampled_from(b"Sx"), (utf8 | st.binary(max_size=30)).map(long)),
        st.tuples(st.sampled_from(b"V\x00"), st.just(b"")),
    ).map(lambda kv: bytes([kv[0]]) + kv[1])

    def entries(values: Any) -> Any:
        return st.lists(st.tuples(keys, values), max_size=5).map(
            lambda kvs: long(b"".join(short(k) + v for k, v in kvs))
        )

    values = st.recursive(
        leaf,
        lambda inner: (
            st.lists(inner, max_size=4).map(lambda vs: b"A" + long(b"".join(vs)))
            | entries(inner).map(lambda table: b"F" + table)
        ),
        max_leaves=12,
    )
    return entries(values)


raw_table = raw_tables(mostly(utf8, st.binary(max_size=8)), stamp_values)
raw_fields = {  # flag bit -> the field's bytes
    1 << 15: raw_text.map(short),
    1 << 14: raw_text.map(short),
    1 << 13: raw_table,
    1 << 12: st.binary(min_size=1, max_size=1),
    1 << 11: st.binary(min_size=1, max_size=1),
    **{1 << bit: raw_text.map(short) for bit in (10, 9, 8, 7, 5, 4, 3, 2)},
    1 << 6: stamp_values,
}


@st.composite
def raw_content_headers(draw: st.DrawFn) -> bytes:
    present = {bit: draw(field) for bit, field in raw_fields.items() if draw(st.booleans())}
    flags = sum(present)
    head = struct.pack(">HHQH", 60, 0, draw(st.integers(0, 2**64 - 1)), flags)
    return head + b"".join(present[bit] for bit in sorted(present, reverse=True))


@SETTINGS
@given(payload=raw_content_headers())
def test_content_headers_written_byte_by_byte_read_as_pamqp_or_declined(payload: bytes) -> None:
    # Given a well-formed content header with any bytes in its strings, tables and stamps
    data = wire_frame(2, payload)
    # When the fast path reads it, Then it reads whatever pamqp reads, exactly; where pamqp
    # refuses (text that is not UTF-8, a stamp past 9999), it declines and pamqp's error stands
    check(data, must_read=True)


@SETTINGS
@given(table=raw_tables(utf8, readable_stamps))
def test_headers_of_every_type_are_read_as_pamqp_reads_them(table: bytes) -> None:
    # Given a content header whose headers hold values of every type, nested, UTF-8 or not
    data = wire_frame(2, struct.pack(">HHQH", 60, 0, 1, 0x2000) + table)
    # When the fast path reads it, Then it is pamqp's own read (never declined)
    assert check(data, must_read=True) is not None


@SETTINGS
@given(table=raw_tables(utf8, readable_stamps))
def test_a_header_table_read_again_is_read_as_pamqp_reads_it(table: bytes) -> None:
    # Given a content header read once (its table now known, if its values are immutable)
    data = wire_frame(2, struct.pack(">HHQH", 60, 0, 1, 0x2000) + table)
    first = fast(data)
    assert first is not None
    # When a delivery with the same header is read again, after the first one's headers were
    # changed by their reader (a nested value too, where there is one)
    for value in first.properties.headers.values():
        if isinstance(value, dict | list | bytearray):
            value.clear()
    first.properties.headers["added"] = 1
    # Then the second read is still pamqp's own, in objects of its own
    second = check(data, must_read=True)
    assert second.properties.headers is not first.properties.headers


def test_known_header_tables_start_over_when_too_many() -> None:
    # Given more distinct header tables than the cache keeps (one value differs in each)
    frames = [
        wire_frame(
            2,
            struct.pack(">HHQH", 60, 0, 1, 0x2000)
            + long(short(b"n") + b"I" + struct.pack(">i", i)),
        )
        for i in range(decode._TABLES_MAX + 10)
    ]
    # When all are read, Then each is read as pamqp reads it and the cache stays bounded
    for data in frames:
        assert check(data, must_read=True) is not None
        assert len(decode._TABLES) <= decode._TABLES_MAX


@SETTINGS
@given(
    strings=st.lists(raw_text.map(short), min_size=3, max_size=3),
    tag=st.binary(min_size=8, max_size=8),
    bits=st.binary(min_size=1, max_size=1),
)
def test_deliveries_written_byte_by_byte_read_as_pamqp_or_declined(
    strings: list[bytes], tag: bytes, bits: bytes
) -> None:
    # Given a Basic.Deliver with any bytes in its strings, any tag (past 2**63 too), any bits
    payload = b"\x00\x3c\x00\x3c" + strings[0] + tag + bits + strings[1] + strings[2]
    # When / Then: pamqp's read exactly, or declined where pamqp refuses
    check(wire_frame(1, payload), must_read=True)


@SETTINGS
@given(tag=st.binary(min_size=8, max_size=8), bits=st.binary(min_size=1, max_size=1))
def test_confirms_written_byte_by_byte_read_as_pamqp_reads_them(tag: bytes, bits: bytes) -> None:
    # Given a Basic.Ack with any tag (past 2**63 too) and any bits (those pamqp ignores too)
    payload = b"\x00\x3c\x00\x50" + tag + bits
    # When / Then: pamqp's read exactly
    assert check(wire_frame(1, payload), must_read=True) is not None


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x3c\x00\x50" + bytes(8),  # no bits octet: pamqp's read decides
        b"\x00\x3c\x00\x50" + bytes(9) + b"+",  # trailing
        b"\x00\x3c\x00\x78" + bytes(9),  # Basic.Nack: pamqp reads it
    ],
    ids=["short", "trailing", "nack"],
)
def test_unusual_confirms_are_declined(payload: bytes) -> None:
    assert fast(wire_frame(1, payload)) is None


# -- arbitrary bytes ---------------------------------------------------------------------------

prefixes = st.sampled_from(
    [
        *(b"", b"\x00\x3c\x00\x3c", b"\x00\x3c\x00\x00", b"\x00\x3c\x00\x3c\x03abc"),
        *(b"\x00\x3c", b"\x00\x3c\x00\x50", b"\x00\x3c\x00\x50" + bytes(8)),
    ]
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from([1, 2, 3, 8]),
    prefix=prefixes,
    payload=st.binary(max_size=120),
    length_change=st.integers(-20, 20),
    frame_end=st.sampled_from([b"\xce", b"\xce", b"\x00"]),
    after=st.binary(max_size=20),
)
def test_arbitrary_bytes_never_raise_and_never_differ_from_pamqp(
    kind: int, prefix: bytes, payload: bytes, length_change: int, frame_end: bytes, after: bytes
) -> None:
    # Given a frame of any payload, its length said right or wrong, and any bytes after it
    body = prefix + payload
    length = max(0, len(body) + length_change)
    buffer = bytearray(struct.pack(">BHI", kind, 1, length) + body + frame_end + after)
    end = 7 + length
    # When the fast path reads it (never raising, even past the buffer's end)
    ours = fast_frame(kind, buffer, 7, end)
    # Then what it reads is exactly what pamqp reads from the same frame
    if ours is not None:
        theirs = pamqps(bytes(buffer[: end + 1]))
        assert theirs is not None
        same_frame(ours, theirs)


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack(">HHQH", 60, 0, 5, 0x8001) + b"\x00\x00" + short(b"x"),  # continuation
        struct.pack(">HHQH", 60, 0, 5, 0x8000) + short(b"text/plain") + b"+",  # trailing
        struct.pack(">HHQH", 60, 0, 5, 0x8000) + b"\x05abc",  # string past the end
        struct.pack(">HHQH", 60, 1, 5, 0),  # weight
        struct.pack(">HHQH", 50, 0, 5, 0),  # not Basic
        struct.pack(">HHQH", 60, 0, 5, 0x0002),  # a flag Basic does not have
        struct.pack(">HHQH", 60, 0, 5, 0x2000) + long(short(b"k") + b"Z"),  # unknown type
        struct.pack(">HHQH", 60, 0, 5, 0x2000) + long(short(b"k")),  # a key with no value
        struct.pack(">HHQH", 60, 0, 5, 0x2000) + long(short(b"k") + b"A" + long(b"I\0"))[:-1],
    ],
    ids=[
        "continuation",
        "trailing",
        "overrun",
        "weight",
        "class",
        "flag",
        "unknown-type",
        "no-value",
        "array-overrun",
    ],
)
def test_unusual_content_headers_are_declined(payload: bytes) -> None:
    assert fast(wire_frame(2, payload)) is None


def test_a_frame_with_a_bad_end_is_declined() -> None:
    data = pamqp.frame.marshal(spec.Basic.Deliver("ctag", 1, False, "", "key"), 1)
    assert fast(data) is not None
    assert fast(data[:-1] + b"\x00") is None


# -- in the receiver ---------------------------------------------------------------------------


async def read_frames(data: bytes, count: int, context: contextvars.Context | None = None) -> Any:
    reader = WholeBufferReader()
    reader.feed_data(data)
    reader.feed_eof()
    receiver = WholeBufferReceiver(reader)

    async def read() -> list[Any]:
        return [await receiver.get_frame() for _ in range(count)]

    return await asyncio.create_task(read(), context=context)


async def test_the_receiver_reads_a_deliverys_frames_without_pamqps_unmarshal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a delivery's method and content header, and pamqp's generic read made unavailable
    header = ContentHeader(0, 3, spec.Basic.Properties(message_id="m", headers={"a": 1}))
    wire = [
        pamqp.frame.marshal(spec.Basic.Deliver("ctag", 7, True, "ex", "key"), 2),
        pamqp.frame.marshal(header, 2),
    ]
    expected = [PAMQP_UNMARSHAL(data) for data in wire]

    def refuse(data: bytes) -> Any:
        raise AssertionError("pamqp.frame.unmarshal called")

    monkeypatch.setattr(pamqp.frame, "unmarshal", refuse)
    # When our receiver reads them
    frames = await read_frames(b"".join(wire), 2)
    # Then both are read as pamqp reads them (weights, channels and objects)
    assert [frame[:2] for frame in frames] == [frame[:2] for frame in expected]
    for (_, _, ours), (_, _, theirs) in zip(frames, expected, strict=True):
        same_frame(ours, theirs)


async def test_a_declined_header_still_reads_leniently() -> None:
    # Given a content header whose message_id is not UTF-8 (pamqp refuses it), on a connection
    # that reads leniently
    payload = struct.pack(">HHQH", 60, 0, 3, 0x0080) + short(b"\xff\xfe")
    context = contextvars.copy_context()
    context.run(read_leniently)
    # When our receiver reads it
    [(_, channel, header)] = await read_frames(wire_frame(2, payload), 1, context)
    # Then the lenient rewrite applied: the raw message id is kept aside, the frame is read
    assert channel == 1
    assert header.properties.message_id is None
    assert dict(header.properties.headers[H_UNDECODABLE]) == {"message_id": bytearray(b"\xff\xfe")}
