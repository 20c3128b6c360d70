"""Tasks of the failure suite's worker subprocesses (tests/failure/).

Every run of a task appends a line to ``$AIOQUEUE_TEST_DIR/exec-<pid>.log`` before it returns,
with one ``write`` on an ``O_APPEND`` file: the line survives a ``kill -9`` of the process the
moment the call returns, so the suite can count every execution, including the ones whose
worker died before it could acknowledge them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aioqueue import App, task_context

app = App("failure", default_queue=os.environ.get("AIOQUEUE_TEST_QUEUE", "failure"))
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
    _record(f"{i} {int(task_context().redelivered)}\n")
    await asyncio.sleep(0.002)  # sleep-ok: a task that takes a moment
    return i


@app.task(name="failure.poison")
async def poison(i: int) -> None:
    """Record the run (``P<i>``), then kill the worker process, as a segfault would."""
    _record(f"P{i}\n")
    os._exit(3)
