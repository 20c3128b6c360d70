"""The aioqueue tasks the benchmark's worker runs: ``python -m aioqueue.worker bench.tasks:app``.

The queue comes from ``$AIOQUEUE_BENCH_QUEUE`` (each measurement uses a fresh queue), its type
from ``$AIOQUEUE_BENCH_QUEUE_TYPE`` (``classic``, the default, or ``quorum`` for the cluster run)
and the broker URL from ``$AIOQUEUE_BROKER_URL`` or the worker's ``--broker-url``.
"""

from __future__ import annotations

import os
import time

from aioqueue import App

from .procs import OTEL_ENV, QUEUE_ENV, QUEUE_TYPE_ENV

if os.environ.get(OTEL_ENV) == "1":  # before the app connects: tracing is checked there
    from .otel import configure_tracing

    configure_tracing()
_queue_type = os.environ.get(QUEUE_TYPE_ENV) or "classic"
if _queue_type not in ("classic", "quorum"):
    raise SystemExit(f"${QUEUE_TYPE_ENV} must be 'classic' or 'quorum', not {_queue_type!r}")
app = App(
    "bench",
    default_queue=os.environ.get(QUEUE_ENV, "bench"),
    queue_type="quorum" if _queue_type == "quorum" else "classic",
)

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


@app.task(name="bench.limited", rate_limit=os.environ.get("AIOQUEUE_BENCH_RATE", "50/s"))
async def limited() -> float:
    """The rate-limited task: returns when it started (wall time, for windows of starts)."""
    return time.time()


@app.task(name="bench.executed")
async def executed() -> list[int]:
    """``[pid, count]``: this worker process and how many ``bench.fire`` tasks it has run so
    far (with several workers on one queue the producer adds up the latest count of each)."""
    return [os.getpid(), _executed]


@app.task(name="bench.burn")
def burn(spins: int) -> int:
    """A CPU-bound plain function: a fixed amount of pure Python (``spins`` rounds of
    `spin`; ``python -m bench.processes`` calibrates them to ~5 ms of CPU), holding the GIL,
    so only worker processes, not threads, run two at once. Fixed work, not a wall-clock
    deadline: threads sharing one GIL must not each count the same milliseconds."""
    return spin(spins)


def spin(spins: int) -> int:
    total = 0
    for _ in range(spins):
        total += sum(range(100))
    return total
