"""Tasks for the tests' worker subprocesses; the queue comes from ``$AIOQUEUE_TEST_QUEUE``.

Coordination with the test goes through files in ``$AIOQUEUE_TEST_DIR`` (a task marks that it
started; the test releases it), so no test needs to sleep for a fixed time.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aioqueue import App, task_context

app = App("tests", default_queue=os.environ.get("AIOQUEUE_TEST_QUEUE", "default"))
DIR = Path(os.environ.get("AIOQUEUE_TEST_DIR", "."))


@app.task(name="tests.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.gated")
async def gated(key: str) -> dict[str, object]:
    """Record a start, then wait until the test creates ``release-<key>``."""
    ctx = task_context()
    with (DIR / f"started-{key}").open("a") as f:
        f.write(f"{os.getpid()} {ctx.redelivered}\n")
    while not (DIR / f"release-{key}").exists():
        await asyncio.sleep(0.02)
    return {"key": key, "pid": os.getpid(), "redelivered": ctx.redelivered}
