"""The dashboard's picture of the system, in bounded memory whatever the event volume.

- tasks: a ring of the most recent ``max_tasks`` tasks (default 10,000), each with at most
  ``MAX_TIMELINE`` events of its timeline; the oldest task leaves when a new one arrives;
- workers: the last ``max_workers`` worker identities seen (default 1,000);
- charts: one `Minute` of aggregates per minute for the last ``window_minutes`` (default
  1,440, a day), each holding counts and a sample of at most ``SAMPLES`` run times.

It is rebuilt after a restart by feeding it the stream from ``now - window`` (`rebuild_since`).
Every method is synchronous and pure bookkeeping: `apply` is the only way events come in.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Final

from ..message.events import Event

__all__ = ["MAX_TIMELINE", "SAMPLES", "DashboardState", "Minute", "TaskRecord", "WorkerRecord"]

MAX_TIMELINE: Final = 64
SAMPLES: Final = 256
OFFLINE_AFTER: Final = 3  # heartbeat intervals without one: offline

_STATES: Final = {
    "task-received": "queued",
    "task-started": "running",
    "task-progress": "running",
    "task-succeeded": "succeeded",
    "task-failed": "failed",
    "task-retried": "retrying",
    "task-dead-lettered": "dead-lettered",
    "task-cancelled": "cancelled",
}
_ENDS: Final = frozenset({"task-succeeded", "task-failed", "task-dead-lettered", "task-cancelled"})
_KEPT: Final = ("name", "queue", "args", "result", "error", "traceback", "reason", "progress")


def _seconds(value: Any) -> float | None:
    """A finite, non-negative number of seconds, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
    return None


def _short(value: Any, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


@dataclass(slots=True)
class TaskRecord:
    """What the dashboard knows of one task (its latest attempt, and its timeline)."""

    id: str
    state: str = "queued"
    name: str | None = None
    queue: str | None = None
    attempt: int = 1
    worker: str | None = None
    received: float | None = None
    started: float | None = None
    finished: float | None = None
    duration: float | None = None
    retries: int = 0
    args: str | None = None
    result: str | None = None
    error: str | None = None
    traceback: str | None = None
    reason: str | None = None
    progress: str | None = None
    updated: float = 0.0
    timeline: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_TIMELINE))

    def summary(self) -> dict[str, Any]:
        """The row of the task list."""
        return {
            "id": self.id,
            "state": self.state,
            "name": self.name,
            "queue": self.queue,
            "attempt": self.attempt,
            "worker": self.worker,
            "received": self.received,
            "started": self.started,
            "finished": self.finished,
            "duration": self.duration,
            "retries": self.retries,
            "error": self.error,
            "updated": self.updated,
        }

    def detail(self) -> dict[str, Any]:
        """The task page."""
        return {
            **self.summary(),
            "args": self.args,
            "result": self.result,
            "traceback": self.traceback,
            "reason": self.reason,
            "progress": self.progress,
            "timeline": list(self.timeline),
        }


@dataclass(slots=True)
class WorkerRecord:
    """A worker, from its online, heartbeat and offline events."""

    identity: str
    app: str | None = None
    queues: list[str] = field(default_factory=list)
    concurrency: int | None = None
    running: list[dict[str, Any]] = field(default_factory=list)
    processed: int | None = None
    interval: float = 5.0
    last_seen: float = 0.0
    offline: bool = False

    def view(self, now: float) -> dict[str, Any]:
        stale = now - self.last_seen > OFFLINE_AFTER * self.interval
        return {
            "identity": self.identity,
            "app": self.app,
            "queues": self.queues,
            "concurrency": self.concurrency,
            "running": [] if self.offline else self.running,
            "processed": self.processed,
            "last_heartbeat": self.last_seen,
            "online": not (self.offline or stale),
        }


@dataclass(slots=True)
class Minute:
    """The aggregates of one minute: counts, and a uniform sample of run times."""

    start: int
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    received: int = 0
    durations: list[float] = field(default_factory=list)
    seen: int = 0  # durations offered to the sample

    def add_duration(self, value: float, rng: random.Random) -> None:
        self.seen += 1
        if len(self.durations) < SAMPLES:
            self.durations.append(value)
        else:  # reservoir sampling keeps a uniform sample in bounded space
            slot = rng.randrange(self.seen)
            if slot < SAMPLES:
                self.durations[slot] = value

    def view(self) -> dict[str, Any]:
        ordered = sorted(self.durations)

        def pct(p: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else None

        done = self.succeeded + self.failed
        return {
            "t": self.start,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "retried": self.retried,
            "received": self.received,
            "failure_rate": self.failed / done if done else None,
            "p50": pct(0.5),
            "p90": pct(0.9),
            "p99": pct(0.99),
        }


def _timeline_entry(event: Event, attempt: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": event.type, "time": event.time, "worker": event.worker}
    entry["attempt"] = attempt
    for key in ("error", "reason", "retry_in", "duration", "progress"):
        value = event.get(key)
        if isinstance(value, str):
            entry[key] = value[:300]
        elif _seconds(value) is not None:
            entry[key] = value
    return entry


class DashboardState:
    """Recent tasks, workers and per-minute aggregates, each bounded (see the module doc)."""

    def __init__(
        self, *, max_tasks: int = 10_000, window_minutes: int = 1_440, max_workers: int = 1_000
    ) -> None:
        self.max_tasks = max_tasks
        self.window_minutes = window_minutes
        self.max_workers = max_workers
        self.tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self.workers: OrderedDict[str, WorkerRecord] = OrderedDict()
        self.minutes: deque[Minute] = deque(maxlen=window_minutes)
        self.events_seen = 0
        self.last_time = 0.0
        self._rng = random.Random(17)

    @property
    def window_seconds(self) -> float:
        return self.window_minutes * 60.0

    def apply(self, event: Event) -> TaskRecord | WorkerRecord | None:
        """Take one event in; the record it changed (None for an event it does not know)."""
        self.events_seen += 1
        if not math.isfinite(event.time):
            return None
        self.last_time = max(self.last_time, event.time)
        if event.type in _STATES:
            return self._task_event(event)
        if event.type.startswith("worker-"):
            return self._worker_event(event)
        return None

    def _task_event(self, event: Event) -> TaskRecord | None:
        task_id = event.get("id")
        if not isinstance(task_id, str) or not task_id:
            return None
        task_id = task_id[:200]
        record = self.tasks.get(task_id)
        if record is None:
            record = self.tasks[task_id] = TaskRecord(task_id)
            if len(self.tasks) > self.max_tasks:
                self.tasks.popitem(last=False)
        else:
            self.tasks.move_to_end(task_id)
        self._update(record, event)
        self._count(event)
        return record

    def _update(self, record: TaskRecord, event: Event) -> None:
        kind = event.type
        attempt = event.get("attempt")
        if isinstance(attempt, int) and not isinstance(attempt, bool):
            record.attempt = attempt
        # a late event of an earlier step does not move a finished task back; a cancelled
        # task's dead letter (reason "cancelled", which follows its task-cancelled) keeps it
        # cancelled
        finished = record.state in ("succeeded", "dead-lettered", "cancelled")
        if not (finished and kind not in _ENDS) and not (
            record.state == "cancelled" and kind == "task-dead-lettered"
        ):
            record.state = _STATES[kind]
        record.worker = event.worker or record.worker
        record.updated = event.time
        for key in _KEPT:
            value = event.get(key)
            if value is not None:
                setattr(record, key, _short(value, 8000 if key == "traceback" else 1000))
        if kind == "task-received" and record.received is None:
            record.received = event.time
        elif kind == "task-started":
            record.started = event.time
        elif kind in _ENDS or kind == "task-retried":
            record.finished = event.time
            duration = _seconds(event.get("duration"))
            if duration is not None:
                record.duration = duration
            record.retries += kind == "task-retried"
        record.timeline.append(_timeline_entry(event, record.attempt))

    def _count(self, event: Event) -> None:
        minute = self._minute(event.time)
        if minute is None:
            return
        if event.type == "task-succeeded":
            minute.succeeded += 1
        elif event.type == "task-failed":
            minute.failed += 1
        elif event.type == "task-retried":
            minute.retried += 1
        elif event.type == "task-received":
            minute.received += 1
        duration = _seconds(event.get("duration"))
        if event.type in _ENDS and duration is not None:
            minute.add_duration(duration, self._rng)

    def _minute(self, when: float) -> Minute | None:
        start = int(when // 60) * 60
        if self.minutes and start < self.minutes[0].start:
            return None  # older than the window
        for minute in reversed(self.minutes):
            if minute.start == start:
                return minute
            if minute.start < start:
                break
        if self.minutes and start < self.minutes[-1].start:
            return None  # late, and that minute had no events: not worth reordering for
        minute = Minute(start)
        self.minutes.append(minute)
        return minute

    def _worker_event(self, event: Event) -> WorkerRecord:
        identity = event.worker[:300]
        record = self.workers.get(identity)
        if record is None:
            record = self.workers[identity] = WorkerRecord(identity)
            if len(self.workers) > self.max_workers:
                self.workers.popitem(last=False)
        record.last_seen = max(record.last_seen, event.time)
        record.offline = event.type == "worker-offline"
        fields = event.fields
        if isinstance(fields.get("app"), str):
            record.app = fields["app"]
        if isinstance(fields.get("queues"), list):
            record.queues = [str(q) for q in fields["queues"][:100]]
        if isinstance(fields.get("concurrency"), int):
            record.concurrency = fields["concurrency"]
        if isinstance(fields.get("running"), list):
            record.running = [r for r in fields["running"][:1000] if isinstance(r, dict)]
        if isinstance(fields.get("processed"), int):
            record.processed = fields["processed"]
        interval = _seconds(fields.get("interval"))
        if interval:
            record.interval = interval
        return record

    # -- queries --------------------------------------------------------------------------

    def find_tasks(
        self,
        *,
        name: str | None = None,
        state: str | None = None,
        queue: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """The newest tasks first that match every filter given (name: a substring)."""
        rows: list[dict[str, Any]] = []
        for record in reversed(self.tasks.values()):
            if name and (record.name is None or name not in record.name):
                continue
            if state and record.state != state:
                continue
            if queue and record.queue != queue:
                continue
            when = record.received or record.updated
            if (since is not None and when < since) or (until is not None and when > until):
                continue
            rows.append(record.summary())
            if len(rows) >= limit:
                break
        return rows

    def series(self) -> list[dict[str, Any]]:
        """The per-minute aggregates of the window, oldest first."""
        return [minute.view() for minute in self.minutes]

    def worker_views(self, now: float) -> list[dict[str, Any]]:
        return [record.view(now) for record in self.workers.values()]
