"""How a run in hand is stopped: the cancelled ids a worker knows, and each run's control.

A run executes in its delivery's own task (no task of its own: one hop of the event loop less
on every delivery, twice — to start it and to come back). Cancelling an ``async def`` task's
run therefore cancels that delivery task, while its coroutine is inside the task's code: the
control exists only while the run executes, so a cancellation that comes after it returned
cannot interrupt its hand-off (reply, retry or dead letter, then the ack). The run's caller
tells our cancellation from the worker's own (the shutdown that cancels every delivery task)
by `RunControl.ours`, and takes our request back (``Task.uncancel``) before it goes on.

A plain-function task runs in a thread, which cannot be stopped: it sees
``task_context().cancelled`` (the control's flag) and may return early.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..cancel import CancelledIds
from ..context import CancelFlag
from ..message import Envelope, ErrorInfo

__all__ = ["RunControl", "RunControls", "Waiters", "cancelled_error"]

log = logging.getLogger("aioqueue.worker")


def _cancelled_by(key: str, task_id: str) -> bool:
    """Whether the cancellation of ``task_id`` covers the run or delivery ``key``: the task
    itself, or a step of the workflow ``task_id`` (step ids are ``<workflow id>.<...>``)."""
    return key == task_id or key.startswith(f"{task_id}.")


class Waiters:
    """The task ids of deliveries waiting for a concurrency slot (`slots.py`), each with the
    future a cancellation sets."""

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Future[None], str] = {}

    def wake(self, task_id: str) -> None:
        """A cancellation of ``task_id`` came: wake the waiters it covers; each asks again
        whether it is cancelled."""
        for waiter, key in self._waiting.items():
            if _cancelled_by(key, task_id) and not waiter.done():
                waiter.set_result(None)

    async def wait(self, task_id: str, acquiring: asyncio.Future[Any]) -> None:
        """Until ``acquiring`` is done or a cancellation that may be ``task_id``'s came."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[woken] = task_id
        try:
            await asyncio.wait((acquiring, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            del self._waiting[woken]


class RunControl:
    """One run's way to be stopped: its flag, and its task when its coroutine may be
    cancelled."""

    __slots__ = ("_requested", "_task", "flag")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.flag = CancelFlag()
        self._task = task
        self._requested = False

    def stop(self) -> None:
        """Set the flag, and cancel the run's coroutine once (if it may be cancelled)."""
        self.flag.set()
        if self._task is not None and not self._requested:
            self._requested = True
            self._task.cancel()

    def ours(self) -> bool:
        """After the run ended (returned, or raised `CancelledError`): take our cancellation
        request back, and tell whether a `CancelledError` was ours alone — False when the
        task was cancelled by someone else too (the worker's shutdown)."""
        if not self.flag.is_set():
            return False
        if self._requested and self._task is not None:
            self._requested = False
            return self._task.uncancel() == 0
        task = asyncio.current_task()  # a thread task's: never cancelled by us
        return task is None or task.cancelling() == 0


class RunControls:
    """The cancelled ids this worker knows (kept by its `CancelListener`), the deliveries
    waiting for a concurrency slot, and the control of each run in hand by task id."""

    def __init__(self) -> None:
        self.ids: CancelledIds | None = None
        self.waiters = Waiters()  # deliveries waiting for a concurrency slot (`slots.py`)
        self._runs: dict[str, RunControl] = {}

    def is_cancelled(self, task_id: str, envelope: Envelope | None = None) -> bool:
        """Whether ``task_id`` — or the workflow ``envelope`` is a step of — was cancelled."""
        ids = self.ids
        if ids is None:
            return False
        workflow = None if envelope is None else envelope.workflow
        return task_id in ids or (workflow is not None and workflow.id in ids)

    def start(
        self, task_id: str, *, cancellable: bool, loop: asyncio.AbstractEventLoop | None = None
    ) -> RunControl:
        """The control of a run starting now in the current task (cancellable: an ``async
        def`` task or generator, whose coroutine runs in it) of ``loop`` (default: the
        running one)."""
        control = RunControl(asyncio.current_task(loop) if cancellable else None)
        self._runs[task_id] = control
        return control

    def end(self, task_id: str, control: RunControl) -> None:
        """The run returned or raised: it cannot be stopped any more."""
        if self._runs.get(task_id) is control:  # (two copies of one id may run here)
            del self._runs[task_id]

    def cancel(self, task_id: str) -> None:
        """A cancellation arrived: a delivery of ``task_id`` waiting for a slot asks again
        whether it is cancelled, and its run in hand here, if any, is stopped. A workflow's
        id stops its steps too (their ids are ``<workflow id>.<...>``)."""
        self.waiters.wake(task_id)
        for key, control in list(self._runs.items()):
            if _cancelled_by(key, task_id):
                log.info("task id=%s cancelled while running", key)
                control.stop()


def cancelled_error(envelope: Envelope, *, running: bool) -> ErrorInfo:
    """What the caller of a cancelled task learns."""
    when = "while it ran" if running else "before it ran"
    message = f"task {envelope.task} was cancelled {when}"
    return ErrorInfo("cancelled", "TaskCancelledError", message)
