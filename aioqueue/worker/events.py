"""What a worker tells observers about each task: logs by default, metrics and events when asked.

An observer is any object with the `TaskObserver` methods (all fast and non-blocking: they run
on the worker's event loop, on the task's path). `TaskLog` writes one line per task at INFO on
the logger ``aioqueue.task``: name, id, attempt, outcome, duration.

Richer hooks are optional — the worker calls them through `notify` on the observers that define
them, so observers written before them keep working:

- ``received(task, task_id, attempt, queue, args, kwargs)``: a message was decoded;
- ``progress(task, task_id, attempt, value)``: the task reported progress;
- ``outcome(task, task_id, attempt, verdict, duration, outcome)``: as ``finished``, with the
  `Verdict` (the final error, the retry delay) and the run's `Outcome` (value or error).

``cancelled`` is in the protocol, but call it through `notify` too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..message import ErrorInfo

__all__ = ["RunResult", "TaskLog", "TaskObserver", "Verdict", "notify"]

# how one run of a task ended, as observers hear it (the caller's `Outcome` is another thing)
RunResult = Literal["succeeded", "failed", "retried", "timeout", "cancelled"]

log = logging.getLogger("aioqueue.task")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one run, decided once (`aioqueue.worker.pipeline.judge`): handed off,
    then reported."""

    result: RunResult
    retry_delay: float | None = None  # set when result == "retried"
    error: ErrorInfo | None = None  # set when result is "failed", "timeout" or "cancelled"


def notify(observers: Iterable[object], hook: str, *args: Any) -> None:
    """Call ``observer.<hook>(*args)`` on each observer that has it; an observer's error is
    logged, never raised (it must not touch the task)."""
    for observer in observers:
        method = getattr(observer, hook, None)
        if method is None:
            continue
        try:
            method(*args)
        except Exception:
            log.exception("task observer %r failed in %s", observer, hook)


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
