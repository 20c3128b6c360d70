"""The ack batcher, against a fake channel that records frames like RabbitMQ would check them."""

from __future__ import annotations

from typing import Any

from aioqueue.acks import Acker


class FakeChannel:
    def __init__(self) -> None:
        self.outstanding: set[int] = set(range(1, 101))
        self.frames: list[tuple[str, int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self._settle("ack", tag, multiple)

    async def basic_reject(self, tag: int, *, requeue: bool = True, wait: bool = True) -> None:
        self._settle("reject", tag, False)

    def _settle(self, kind: str, tag: int, multiple: bool) -> None:
        if tag not in self.outstanding:
            raise AssertionError(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        self.frames.append((kind, tag, multiple))
        gone = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        self.outstanding -= gone


async def flushed(acker: Acker) -> None:
    await acker.flush()


async def test_a_burst_of_in_order_acks_is_one_frame() -> None:
    channel = FakeChannel()
    acker = Acker(channel)  # type: ignore[arg-type]
    for tag in range(1, 51):
        acker.ack(tag)
    await flushed(acker)
    assert channel.frames == [("ack", 50, True)]
    assert channel.outstanding == set(range(51, 101))


async def test_tags_above_a_gap_are_acked_alone_and_never_twice() -> None:
    channel = FakeChannel()
    acker: Any = Acker(channel)  # type: ignore[arg-type]
    for tag in (1, 2, 4, 5):
        acker.ack(tag)
    await flushed(acker)
    assert channel.frames == [("ack", 2, True), ("ack", 4, False), ("ack", 5, False)]
    await acker.reject(3, requeue=True)
    acker.ack(6)
    await flushed(acker)
    assert channel.frames[-1] == ("ack", 6, True)
    assert channel.outstanding == set(range(7, 101))


async def test_a_second_settle_of_a_tag_is_ignored() -> None:
    channel = FakeChannel()
    acker = Acker(channel)  # type: ignore[arg-type]
    acker.ack(1)
    await flushed(acker)
    acker.ack(1)
    await acker.reject(1, requeue=True)
    await acker.ack_now(1)
    await flushed(acker)
    assert channel.frames == [("ack", 1, True)]
