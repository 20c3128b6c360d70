"""`bench.breakdown`, the stage-by-stage timing of sequential round trips: its frame reading,
its matching of the worker's stamps to round trips, and a short run against RabbitMQ."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from bench.breakdown import STAGES, measure, methods_of, stages
from tests.rabbit import RabbitNode

METHODS = {
    "deliver": (commands.Basic.Deliver("c", 1, False, "", "q"), b"\x00\x3c\x00\x3c"),
    "ack": (commands.Basic.Ack(5, True), b"\x00\x3c\x00\x50"),
    "publish": (commands.Basic.Publish(0, "", "q"), b"\x00\x3c\x00\x28"),
    "qos": (commands.Basic.Qos(0, 10), b"\x00\x3c\x00\x0a"),
}


@given(st.lists(st.sampled_from(sorted(METHODS)), max_size=6), st.binary(max_size=40))
def test_every_method_frame_of_a_read_is_seen(kinds: list[str], body: bytes) -> None:
    data = b""
    for kind in kinds:
        data += frame.marshal(METHODS[kind][0], 1)
        if kind in ("deliver", "publish"):  # content frames are skipped over
            data += frame.marshal(ContentHeader(body_size=len(body)), 1)
            data += frame.marshal(ContentBody(body), 1)
    assert methods_of(data) == {METHODS[kind][1] for kind in kinds}


def test_a_worker_stamp_belongs_to_the_round_trip_it_fell_in() -> None:
    producer = [
        {"submit": 0.0, "written": 1.0, "reply_in": 3.0, "result": 4.0},
        {"submit": 10.0, "written": 11.0, "reply_in": 13.0, "result": 14.0},
        {"submit": 20.0, "written": 21.0, "reply_in": 23.0, "result": 24.0},
    ]
    # a warm-up delivery before, none for the second round trip, one for the others
    worker = [{"delivered": -5.0}, {"delivered": 2.0, "replied": 2.5}, {"delivered": 22.0}]
    out = stages(producer, worker)
    delivered = out["worker: delivery's bytes read → its reply written"]
    assert delivered == {"median_us": 500000.0, "round_trips": 1}
    assert out["RabbitMQ: task written → delivered to the worker"]["round_trips"] == 2
    assert out["round trip: submit() called → result() returned"]["round_trips"] == 3


def test_a_short_run_times_every_stage(rabbit: RabbitNode, tmp_path: Path) -> None:
    result = measure(rabbit.url, 60, tmp_path / "worker.log")
    assert result["round_trips"] == 60 and result["worker_deliveries"] >= 60
    labels = [label for label, _, _ in STAGES]
    assert list(result["stages"]) == labels
    for label in labels:
        assert result["stages"][label]["median_us"] > 0, label
    # the hops line up: a reply reaches the producer after the worker wrote it
    assert result["stages"]["RabbitMQ: reply written → at the producer"]["round_trips"] >= 50
