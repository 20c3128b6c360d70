"""The event batch codec and the publisher's buffer, without a broker (or on memory://)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import aioqueue.testing as testing
from aioqueue import App, Settings
from aioqueue.errors import DecodeError
from aioqueue.events import EventPublisher, EventReader
from aioqueue.events.publisher import IN_FLIGHT
from aioqueue.message.events import (
    Event,
    bounded_repr,
    call_repr,
    decode_batch,
    encode_batch,
)
from aioqueue.topology import EVENTS_STREAM, events_stream_arguments
from tests.waiting import wait_until


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


class _ConfirmingStream:
    """A stand-in for the broker under `EventPublisher`'s scheduling: each stream publish
    waits until the test confirms it (what RabbitMQ's confirm latency does to the
    publisher; delivery itself is tested against RabbitMQ in tests/test_events.py)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self.confirmed: list[bytes] = []

    def now(self) -> float:
        return time.time()

    def is_declared(self, name: str) -> bool:
        return True

    async def redeclare_queue(self, name: str, arguments: object) -> None:
        return None

    async def publish(self, queue: str, body: bytes, properties: object, **_: object) -> None:
        confirm = asyncio.get_running_loop().create_future()
        self.waiting.append((body, confirm))
        await confirm
        self.confirmed.append(body)

    def confirm_oldest(self) -> None:
        _, confirm = self.waiting.pop(0)
        confirm.set_result(None)

    async def confirm_until(self, done: Callable[[], bool]) -> None:
        """Confirm each publish as it comes, until ``done()``."""
        while not done():
            if self.waiting:
                self.confirm_oldest()
            await asyncio.sleep(0)  # sleep-ok: one turn of the loop for the publisher's tasks

    def ids(self, limit: int = 1 << 20) -> list[object]:
        """The ids of the events confirmed, in the order they were published."""
        return [e.fields["id"] for body in self.confirmed for e in decode_batch(body, limit)]


async def _with_batches_out(
    batch_size: int, events: int
) -> tuple[_ConfirmingStream, EventPublisher]:
    """A started publisher that was handed ``events`` events and has `IN_FLIGHT` batches
    waiting for their confirms."""
    stream = _ConfirmingStream()
    publisher = EventPublisher(stream, batch_size=batch_size, flush_interval=60.0)  # type: ignore[arg-type]
    await publisher.start()
    for i in range(events):
        publisher.emit(Event("task-received", float(i), "h:1", {"id": str(i)}))
    await wait_until(lambda: len(stream.waiting) == IN_FLIGHT, what="IN_FLIGHT batches out")
    return stream, publisher


async def test_batches_await_their_confirms_in_flight_at_most_in_flight_at_once() -> None:
    sent = 2 * (IN_FLIGHT + 3)
    # batches go out without waiting for the confirms before them, up to IN_FLIGHT
    stream, publisher = await _with_batches_out(2, sent)
    assert publisher.statistics().buffered == 2 * 3
    stream.confirm_oldest()
    await wait_until(lambda: len(stream.waiting) == IN_FLIGHT and len(stream.confirmed) == 1)
    await stream.confirm_until(lambda: not stream.waiting and not publisher.statistics().buffered)
    await publisher.close()
    assert stream.ids() == [str(i) for i in range(sent)]  # every event, in the order emitted
    statistics = publisher.statistics()
    assert (statistics.published, statistics.batches, statistics.dropped) == (sent, sent // 2, 0)


async def test_batches_cut_short_by_close_are_counted_as_dropped() -> None:
    emitted = 3 * (IN_FLIGHT + 2) + 1
    stream, publisher = await _with_batches_out(3, emitted)
    stream.confirm_oldest()
    await wait_until(lambda: publisher.statistics().published == 3, what="one batch confirmed")
    # no confirm comes any more: close gives up on the batches in flight and the rest
    await publisher.close(timeout=0.2)
    statistics = publisher.statistics()
    assert statistics.published == 3
    assert statistics.dropped == emitted - 3
    assert statistics.buffered == 0


async def test_a_batch_over_the_readers_size_limit_goes_as_smaller_ones() -> None:
    limit = 4096
    stream = _ConfirmingStream(Settings(max_message_size=limit))
    publisher = EventPublisher(stream, batch_size=64, flush_interval=60.0)  # type: ignore[arg-type]
    for i in range(20):  # ~500 bytes each: 20 of them are 10 KB, over the 4 KB limit
        publisher.emit(Event("task-failed", float(i), "h:1", {"id": str(i), "tb": "x" * 480}))
    flushing = asyncio.ensure_future(publisher.flush())
    await stream.confirm_until(flushing.done)
    await flushing
    sizes = [len(body) for body in stream.confirmed]
    assert len(sizes) > 1 and max(sizes) <= limit
    assert stream.ids(limit) == [str(i) for i in range(20)]
    assert publisher.statistics().dropped == 0


async def test_a_flush_racing_the_publisher_for_room_sends_no_empty_batch() -> None:
    sent = 2 * (IN_FLIGHT + 1)
    stream, publisher = await _with_batches_out(2, sent)
    flushing = asyncio.ensure_future(publisher.flush())  # waits for room too, one batch left
    await stream.confirm_until(flushing.done)
    await flushing
    await publisher.close()
    assert all(decode_batch(body, 1 << 20) for body in stream.confirmed)  # none empty
    assert publisher.statistics().batches == IN_FLIGHT + 1
    assert publisher.statistics().published == sent
