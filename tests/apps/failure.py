"""Tasks of the failure suite's worker subprocesses (tests/failure/).

Every run of a task appends a line to ``$AIOQUEUE_TEST_DIR/exec-<pid>.log`` before it returns,
with one ``write`` on an ``O_APPEND`` file: the line survives a ``kill -9`` of the process the
moment the call returns, so the suite can count every execution, including the ones whose
worker died before it could acknowledge them.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path

from aioqueue import App, Retry, RetryPolicy, task_context

app = App(
    "failure",
    default_queue=os.environ.get("AIOQUEUE_TEST_QUEUE", "failure"),
    # the cluster suite runs everything on quorum queues
    queue_type="quorum" if os.environ.get("AIOQUEUE_TEST_QUEUE_TYPE") == "quorum" else "classic",
)
DIR = Path(os.environ.get("AIOQUEUE_TEST_DIR", "."))
_log: dict[int, int] = {}  # pid -> fd (a forked child must not share its parent's file)


def _record(line: str) -> None:
    pid = os.getpid()
    fd = _log.get(pid)
    if fd is None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        fd = _log[pid] = os.open(DIR / f"exec-{pid}.log", flags, 0o644)
    os.write(fd, line.encode())


@app.task(name="failure.record")
async def record(i: int) -> int:
    """Record the run (``<i> <redelivered>``), take a moment, return ``i``."""
    return await _run(i)


async def _run(i: int) -> int:
    _record(f"{i} {int(task_context().redelivered)}\n")
    await asyncio.sleep(0.002)  # sleep-ok: a task that takes a moment
    return i


@app.task(name="failure.retried", retry=RetryPolicy(max_attempts=3, backoff=0.1, jitter=0.0))
async def retried(i: int) -> int:
    """Ask for a second attempt (through the delay queues), then run as ``failure.record``."""
    if task_context().attempt == 1:
        raise Retry(delay=0.2)
    return await _run(i)


# Fired by the scheduler processes of the cluster suite only (the others start none).
@app.periodic(every=timedelta(seconds=1), name="failure.tick")
async def tick() -> None:
    """Record the slot (``<iso slot> <redelivered>``) in ``ticks-<pid>.log``."""
    ctx = task_context()
    assert ctx.scheduled_at is not None
    line = f"{ctx.scheduled_at.isoformat()} {int(ctx.redelivered)}\n"
    fd = os.open(DIR / f"ticks-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task(name="failure.poison")
async def poison(i: int) -> None:
    """Record the run (``P<i>``), then kill the worker process, as a segfault would."""
    _record(f"P{i}\n")
    os._exit(3)
