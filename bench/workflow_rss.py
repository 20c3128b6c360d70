"""``python -m bench.workflow_rss [--members 1000,10000]``: a group's time and memory.

Starts a private RabbitMQ node, one worker process (``tests.apps.basic``, concurrency 100),
and for each size submits ``group(add.s(i, i) for i in range(N))`` from this process and waits
for the list. Prints, per size: seconds, the worker's peak RSS (``VmHWM``) and this caller's
peak RSS (``ru_maxrss``) — the figures in docs/workflows.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from aioqueue import App, group
from tests.waiting import poll_until

from .cli import broker

ROOT = Path(__file__).resolve().parent.parent


def vm(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(field)


async def run(url: str, sizes: list[int], queue: str, worker: int) -> None:
    print(f"worker ready: RSS {vm(worker, 'VmRSS')} MiB", flush=True)
    app = App("bench-workflows", broker_url=url, default_queue=queue)

    @app.task(name="tests.add")
    async def add(x: int, y: int) -> int: ...

    async with app:
        for size in sizes:
            started = time.perf_counter()
            handle = await group(add.s(i, i) for i in range(size)).submit()
            submitted = time.perf_counter() - started
            values = await handle.result(timeout=1200)
            took = time.perf_counter() - started
            assert values == [2 * i for i in range(size)]
            caller = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(
                f"group of {size}: submitted in {submitted:.1f}s, result in {took:.1f}s; "
                f"worker peak RSS {vm(worker, 'VmHWM')} MiB, caller peak RSS {caller} MiB",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", default="1000,10000")
    parser.add_argument("--broker-url")
    args = parser.parse_args()
    sizes = [int(s) for s in args.members.split(",")]
    queue = f"bench.workflows.{os.getpid()}"
    log = Path(f"/tmp/workflow-rss-{os.getpid()}.log")
    with broker(args.broker_url) as (url, _pid), log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "aioqueue.worker", "tests.apps.basic:app", "--broker-url", url],
            cwd=ROOT,
            env={**os.environ, "AIOQUEUE_TEST_QUEUE": queue},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            if not poll_until(lambda: "ready" in log.read_text(errors="replace"), timeout=60):
                raise SystemExit(f"the worker did not start: see {log}")
            asyncio.run(run(url, sizes, queue, worker.pid))
        finally:
            worker.terminate()
            worker.wait(60)


if __name__ == "__main__":
    main()
