"""``python -m services.demo``: start a worker, run the demo's scenarios, print what happened.

Needs a RabbitMQ at ``$AIOQUEUE_BROKER_URL`` (default ``amqp://guest:guest@localhost/``);
``make demo`` starts one when none answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from aioqueue import TaskError

from .tasks import app, charge_card, deliver_post, render_report, send_welcome_email

FOLLOWERS = 500


async def scenarios() -> None:
    async with app:
        # 1. Fan-out: one new post, every follower's feed updated by its own task.
        started = time.perf_counter()
        handles = await asyncio.gather(
            *(deliver_post.submit(42, follower) for follower in range(FOLLOWERS))
        )
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        elapsed = time.perf_counter() - started
        print(
            f"[fan-out]   post 42 delivered to {len(results)} followers in {elapsed:.2f}s "
            f"({len(results) / elapsed:.0f} tasks/s); e.g. {results[-1]!r}"
        )

        # 2. Offload: the "request" returns as soon as RabbitMQ confirmed the task.
        started = time.perf_counter()
        report = await render_report.submit("acme", 300_000)
        print(
            f"[offload]   report queued in {(time.perf_counter() - started) * 1000:.1f} ms, "
            f"id {report.id}; the request can return now"
        )
        value = await report.result(timeout=120)
        print(f"[offload]   report ready after {time.perf_counter() - started:.2f}s: {value}")

        # 3. Fire-and-forget: no result is kept or awaited.
        note = await send_welcome_email.submit("ann@example.com")
        print(f"[notify]    welcome e-mail queued (task {note.id}); nobody waits for it")

        # 4. A failure reported to the caller, with the remote type and message.
        ok = await charge_card.submit("ann", 1999)
        print(f"[charge]    {await ok.result(timeout=60)}")
        bad = await charge_card.submit("bob", -5)
        try:
            await bad.result(timeout=60)
        except TaskError as exc:
            print(f"[charge]    failed as expected -> {exc.type_name}: {exc.message}")
            print(
                f"            (remote traceback: {len(exc.traceback.splitlines())} lines; "
                f"the message is kept in demo.dlq)"
            )


def start_worker() -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aioqueue.worker",
            "services.demo.tasks:app",
            "--concurrency",
            "50",
            "--log-level",
            "WARNING",
        ],
        stderr=subprocess.PIPE,
    )
    assert worker.stderr is not None
    banner: list[str] = []
    for raw in worker.stderr:
        line = raw.decode(errors="replace").rstrip()
        banner.append(line)
        print(f"  worker | {line}")
        if "  tasks:" in banner and len(banner) - banner.index("  tasks:") > len(app.tasks):
            break
    else:
        raise SystemExit(f"worker did not start:\n{os.linesep.join(banner)}")
    return worker


def main() -> int:
    print("starting a worker: python -m aioqueue.worker services.demo.tasks:app")
    worker = start_worker()
    try:
        asyncio.run(scenarios())
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.stderr is not None
        for raw in worker.stderr:
            print(f"  worker | {raw.decode(errors='replace').rstrip()}")
        code = worker.wait(60)
        print(f"worker stopped cleanly (exit code {code})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
