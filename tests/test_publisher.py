"""`aioqueue.rabbit.publisher`: the frames it writes, its deadlines, and its publishes on RabbitMQ.

A confirm that never comes (the publish deadline) is tested through a real blackhole in
`tests/test_proxy.py`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from aioqueue.errors import PublishError, UnroutableError
from aioqueue.message import TaskProperties
from aioqueue.rabbit import RabbitBroker
from aioqueue.rabbit.publisher import ChannelPublisher, Deadlines, Slots, publish_frames
from aioqueue.settings import Settings
from tests.conftest import wait_until
from tests.rabbit import RabbitNode


def _aiormq_frames(
    channel: int, exchange: str, key: str, body: bytes, props: Any, max_content: int
) -> bytes:
    """What aiormq's ``basic_publish`` hands its writer for the same publish."""
    chunks = [body[i : i + max_content] for i in range(0, len(body), max_content)]
    frames: list[Any] = [
        spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=True),
        ContentHeader(body_size=len(body), properties=props),
        *(ContentBody(chunk) for chunk in chunks),
    ]
    return ChannelFrame.marshall(channel_number=channel, frames=frames).payload


@pytest.mark.parametrize(
    ("exchange", "body", "max_content"),
    [
        ("", b'{"id":"x"}', 131064),
        ("aioqueue.delay.1", b"", 131064),  # no body frame at all
        ("", bytes(range(256)) * 40, 1000),  # split over 11 body frames, the last one short
        ("", b"x" * 3000, 1000),  # exactly three full frames
    ],
)
def test_publish_frames_are_the_bytes_aiormq_writes(
    exchange: str, body: bytes, max_content: int
) -> None:
    for props in (
        spec.Basic.Properties(content_type="application/json", delivery_mode=2),
        TaskProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id="m" * 32,
            correlation_id="m" * 32,
            reply_to="aioqueue.reply.abc",
            headers={"aioqueue-task": "t.x", "aioqueue-attempt": 1},
        ),
    ):
        ours = publish_frames(
            7, exchange, "q.one", body, props, mandatory=True, max_content=max_content
        )
        assert ours == _aiormq_frames(7, exchange, "q.one", body, props, max_content)


async def test_deadlines_cancel_what_is_still_pending_and_nothing_else() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    late, settled, early = (loop.create_future() for _ in range(3))
    deadlines.add(late, loop.time() + 0.5)
    deadlines.add(settled, loop.time() + 0.05)
    deadlines.add(early, loop.time() + 0.1)  # earlier than the first: the timer moves up
    settled.set_result("confirmed")
    await asyncio.wait([early], timeout=10)
    assert early.cancelled() and not late.done()
    assert settled.result() == "confirmed"
    await asyncio.wait([late], timeout=10)
    assert late.cancelled()
    assert len(deadlines) == 0 and deadlines._timer is None  # nothing kept, no timer left


async def test_settled_futures_leave_the_deadlines_as_new_ones_come() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    for _ in range(1000):
        future = loop.create_future()
        deadlines.add(future, loop.time() + 60)
        future.set_result(None)
    assert len(deadlines) == 1  # only the last, not a minute's worth of settled publishes


@pytest.fixture
async def broker(rabbit: RabbitNode) -> AsyncIterator[RabbitBroker]:
    broker = RabbitBroker(rabbit.url, Settings(publish_timeout=20), connection_name="publisher")
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


def _props() -> spec.Basic.Properties:
    return TaskProperties(delivery_mode=2, message_id=uuid.uuid4().hex)


async def test_a_burst_far_past_the_writer_queue_is_confirmed_and_delivered_in_order(
    broker: RabbitBroker, queue_name: str
) -> None:
    await broker.declare_queue(queue_name, {})
    n = 3000  # aiormq's writer queue holds 10 frame sets; the in-flight cap is 1000
    await asyncio.gather(*(broker.publish(queue_name, b"%d" % i, _props()) for i in range(n)))
    channel = await broker.channel()
    underlay = await channel.get_underlay_channel()
    try:
        bodies = []
        for _ in range(n):
            message = await underlay.basic_get(queue_name, no_ack=True)
            bodies.append(int(message.body))
    finally:
        await underlay.queue_delete(queue_name)
        await channel.close()
    assert bodies == list(range(n))  # every one, once, in the order submitted
    publishing = await broker._channel().get_underlay_channel()
    assert not publishing.confirmations and not publishing.message_id_delivery_tag


async def test_an_unroutable_publish_is_returned_as_unroutable(broker: RabbitBroker) -> None:
    props = _props()
    with pytest.raises(UnroutableError, match=r"returned unroutable: NO_ROUTE$"):
        await broker.publish(f"nowhere.{uuid.uuid4().hex}", b"{}", props)
    publishing = await broker._channel().get_underlay_channel()
    assert props.message_id not in publishing.message_id_delivery_tag


@pytest.fixture
def aiormq_confirms(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The confirm frames aiormq's channel task resolves (those our reader did not take)."""
    seen: list[Any] = []
    original = aiormq.Channel._on_confirm_frame

    async def counting(self: aiormq.Channel, frame: Any) -> None:
        seen.append(frame)
        await original(self, frame)

    monkeypatch.setattr(aiormq.Channel, "_on_confirm_frame", counting)
    return seen


async def _publisher(broker: RabbitBroker) -> ChannelPublisher:
    publisher = broker._publisher
    assert publisher is not None
    return publisher


async def test_confirms_are_taken_by_our_reader_in_publish_order(
    broker: RabbitBroker, queue_name: str, aiormq_confirms: list[Any]
) -> None:
    await broker.declare_queue(queue_name, {})
    for i in range(20):  # one by one: single confirms
        await broker.publish(queue_name, b"%d" % i, _props())
    # bursts: RabbitMQ confirms many at once (multiple=True)
    for _ in range(3):
        await asyncio.gather(*(broker.publish(queue_name, b"b", _props()) for _ in range(500)))
    publisher = await _publisher(broker)
    assert aiormq_confirms == []  # none went through aiormq's channel task
    assert not publisher.channel.confirmations and not publisher._tags
    assert (await broker.queue_depth(queue_name))[0] == 1520
    await broker.delete_queue(queue_name)


async def test_a_nack_taken_by_our_reader_is_a_refusal(
    broker: RabbitBroker, queue_name: str, aiormq_confirms: list[Any]
) -> None:
    await broker.declare_queue(queue_name, {"x-max-length": 0, "x-overflow": "reject-publish"})
    with pytest.raises(PublishError, match="nacked"):
        await broker.publish(queue_name, b"{}", _props(), timeout=0.3)
    assert aiormq_confirms == []
    assert not (await _publisher(broker)).channel.confirmations
    await broker.delete_queue(queue_name)


async def test_a_return_amid_confirms_taken_by_our_reader_still_fails_its_publish(
    broker: RabbitBroker, queue_name: str, aiormq_confirms: list[Any]
) -> None:
    """RabbitMQ sends a ``Basic.Return`` right before the confirm of the same publish: the
    return must be applied first, or the unroutable publish passes as confirmed."""
    await broker.declare_queue(queue_name, {})
    await broker.publish(queue_name, b"first", _props())  # the reader takes the confirms
    assert aiormq_confirms == []
    nowhere = f"nowhere.{uuid.uuid4().hex}"
    keys = [queue_name, nowhere, queue_name, nowhere, queue_name] * 20  # one write, mixed
    outcomes = await asyncio.gather(
        *(broker.publish(key, b"{}", _props()) for key in keys), return_exceptions=True
    )
    for key, outcome in zip(keys, outcomes, strict=True):
        if key == nowhere:
            assert isinstance(outcome, UnroutableError), outcome
        else:
            assert outcome is None, outcome
    # after a return the channel's confirms go to aiormq, which keeps them behind returns
    await broker.publish(queue_name, b"last", _props())
    assert aiormq_confirms
    publisher = await _publisher(broker)
    assert publisher._tags is None and not publisher.channel.confirmations
    assert (await broker.queue_depth(queue_name))[0] == 62
    await broker.delete_queue(queue_name)


async def test_a_refused_publish_fails_at_once_and_the_channel_comes_back(
    broker: RabbitBroker, queue_name: str
) -> None:
    await broker.declare_queue(queue_name, {})
    loop = asyncio.get_running_loop()
    started = loop.time()
    # a missing exchange closes the channel (404): a refusal, not connection trouble
    with pytest.raises(PublishError, match="refused"):
        await broker.publish(queue_name, b"{}", _props(), exchange=f"none.{uuid.uuid4().hex}")
    assert loop.time() - started < 10  # not the 20 s publish deadline
    await broker.publish(queue_name, b"{}", _props())  # on the re-opened channel
    assert (await broker.queue_depth(queue_name))[0] == 1
    await broker.delete_queue(queue_name)


async def test_slots_go_first_come_first_served_and_a_release_hands_one_over() -> None:
    loop = asyncio.get_running_loop()
    slots = Slots(2, Deadlines())
    order: list[int] = []

    async def take(i: int) -> None:
        await slots.acquire(loop.time() + 30)
        order.append(i)

    await take(0)
    await take(1)
    waiting = [asyncio.ensure_future(take(i)) for i in range(2, 6)]
    await wait_until(lambda: len(slots._waiters) == 4, timeout=10, what="four waiters")
    assert order == [0, 1]
    slots.release()
    slots.release()
    await asyncio.wait_for(asyncio.gather(*waiting[:2]), 10)
    assert order == [0, 1, 2, 3] and not any(w.done() for w in waiting[2:])
    for _ in range(2):
        slots.release()
    await asyncio.wait_for(asyncio.gather(*waiting[2:]), 10)
    assert order == [0, 1, 2, 3, 4, 5]


async def test_a_slot_wait_ends_at_its_deadline_and_cancelled_waiters_take_nothing() -> None:
    loop = asyncio.get_running_loop()
    slots = Slots(1, Deadlines())
    await slots.acquire(loop.time() + 30)
    with pytest.raises(TimeoutError):  # no release comes: the deadline ends the wait
        await slots.acquire(loop.time() + 0.1)
    cancelled = asyncio.ensure_future(slots.acquire(loop.time() + 30))
    handed = asyncio.ensure_future(slots.acquire(loop.time() + 30))
    last = asyncio.ensure_future(slots.acquire(loop.time() + 30))
    await wait_until(lambda: len(slots._waiters) == 4, timeout=10, what="three more waiters")
    cancelled.cancel()
    slots.release()  # skips the timed-out and the cancelled waiter: "handed" gets it
    await asyncio.wait_for(handed, 10)
    assert cancelled.cancelled() and not last.done()
    slots.release()
    await asyncio.wait_for(last, 10)
    slots.release()
    await asyncio.wait_for(slots.acquire(loop.time() + 30), 10)  # free again, at once


async def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_passes_on() -> None:
    loop = asyncio.get_running_loop()
    slots = Slots(1, Deadlines())
    await slots.acquire(loop.time() + 30)
    first = asyncio.ensure_future(slots.acquire(loop.time() + 30))
    second = asyncio.ensure_future(slots.acquire(loop.time() + 30))
    await wait_until(lambda: len(slots._waiters) == 2, timeout=10, what="two waiters")
    slots.release()  # hands the slot to "first"...
    first.cancel()  # ...which is cancelled before it runs: the slot goes on to "second"
    await asyncio.wait_for(second, 10)
    assert first.cancelled()
