"""What a worker tells observers about each task: logs by default, metrics when asked.

An observer is any object with these methods (all optional to act on, all fast and non-blocking:
they run on the worker's event loop). `TaskLog` writes one line per task at INFO on the logger
``aioqueue.task``: name, id, attempt, outcome, duration.
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

__all__ = ["RunResult", "TaskLog", "TaskObserver"]

# how one run of a task ended, as observers hear it (the caller's `Outcome` is another thing)
RunResult = Literal["succeeded", "failed", "retried", "timeout", "cancelled"]

log = logging.getLogger("aioqueue.task")


class TaskObserver(Protocol):
    """Receives a worker's task events."""

    def started(self, task: str, task_id: str, attempt: int) -> None: ...

    def finished(
        self, task: str, task_id: str, attempt: int, outcome: RunResult, duration: float
    ) -> None: ...

    def dead_lettered(self, queue: str, task: str, task_id: str, reason: str) -> None: ...

    def cancelled(self, task: str, task_id: str, attempt: int) -> None: ...


class TaskLog:
    """One structured log line per finished task (``logging``, logger ``aioqueue.task``)."""

    def started(self, task: str, task_id: str, attempt: int) -> None:
        log.debug("task %s id=%s attempt=%d started", task, task_id, attempt)

    def finished(
        self, task: str, task_id: str, attempt: int, outcome: RunResult, duration: float
    ) -> None:
        level = logging.INFO if outcome in ("succeeded", "retried") else logging.WARNING
        log.log(
            level,
            "task %s id=%s attempt=%d %s in %.3fs",
            task,
            task_id,
            attempt,
            outcome,
            duration,
            extra={
                "task_name": task,
                "task_id": task_id,
                "attempt": attempt,
                "outcome": outcome,
                "duration": duration,
            },
        )

    def dead_lettered(self, queue: str, task: str, task_id: str, reason: str) -> None:
        return None  # the worker already logs every dead letter with its reason

    def cancelled(self, task: str, task_id: str, attempt: int) -> None:
        log.warning(
            "task %s id=%s attempt=%d cancelled",
            task,
            task_id,
            attempt,
            extra={"task_name": task, "task_id": task_id, "attempt": attempt},
        )
