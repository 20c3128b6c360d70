"""The aioqueue tasks the benchmark's worker runs: ``python -m aioqueue.worker bench.tasks:app``.

The queue comes from ``$AIOQUEUE_BENCH_QUEUE`` (each measurement uses a fresh queue) and the
broker URL from ``$AIOQUEUE_BROKER_URL`` or the worker's ``--broker-url``.
"""

from __future__ import annotations

import os

from aioqueue import App

from .procs import QUEUE_ENV

app = App("bench", default_queue=os.environ.get(QUEUE_ENV, "bench"))

_executed = 0  # fire tasks run by this worker process


@app.task(name="bench.noop")
async def noop(i: int) -> int:
    """The round-trip task: returns its argument, so the caller can check its reply."""
    return i


@app.task(name="bench.fire", ignore_result=True)
async def fire() -> None:
    """The fire-and-forget task: counts its executions in this worker process."""
    global _executed
    _executed += 1


@app.task(name="bench.executed")
async def executed() -> int:
    """How many ``bench.fire`` tasks this worker process has run so far."""
    return _executed
