"""Where a sequential round trip's time goes: ``python -m bench.breakdown``.

``python -m bench.breakdown [--round-trips N] [--broker-url URL] [--json PATH]`` runs N
sequential ``submit`` → ``result`` round trips of ``bench.noop`` (after 200 unmeasured ones)
through an aioqueue worker process, on a private RabbitMQ node unless a URL is given, and
prints the median of each stage in microseconds.

Each side timestamps its own socket traffic with ``time.perf_counter`` (CLOCK_MONOTONIC, one
clock for every process of the machine, so stamps of the two processes compare): the bytes a
read brings (`WholeBufferReader.feed_data`) and the bytes a write sends
(`CoalescingWriter.flush`), each told apart by the AMQP method of its first frame (a
``Basic.Deliver``, a ``Basic.Ack``, a ``Basic.Publish``). The hooks are installed in this
tool's processes only (the worker runs as ``python -m bench.breakdown --worker ...``); they
cost a few microseconds per read and write, so the stages are a little longer than without
them. With one round trip in flight at a time the i-th delivery of the worker is the i-th
round trip; a stage missing in a round trip (an event batch written in between, say) leaves
that round trip out of that stage's median.
"""

from __future__ import annotations

import argparse
import bisect
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

WARM_UP = 200
# the class and method of a frame's AMQP method, after its 7-byte frame header
_DELIVER, _ACK, _PUBLISH = b"\x00\x3c\x00\x3c", b"\x00\x3c\x00\x50", b"\x00\x3c\x00\x28"
STAMPS_ENV = "AIOQUEUE_BENCH_STAMPS"  # where the worker writes its stamps as it exits


def methods_of(data: bytes) -> set[bytes]:
    """The class and method ids of every method frame that starts within ``data``."""
    found, offset, size = set(), 0, len(data)
    while offset + 11 <= size:
        kind, length = data[offset], int.from_bytes(data[offset + 3 : offset + 7], "big")
        if kind == 1:
            found.add(bytes(data[offset + 7 : offset + 11]))
        offset += length + 8
    return found


def install(on_read: Callable[[set[bytes]], None], on_write: Callable[[set[bytes]], None]) -> None:
    """Call ``on_read`` with the methods of every read and ``on_write`` with those of every
    write, of every aioqueue connection of this process."""
    from aioqueue.rabbit.connection import CoalescingWriter
    from aioqueue.rabbit.reader import WholeBufferReader

    feed, flush = WholeBufferReader.feed_data, CoalescingWriter.flush

    def feed_data(self: WholeBufferReader, data: bytes) -> None:
        on_read(methods_of(data))
        feed(self, data)

    def flushing(self: CoalescingWriter) -> None:
        pending = self._pending
        if pending:
            on_write(methods_of(b"".join(pending)))
        flush(self)

    WholeBufferReader.feed_data = feed_data  # type: ignore[method-assign]
    CoalescingWriter.flush = flushing  # type: ignore[method-assign]


class WorkerStamps:
    """Per delivery: when its bytes came, when the next reply and the next ack were written."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def read(self, methods: set[bytes]) -> None:
        if _DELIVER in methods:
            self.rows.append({"delivered": time.perf_counter()})
        elif _ACK in methods and self.rows:
            row = self.rows[-1]
            if "replied" in row and "reply_confirmed" not in row:
                row["reply_confirmed"] = time.perf_counter()

    def write(self, methods: set[bytes]) -> None:
        if not self.rows:
            return
        row, now = self.rows[-1], time.perf_counter()
        for method, key in ((_PUBLISH, "replied"), (_ACK, "acked")):
            if method in methods and key not in row:
                row[key] = now


def worker_main(argv: list[str]) -> int:
    """``python -m aioqueue.worker ARGS``, stamped; the stamps go to ``$AIOQUEUE_BENCH_STAMPS``
    when it exits."""
    import atexit

    from aioqueue.worker.cli import main

    stamps = WorkerStamps()
    install(stamps.read, stamps.write)
    path = os.environ[STAMPS_ENV]
    atexit.register(lambda: Path(path).write_bytes(orjson.dumps(stamps.rows)))
    return int(main(argv) or 0)


async def produce(url: str, queue: str, n: int) -> list[dict[str, float]]:
    """N stamped round trips, after `WARM_UP` ones; a row of stamps for each."""
    os.environ["AIOQUEUE_BENCH_QUEUE"] = queue
    from aioqueue import App

    row: dict[str, float] = {}

    def read(methods: set[bytes]) -> None:
        now = time.perf_counter()
        for method, key in ((_ACK, "confirmed"), (_DELIVER, "reply_in")):
            if method in methods and key not in row:
                row[key] = now

    def write(methods: set[bytes]) -> None:
        if _PUBLISH in methods and "written" not in row:
            row["written"] = time.perf_counter()
        if _ACK in methods and "reply_in" in row and "reply_acked" not in row:
            row["reply_acked"] = time.perf_counter()

    install(read, write)
    rows = []
    async with App("bench-breakdown", broker_url=url, default_queue=queue) as app:
        for i in range(WARM_UP + n):
            row = {"submit": time.perf_counter()}
            handle = await app.submit("bench.noop", i)
            row["submitted"] = time.perf_counter()
            if await handle.result(timeout=60) != i:
                raise RuntimeError(f"round trip {i} came back with another value")
            row["result"] = time.perf_counter()
            rows.append(row)
    return rows[WARM_UP:]


STAGES = [
    ("producer: submit() called → its task message written", "submit", "written"),
    ("RabbitMQ: task written → delivered to the worker", "written", "delivered"),
    ("worker: delivery's bytes read → its reply written", "delivered", "replied"),
    ("RabbitMQ: reply written → at the producer", "replied", "reply_in"),
    ("producer: reply's bytes read → result() returned", "reply_in", "result"),
    ("producer: reply's bytes read → its ack written", "reply_in", "reply_acked"),
    ("worker: reply written → its confirm read", "replied", "reply_confirmed"),
    ("worker: reply's confirm read → the task's ack written", "reply_confirmed", "acked"),
    (
        "RabbitMQ: the worker's ack written → the task's confirm at the producer",
        "acked",
        "confirmed",
    ),
    ("RabbitMQ: task written → its confirm at the producer", "written", "confirmed"),
    ("producer: confirm read → submit() returned", "confirmed", "submitted"),
    ("round trip: submit() called → result() returned", "submit", "result"),
]


def stages(producer: list[dict[str, float]], worker: list[dict[str, float]]) -> dict[str, Any]:
    """The median of each stage (µs) and how many round trips had it. A round trip's
    delivery is the worker's one delivered between its task's write and its result."""
    delivered = [row["delivered"] for row in worker]
    merged = []
    for row in producer:
        i = bisect.bisect_left(delivered, row.get("written", row["submit"]))
        mine = worker[i] if i < len(worker) and delivered[i] <= row["result"] else {}
        merged.append({**row, **mine})
    out: dict[str, Any] = {}
    for label, start, end in STAGES:
        values = []
        for stamps in merged:
            if start in stamps and end in stamps and stamps[end] >= stamps[start]:
                values.append((stamps[end] - stamps[start]) * 1e6)
        out[label] = {
            "median_us": round(statistics.median(values), 1) if values else None,
            "round_trips": len(values),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Sequential round trips: {result['round_trips']} (medians, µs; "
        f"worker deliveries stamped: {result['worker_deliveries']})",
        "",
        "| stage | median µs | round trips |",
        "|---|---:|---:|",
    ]
    for label, value in result["stages"].items():
        median = "—" if value["median_us"] is None else f"{value['median_us']:,.0f}"
        lines.append(f"| {label} | {median} | {value['round_trips']:,} |")
    return "\n".join(lines)


def measure(url: str, n: int, log: Path) -> dict[str, Any]:
    """Start a stamped worker on a fresh queue of ``url``, run the round trips, stop it."""
    import subprocess

    from .loop import run
    from .procs import ROOT, BenchError, bench_env

    queue = f"bench.breakdown.{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="aioqueue-breakdown-") as tmp:
        stamps = Path(tmp) / "worker.json"
        env = {**bench_env(url, queue, "classic", "aioqueue"), STAMPS_ENV: str(stamps)}
        command = [sys.executable, "-m", "bench.breakdown", "--worker", "bench.tasks:app"]
        command += ["--concurrency", "100", "--log-level", "WARNING", "--broker-url", url]
        with log.open("wb") as out:
            worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while "ready" not in log.read_text(errors="replace"):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the stamped worker did not start:\n{log.read_text()}")
                time.sleep(0.02)
            producer = run(produce(url, queue, n))
        finally:
            worker.terminate()
            worker.wait(60)
        rows = orjson.loads(stamps.read_bytes()) if stamps.exists() else []
    return {
        "round_trips": n,
        "worker_deliveries": len(rows),
        "stages": stages(producer, rows),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--broker-url", default=None, help="default: a private node")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    from .cli import RESULTS, broker

    RESULTS.mkdir(parents=True, exist_ok=True)
    with broker(args.broker_url) as (url, _):
        result = measure(url, args.round_trips, RESULTS / "breakdown-worker.log")
    print(markdown(result))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
