"""Rate-limited tasks for the worker subprocesses of tests/test_rate_limits_rabbit.py.

Task names carry the test's queue (``$AIOQUEUE_TEST_QUEUE``), so each test has holding queues
of its own; the rate comes from ``$AIOQUEUE_TEST_RATE``. Each run appends ``<wall time> <key>
<pid>`` to ``starts`` in ``$AIOQUEUE_TEST_DIR``: the test counts starts per window from it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio

from aioqueue import App

QUEUE = os.environ.get("AIOQUEUE_TEST_QUEUE", "default")
DIR = Path(os.environ.get("AIOQUEUE_TEST_DIR", "."))
app = App(f"tests-{QUEUE}", default_queue=QUEUE)


@app.task(name=f"{QUEUE}.limited", rate_limit=os.environ.get("AIOQUEUE_TEST_RATE", "5/s"))
async def limited(key: str) -> str:
    async with await anyio.open_file(DIR / "starts", "a") as f:
        await f.write(f"{time.time()} {key} {os.getpid()}\n")
    return key


@app.task(name=f"{QUEUE}.free")
async def free(x: int) -> int:
    return x
