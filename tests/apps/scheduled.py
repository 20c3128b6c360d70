"""A scheduled app for the scheduler's process tests.

``$AIOQUEUE_TEST_APP`` names the app (so each test has its own lease and state queues),
``$AIOQUEUE_TEST_QUEUE`` is its queue, and runs append their slot to ``$AIOQUEUE_TEST_DIR/ticks``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import anyio

from aioqueue import App, task_context

app = App(
    os.environ.get("AIOQUEUE_TEST_APP", "tests-scheduled"),
    default_queue=os.environ.get("AIOQUEUE_TEST_QUEUE", "default"),
)
DIR = Path(os.environ.get("AIOQUEUE_TEST_DIR", "."))


@app.periodic(every=timedelta(seconds=1), name="tests.tick")
async def tick() -> None:
    """Record which slot this run was for, and which process ran it."""
    slot = task_context().scheduled_at
    assert slot is not None
    async with await anyio.open_file(DIR / "ticks", "a") as f:
        await f.write(f"{slot.isoformat()} {os.getpid()}\n")
