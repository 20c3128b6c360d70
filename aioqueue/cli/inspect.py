"""``aioqueue inspect module:app [--broker-url URL] [--json]``: the workers and what they run.

Read from the worker heartbeats on the event stream (``aioqueue.events``), from ``--window``
seconds ago (default 60, at least 3 heartbeat intervals) up to now: a worker is online when its
last heartbeat came within 3 of its intervals and no ``worker-offline`` followed; offline when
it said so (a clean stop) or its heartbeats stopped (a crash, a lost connection). Each online
worker is listed with its running tasks (id, name, start time, attempt) as of its last
heartbeat. Workers started with ``--no-events`` (or ``Settings(events=False)``) are invisible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..app import App
from ..errors import AioqueueError
from ..events import EventReader
from ..message.events import WORKER_EVENTS, Event
from .common import app_from_args, run, setup_logging

__all__ = ["WorkerState", "main", "worker_states"]

MISSED_BEATS = 3  # heartbeats missed before a worker counts as offline
READ_IDLE = 1.0  # seconds without an event after which the history up to now has been read


@dataclass(slots=True)
class WorkerState:
    """One worker as its events tell."""

    worker: str
    online: bool
    last_seen: float
    app: str | None = None
    queues: list[str] = field(default_factory=list)
    concurrency: int | None = None
    processed: int | None = None
    interval: float | None = None
    running: list[dict[str, Any]] = field(default_factory=list)
    why: str = ""  # why offline: "worker-offline" or "no heartbeat since ..."


def worker_states(events: Iterable[Event], now: float, interval: float) -> list[WorkerState]:
    """Each worker of ``events`` (worker events only count), online ones first.

    ``interval`` is the heartbeat interval assumed for a worker whose events do not say theirs.
    """
    states: dict[str, WorkerState] = {}
    for event in events:
        if event.type not in WORKER_EVENTS:
            continue
        state = states.get(event.worker)
        if state is None or event.time >= state.last_seen:
            states[event.worker] = _state_of(event, interval)
    for state in states.values():
        if state.online and now - state.last_seen > MISSED_BEATS * (state.interval or interval):
            state.online = False
            state.why = f"no heartbeat for {now - state.last_seen:.1f}s"
            state.running = []
    return sorted(states.values(), key=lambda s: (not s.online, s.worker))


def _state_of(event: Event, interval: float) -> WorkerState:
    fields = event.fields
    running = fields.get("running")
    every = fields.get("interval")
    offline = event.type == "worker-offline"
    return WorkerState(
        worker=event.worker,
        online=not offline,
        last_seen=event.time,
        app=_str(fields.get("app")),
        queues=[q for q in fields.get("queues") or [] if isinstance(q, str)],
        concurrency=_int(fields.get("concurrency")),
        processed=_int(fields.get("processed")),
        interval=float(every) if isinstance(every, int | float) and every > 0 else interval,
        running=[] if offline or not isinstance(running, list) else _tasks(running),
        why="worker-offline" if offline else "",
    )


def _tasks(running: list[Any]) -> list[dict[str, Any]]:
    return [
        {k: task.get(k) for k in ("id", "name", "started", "attempt")}
        for task in running
        if isinstance(task, dict)
    ]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _when(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_states(states: list[WorkerState], now: float) -> str:
    """The human-readable listing."""
    if not states:
        return "no worker has sent a heartbeat recently (are task events on?)"
    lines = []
    for s in states:
        if s.online:
            lines.append(
                f"{s.worker}  online  app={s.app} queues={','.join(s.queues)} "
                f"concurrency={s.concurrency} processed={s.processed} "
                f"last heartbeat {now - s.last_seen:.1f}s ago  running {len(s.running)}"
            )
            for task in s.running:
                lines.append(
                    f"    {task['id']}  {task['name']}  attempt {task['attempt']}  "
                    f"started {_when(task['started'])}"
                )
        else:
            lines.append(f"{s.worker}  offline ({s.why})")
    return "\n".join(lines)


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Workers online and the tasks they run, from their heartbeats."
    )
    p.add_argument("app", help="MODULE:APP")
    p.add_argument("--broker-url", help="overrides the app's broker URL")
    p.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    p.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="seconds of history to read (default 60, at least 3 heartbeat intervals): "
        "workers silent for longer are not listed at all",
    )
    return p


def main(argv: list[str] | None = None, *, prog: str = "aioqueue inspect") -> int:
    """Run ``aioqueue inspect``; returns the exit code."""
    args = parser(prog).parse_args(argv)
    setup_logging("WARNING")
    app = app_from_args(args)
    if app is None:
        return 2
    interval = app.settings.heartbeat_interval
    try:
        now = time.time()
        window = max(args.window, MISSED_BEATS * interval)
        events = run(_read(app, since=now - window, until=now))
    except AioqueueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    states = worker_states(events, now, interval)
    if args.json:
        print(json.dumps({"time": now, "workers": [asdict(s) for s in states]}, indent=2))
    else:
        print(format_states(states, now))
    return 0


async def _read(app: App, since: float, until: float) -> list[Event]:
    """The events from ``since`` up to ``until`` (the first one after it, which comes within
    a heartbeat interval while a worker lives), or until the stream is quiet."""
    async with app, EventReader(app, since=since) as reader:
        return await reader.drain(READ_IDLE, until=until)
