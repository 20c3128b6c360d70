"""Tasks for the tests' worker subprocesses; the queue comes from ``$AIOQUEUE_TEST_QUEUE``.

Coordination with the test goes through files in ``$AIOQUEUE_TEST_DIR`` (a task marks that it
started; the test releases it), so no test needs to sleep for a fixed time.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import anyio

from aioqueue import App, task_context
from aioqueue.settings import Settings
from tests.waiting import wait_until

app = App(
    "tests",
    default_queue=os.environ.get("AIOQUEUE_TEST_QUEUE", "default"),
    queue_type="quorum" if os.environ.get("AIOQUEUE_TEST_QUEUE_TYPE") == "quorum" else "classic",
    settings=Settings(heartbeat_interval=float(os.environ.get("AIOQUEUE_TEST_HEARTBEAT", "5"))),
)
DIR = Path(os.environ.get("AIOQUEUE_TEST_DIR", "."))


@app.task(name="tests.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.gc_state")
async def gc_state() -> list[int]:
    """The worker process's collector: [gen0, gen1, gen2 thresholds, objects frozen]."""
    return [*gc.get_threshold(), gc.get_freeze_count()]


@app.task(name="tests.gated")
async def gated(key: str) -> dict[str, object]:
    """Record a start, then wait until the test creates ``release-<key>``."""
    ctx = task_context()
    async with await anyio.open_file(DIR / f"started-{key}", "a") as f:
        await f.write(f"{os.getpid()} {ctx.redelivered}\n")
    await _file_appears(DIR / f"release-{key}")
    return {"key": key, "pid": os.getpid(), "redelivered": ctx.redelivered}


async def _file_appears(path: Path) -> None:
    """Wait (at most 120 s) for a file the test process creates: another process, no event."""
    await wait_until(path.exists, timeout=120, what=f"{path.name} to appear")


@app.task(name="tests.crash")
async def crash() -> None:
    """Kill the worker process mid-task, as a segfault or the OOM killer would."""
    os._exit(3)


@app.task(name="tests.needs_fix")
async def needs_fix(key: str) -> str:
    """Fail until the test creates ``fixed-<key>``; then record the success."""
    if not await anyio.Path(DIR / f"fixed-{key}").exists():
        raise RuntimeError(f"{key} is broken")
    await anyio.Path(DIR / f"done-{key}").touch()
    return "fixed"
