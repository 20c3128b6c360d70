"""The event batch codec and the publisher's buffer, without a broker (or on memory://)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

import aioqueue.testing as testing
from aioqueue import App, Settings
from aioqueue.errors import DecodeError
from aioqueue.events import EventPublisher, EventReader
from aioqueue.message.events import (
    Event,
    bounded_repr,
    call_repr,
    decode_batch,
    encode_batch,
)
from aioqueue.topology import EVENTS_STREAM, events_stream_arguments


def test_a_batch_round_trips() -> None:
    events = [
        Event("task-started", 1.5, "h:1", {"id": "a", "attempt": 1}),
        Event("worker-heartbeat", 2, "h:1", {"running": [{"id": "a"}], "interval": 5.0}),
    ]
    assert decode_batch(encode_batch(events), 1 << 20) == events


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{}",
        b"[1]",
        b'[{"time": 1, "worker": "w"}]',
        b'[{"type": "", "time": 1, "worker": "w"}]',
        b'[{"type": "x", "time": true, "worker": "w"}]',
        b'[{"type": "x", "time": "1", "worker": "w"}]',
        b'[{"type": "x", "time": 1, "worker": 3}]',
        b"[" * 200 + b"]" * 200,
    ],
)
def test_malformed_batches_are_decode_errors(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_batch(body, 1 << 20)


def test_a_batch_over_the_size_limit_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="over the limit"):
        decode_batch(b"[" + b" " * 100 + b"]", 50)


@given(st.binary(max_size=500))
def test_arbitrary_bytes_decode_or_raise_decode_error(body: bytes) -> None:
    try:
        decode_batch(body, 1 << 20)
    except DecodeError:
        pass


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no")


def test_reprs_are_bounded_and_never_raise() -> None:
    assert len(bounded_repr("x" * 5000)) == 1000
    assert bounded_repr("x" * 5000).endswith("…")
    assert bounded_repr(Unrepresentable()).startswith("<unrepresentable Unrepresentable")
    assert call_repr([1, "a"], {"k": None}) == "1, 'a', k=None"
    assert len(call_repr(["y" * 3000], {})) == 1000


def test_the_stream_arguments_come_from_settings() -> None:
    settings = Settings(events_max_bytes=1024, events_max_age="1h")
    assert events_stream_arguments(settings) == {
        "x-queue-type": "stream",
        "x-max-length-bytes": 1024,
        "x-max-age": "1h",
        "x-stream-max-segment-size-bytes": 8 * 1024 * 1024,
    }


async def test_a_full_buffer_drops_the_oldest_and_counts() -> None:
    url = f"memory://codec-{uuid.uuid4().hex[:8]}"
    app = App("tests", broker_url=url)
    try:
        async with app:
            publisher = EventPublisher(app.broker, buffer=3, flush_interval=60.0, batch_size=100)
            drops: list[int] = []
            publisher.on_dropped.append(drops.append)
            await publisher.start()
            for i in range(5):
                publisher.emit(Event("task-received", float(i), "h:1", {"id": str(i)}))
            assert publisher.statistics().dropped == 2
            assert drops == [1, 1]
            await publisher.close()
            async with EventReader(app, since="first") as reader:
                got = await reader.drain(idle=0.2)
            assert [e.get("id") for e in got] == ["2", "3", "4"]
            assert publisher.statistics().published == 3
            assert publisher.statistics().batches == 1
    finally:
        testing.reset(url)


async def test_batches_hold_at_most_batch_size_events() -> None:
    url = f"memory://codec-{uuid.uuid4().hex[:8]}"
    app = App("tests", broker_url=url)
    try:
        async with app:
            publisher = EventPublisher(app.broker, batch_size=4)
            await publisher.start()
            for i in range(10):
                publisher.emit(Event("task-received", float(i), "h:1", {"id": str(i)}))
            await publisher.close()
            broker = app.broker
            assert isinstance(broker, testing.MemoryBroker)
            stream = broker.streams[EVENTS_STREAM]
            assert [len(decode_batch(e.body, 1 << 20)) for e in stream.entries] == [4, 4, 2]
    finally:
        testing.reset(url)


_FIELDS = st.dictionaries(
    st.text(max_size=6).filter(lambda k: k not in ("type", "time", "worker")),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=8)),
    max_size=5,
)


@given(st.lists(st.tuples(st.sampled_from(["task-started", "task-received"]), _FIELDS), max_size=6))
async def test_events_emitted_from_fields_are_the_bytes_of_the_same_events(
    emitted: list[tuple[str, dict[str, object]]],
) -> None:
    # Given a publisher (no broker needed to buffer) and the same events made two ways
    publisher = EventPublisher(object())  # type: ignore[arg-type]
    events = []
    for i, (kind, fields) in enumerate(emitted):
        events.append(Event(kind, 1.5 + i, "h:1", dict(fields)))
        if i % 2:
            publisher.emit(events[-1])
        else:
            publisher.emit_fields(kind, 1.5 + i, "h:1", dict(fields))
    # When the buffer is encoded as one batch, Then it is `encode_batch` of those events
    rows = publisher._take()
    from aioqueue.message import dumps

    assert dumps(rows) == encode_batch(events)
    assert decode_batch(dumps(rows), 1 << 20) == events
