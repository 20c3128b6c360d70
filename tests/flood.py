"""A flood of foreign messages at one worker, and what became of each (``make fuzz``).

Thousands of messages — valid, broken in body, properties or headers (``tests/fuzz_messages``),
and unreadable at the frame level (``tests/inbound_frames``) — are published raw, below pamqp's
encoder, to a queue an in-process worker consumes. Then every message is accounted for: it ran
(valid), or it is in the dead-letter queue with the reason its breakage implies. The report::

    sent, ran, dead-lettered by reason, missing, extra runs, wrong reasons, reconnects

``python -m tests.flood --messages 10000`` starts a private RabbitMQ node of its own (or uses
``--broker-url``); ``tests/test_inbound.py`` runs a small sample of the same in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame
from hypothesis.errors import NonInteractiveExampleWarning
from pamqp import commands as spec

from aioqueue import App, Settings
from aioqueue.rabbit.inbound import readable_content_header
from aioqueue.topology import dlq_name
from tests.conftest import running_worker
from tests.fuzz_messages import KINDS, MAX_SIZE, TASK, build, raw_publish, specs
from tests.inbound_frames import (
    Props,
    broken_cases,
    entry,
    header_payload,
    publish_frames,
    s_value,
    task_body,
    task_headers,
)
from tests.waiting import wait_until


@dataclass
class Report:
    sent: int = 0
    expected: Counter[str] = field(default_factory=Counter)  # reason ("" = run) -> count
    ran: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    missing: int = 0
    extra_runs: int = 0
    wrong_reasons: int = 0
    reconnects: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra_runs or self.wrong_reasons or self.reconnects)

    def __str__(self) -> str:
        dead = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dead.items()))
        return (
            f"sent {self.sent} in {self.seconds:.1f}s: ran {self.ran}, dead-lettered "
            f"{sum(self.dead.values())} ({dead}); missing {self.missing}, extra runs "
            f"{self.extra_runs}, wrong reasons {self.wrong_reasons}, reconnects {self.reconnects}"
        )


def _messages(
    count: int, seed: int, queue: str, channel: aiormq.Channel
) -> list[tuple[str, str, bytes]]:
    """(fuzz id, expected reason, raw frames) for ``count`` messages, a fifth frame-level."""
    rng = random.Random(seed)
    out: list[tuple[str, str, bytes]] = []
    strategy = specs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        for i in range(count):
            fid = f"f{seed}-{i}"
            if rng.random() < 0.2:
                out.append(_frame_level(rng, fid, queue, channel.number))
                continue
            message = build(strategy.example(), fid)
            frames = raw_publish(channel, queue, message).payload
            out.append((fid, KINDS[message.kind], frames))
    return out


def _frame_level(rng: random.Random, fid: str, queue: str, channel: int) -> tuple[str, str, bytes]:
    tag = entry(b"fuzz-id", s_value(fid))
    cases = list(broken_cases(TASK, fid).values())
    if rng.random() < 0.5:
        props = rng.choice(cases)
        props = Props(**{**props.__dict__, "headers": _with(props.headers, tag)})
    else:  # random bytes where strings and timestamps go: readable by chance, or not
        props = Props(
            message_id=rng.randbytes(rng.randint(1, 12)),
            reply_to=rng.choice([None, rng.randbytes(rng.randint(0, 12))]),
            timestamp=rng.choice([None, rng.getrandbits(64)]),
            headers=task_headers(TASK, tag, entry(rng.randbytes(rng.randint(1, 4)), s_value("v"))),
        )
    body = task_body(fid)
    readable = readable_content_header(header_payload(props, len(body))) is None
    runs = readable and props.message_id is not None
    return fid, "" if runs else "decode", publish_frames(channel, queue, props, body)


def _with(headers: bytes | None, extra: bytes) -> bytes:
    assert headers is not None
    body = headers[4:] + extra
    return len(body).to_bytes(4, "big") + body


async def flood(url: str, count: int, *, seed: int = 1, timeout: float = 600) -> Report:
    """Publish ``count`` messages at a worker on ``url`` and account for every one."""
    queue = f"flood.{uuid.uuid4().hex[:8]}"
    app = App(
        "flood", broker_url=url, default_queue=queue, settings=Settings(max_message_size=MAX_SIZE)
    )
    runs: Counter[str] = Counter()

    @app.task(name=TASK)
    async def record(key: Any = None, payload: Any = None) -> None:
        runs[str(key)] += 1

    report = Report()
    async with await aio_pika.connect(url) as conn:
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        messages = _messages(count, seed, queue, raw)
        expected = {fid: reason for fid, reason, _ in messages}
        report.expected = Counter(expected.values())
        async with app, running_worker(app, concurrency=200):
            robust = app.broker._connection  # type: ignore[attr-defined]
            robust.reconnect_callbacks.add(lambda *_: _count(report))
            started = time.monotonic()
            for _, _, frames in messages:
                await raw.write_queue.put(ChannelFrame(payload=frames, should_close=False))
                report.sent += 1
            total = len(messages)

            async def settled() -> bool:
                ok = await raw.queue_declare(dlq_name(queue), passive=True)
                return sum(runs.values()) + (ok.message_count or 0) >= total

            try:
                await wait_until(
                    settled, timeout=timeout, what="every message run or dead-lettered"
                )
            except AssertionError:
                pass  # reported as missing below
            report.seconds = time.monotonic() - started
        dead = await _drain(raw, dlq_name(queue))
        await raw.queue_delete(dlq_name(queue))
        await raw.queue_delete(queue)
    _account(report, expected, runs, dead)
    return report


def _count(report: Report) -> None:
    report.reconnects += 1


async def _drain(raw: aiormq.Channel, dlq: str) -> dict[str, list[str]]:
    dead: dict[str, list[str]] = {}
    while True:
        message = await raw.basic_get(dlq, no_ack=True)
        if not isinstance(message.delivery, spec.Basic.GetOk):
            return dead
        headers = message.header.properties.headers or {}
        fid = str(headers.get("fuzz-id"))
        dead.setdefault(fid, []).append(str(headers.get("aioqueue-dead-reason")))


def _account(
    report: Report, expected: dict[str, str], runs: Counter[str], dead: dict[str, list[str]]
) -> None:
    report.ran = sum(runs.values())
    for fid, reason in expected.items():
        ran, reasons = runs.get(fid, 0), dead.get(fid, [])
        report.dead.update(reasons)
        if ran + len(reasons) == 0:
            report.missing += 1
        report.extra_runs += max(0, ran - 1) + (ran if reason else 0)
        if reasons and reasons != [reason]:
            report.wrong_reasons += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.flood", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--broker-url", help="default: a private RabbitMQ node of its own")
    args = parser.parse_args(argv)
    # a SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the private node below is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.ERROR)  # one line per dead letter would drown the report
    if args.broker_url:
        report = asyncio.run(flood(args.broker_url, args.messages, seed=args.seed))
    else:
        from tests.rabbit import RabbitNode

        with tempfile.TemporaryDirectory(prefix="aioqueue-flood-") as tmp:
            node = RabbitNode(Path(tmp), name=f"aioqueue-flood-{uuid.uuid4().hex[:6]}")
            node.start()
            try:
                report = asyncio.run(flood(node.url, args.messages, seed=args.seed))
            finally:
                node.stop()
    print(
        f"expected: ran {report.expected['']}, dead-lettered "
        f"{dict(sorted((k, v) for k, v in report.expected.items() if k))}"
    )
    print(report)
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
