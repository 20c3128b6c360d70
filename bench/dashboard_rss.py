"""RSS of the dashboard's state after a million events: ``python -m bench.dashboard_rss``.

Feeds ``--events`` task events (received, started, then succeeded or failed with a traceback;
every task a new id, so the ring of recent tasks overflows constantly) spread over
``--minutes`` minutes, plus worker heartbeats, through `DashboardState.apply`, and prints the
peak RSS of this process before and after, and the state's sizes. The bound holds whatever
the volume: the ring keeps ``max_tasks`` tasks, the charts ``window_minutes`` minutes.
"""

from __future__ import annotations

import argparse
import resource
import time

from aioqueue.dashboard.state import DashboardState
from aioqueue.message.events import Event

TRACEBACK = "Traceback (most recent call last):\n" + '  File "x.py", line 1, in f\n' * 60


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard_rss")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--minutes", type=int, default=3_000, help="spread over (beyond the window)")
    p.add_argument("--max-tasks", type=int, default=10_000)
    args = p.parse_args(argv)
    state = DashboardState(max_tasks=args.max_tasks)
    before = rss_mib()
    start = time.time() - args.minutes * 60
    step = args.minutes * 60 / args.events
    began = time.perf_counter()
    for i in range(args.events):
        now = start + i * step
        task, phase = i // 3, i % 3
        fields: dict[str, object] = {"id": f"task-{task:09d}", "name": "bench.work", "queue": "q"}
        if phase == 0:
            kind = "task-received"
            fields["args"] = repr(("x" * 200, task))
        elif phase == 1:
            kind = "task-started"
        elif task % 10:
            kind, fields["duration"], fields["result"] = "task-succeeded", 0.01 * (i % 97), "ok"
        else:
            kind, fields["duration"] = "task-failed", 0.5
            fields["error"], fields["traceback"] = "ValueError: bad", TRACEBACK
        state.apply(Event(kind, now, f"host:{task % 50}", fields))
        if i % 1000 == 0:
            heartbeat = {"queues": ["q"], "concurrency": 10, "running": [], "interval": 5.0}
            state.apply(Event("worker-heartbeat", now, f"host:{(i // 1000) % 50}", heartbeat))
    elapsed = time.perf_counter() - began
    after = rss_mib()
    print(f"events applied:   {state.events_seen:,} in {elapsed:.1f} s")
    print(f"tasks kept:       {len(state.tasks):,} (max {state.max_tasks:,})")
    print(f"minutes kept:     {len(state.minutes):,} (window {state.window_minutes:,})")
    print(f"workers kept:     {len(state.workers):,}")
    print(f"peak RSS:         {before:.1f} MiB before, {after:.1f} MiB after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
