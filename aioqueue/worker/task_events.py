"""`TaskEvents`: a `TaskObserver` that turns a worker's task events into stream events.

Each hook builds an event's fields and hands them to the `EventPublisher`, which only buffers
them: nothing here waits or raises on the task's path. Arguments, results and progress go out
as bounded reprs, and not at all for a task registered with ``sensitive=True``. Progress is
sampled: at most one ``task-progress`` per task per second. A failed run is dead-lettered
before the observers hear its verdict: its ``task-dead-lettered`` waits for the
``task-failed``, so a reader sees them in the order they mean.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

from ..message import Outcome
from ..message.events import (
    MAX_ERROR,
    MAX_TRACEBACK,
    bounded,
    bounded_repr,
    call_repr,
)
from .events import RunResult, Verdict

if TYPE_CHECKING:
    from ..app import App
    from ..events import EventPublisher

__all__ = ["TaskEvents"]

PROGRESS_EVERY: Final = 1.0
_MAX_REMEMBERED = 10_000  # received-but-not-started runs whose queue we remember

_END_EVENTS: Final[dict[RunResult, str]] = {
    "succeeded": "task-succeeded",
    "retried": "task-retried",
    "failed": "task-failed",
    "timeout": "task-failed",
}


class TaskEvents:
    """Publishes the task events of one worker, and knows what it is running (heartbeats)."""

    def __init__(self, app: App, publisher: EventPublisher, identity: str) -> None:
        self.app = app
        self.publisher = publisher
        # the broker's time: wall time on RabbitMQ, a test's VirtualClock on memory://
        self._now = app.broker.now if app._broker is not None else time.time
        self.identity = identity
        # (id, attempt) -> {"id", "name", "attempt", "started"}: what a heartbeat lists
        self.running: dict[tuple[str, int], dict[str, Any]] = {}
        self._queues: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._progress_at: dict[tuple[str, int], float] = {}
        self._dead: dict[str, dict[str, Any]] = {}  # task id -> its dead letter, until reported

    def emit(self, kind: str, **fields: Any) -> None:
        self._emit(kind, fields)

    def _emit(self, kind: str, fields: dict[str, Any]) -> None:
        """Send an event whose ``fields`` are a dict of its own (it is handed over)."""
        self.publisher.emit_fields(kind, self._now(), self.identity, fields)

    def _sensitive(self, task: str) -> bool:
        registered = self.app.tasks.get(task)
        return registered is not None and registered.options.sensitive

    # -- TaskObserver ---------------------------------------------------------------------

    def received(
        self, task: str, task_id: str, attempt: int, queue: str, args: Any, kwargs: Any
    ) -> None:
        fields: dict[str, Any] = {"id": task_id, "name": task, "attempt": attempt, "queue": queue}
        if not self._sensitive(task):
            fields["args"] = call_repr(args, kwargs if isinstance(kwargs, dict) else {})
        self._queues[(task_id, attempt)] = queue
        if len(self._queues) > _MAX_REMEMBERED:
            self._queues.popitem(last=False)
        self._emit("task-received", fields)

    def started(self, task: str, task_id: str, attempt: int) -> None:
        fields: dict[str, Any] = {"id": task_id, "name": task, "attempt": attempt}
        queue = self._queues.pop((task_id, attempt), None)
        if queue is not None:
            fields["queue"] = queue
        self._emit("task-started", fields)
        self.running[(task_id, attempt)] = {
            "id": task_id,
            "name": task,
            "attempt": attempt,
            "started": time.time(),
        }

    def progress(self, task: str, task_id: str, attempt: int, value: Any) -> None:
        now = time.monotonic()
        key = (task_id, attempt)
        if now - self._progress_at.get(key, -PROGRESS_EVERY) < PROGRESS_EVERY:
            return
        self._progress_at[key] = now
        fields: dict[str, Any] = {"id": task_id, "name": task, "attempt": attempt}
        if not self._sensitive(task):
            fields["progress"] = bounded_repr(value)
        self._emit("task-progress", fields)

    def outcome(
        self,
        task: str,
        task_id: str,
        attempt: int,
        verdict: Verdict,
        duration: float,
        outcome: Outcome,
    ) -> None:
        if verdict.result == "cancelled":
            return  # `cancelled` told it (before its dead letter)
        fields: dict[str, Any] = {
            "id": task_id,
            "name": task,
            "attempt": attempt,
            "duration": round(duration, 6),
        }
        if verdict.result == "succeeded" and not self._sensitive(task):
            fields["result"] = bounded_repr(outcome.value)
        if verdict.retry_delay is not None:
            fields["retry_in"] = verdict.retry_delay
        error = verdict.error or outcome.error
        if error is not None:
            fields["error"] = bounded(f"{error.type_name}: {error.message}", MAX_ERROR)
            if error.traceback:
                tb = error.traceback
                fields["traceback"] = tb if len(tb) <= MAX_TRACEBACK else tb[-MAX_TRACEBACK:]
        self._end(task_id, attempt)
        self._emit(_END_EVENTS[verdict.result], fields)
        dead = self._dead.pop(task_id, None)
        if dead is not None:
            self.emit("task-dead-lettered", **dead, attempt=attempt)

    def finished(
        self, task: str, task_id: str, attempt: int, outcome: RunResult, duration: float
    ) -> None:
        return None  # `outcome` tells more

    def dead_lettered(self, queue: str, task: str, task_id: str, reason: str) -> None:
        fields = {"id": task_id, "name": task, "queue": queue, "reason": reason}
        if any(key[0] == task_id for key in self.running):
            self._dead[task_id] = fields  # after its run's own end event
            return
        self._queues.pop((task_id, 1), None)
        self.emit("task-dead-lettered", **fields)

    def cancelled(self, task: str, task_id: str, attempt: int) -> None:
        self._end(task_id, attempt)
        self.emit("task-cancelled", id=task_id, name=task, attempt=attempt)

    def _end(self, task_id: str, attempt: int) -> None:
        self.running.pop((task_id, attempt), None)
        self._progress_at.pop((task_id, attempt), None)
