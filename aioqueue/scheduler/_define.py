"""Defining schedules on an `App`: the pieces behind ``app.periodic`` and ``app.schedule``."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypedDict, TypeVar, overload

from .records import done_queue_name, leader_queue_name, state_queue_name
from .schedule import DEFAULT_GRACE, Misfire, Schedule

if TYPE_CHECKING:
    from ..app import App
    from ..task import Task

__all__ = ["PeriodicDecorator", "ScheduleOptions", "add_schedule", "build_schedule"]

P = ParamSpec("P")
R = TypeVar("R")

_MAX_QUEUE_NAME: Final = 255  # bytes, RabbitMQ's limit


class ScheduleOptions(TypedDict, total=False):
    """When a schedule fires and with what; each key is documented on `Schedule`.

    ``every`` also takes seconds; ``misfire`` also its value as a string.
    """

    cron: str | None
    every: timedelta | float | None
    tz: str
    start: datetime | None
    args: tuple[Any, ...] | list[Any]
    kwargs: Mapping[str, Any] | None
    misfire: Misfire | Literal["skip", "once", "all"]
    misfire_window: timedelta | None
    grace: timedelta
    skip_if_running: bool


def build_schedule(name: str, task: str, queue: str | None, options: ScheduleOptions) -> Schedule:
    """A validated `Schedule` from keyword options (unknown keys are a `TypeError`)."""
    unknown = set(options) - ScheduleOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unknown schedule option(s): {', '.join(sorted(unknown))}")
    every = options.get("every")
    return Schedule(
        name=name,
        task=task,
        cron=options.get("cron"),
        every=every if every is None or isinstance(every, timedelta) else timedelta(seconds=every),
        tz=options.get("tz", "UTC"),
        start=options.get("start"),
        args=tuple(options.get("args", ())),
        kwargs=dict(options.get("kwargs") or {}),
        queue=queue,
        misfire=Misfire(options.get("misfire", Misfire.SKIP)),
        misfire_window=options.get("misfire_window"),
        grace=options.get("grace", DEFAULT_GRACE),
        skip_if_running=options.get("skip_if_running", False),
    )


def add_schedule(app: App, schedule: Schedule) -> Schedule:
    """Add ``schedule`` to ``app``, checking its arguments against a registered task."""
    if schedule.name in app.schedules:
        raise ValueError(f"a schedule named {schedule.name!r} is already defined")
    task = app.tasks.get(schedule.task)
    if task is not None:
        task.bind(schedule.args, schedule.kwargs)
    for queue in (
        state_queue_name(app.name, schedule.name),
        done_queue_name(app.name, schedule.name),
        leader_queue_name(app.name),
    ):
        if len(queue.encode()) > _MAX_QUEUE_NAME:
            raise ValueError(f"app and schedule names too long for RabbitMQ's queue {queue!r}")
    app.schedules[schedule.name] = schedule
    return schedule


class PeriodicDecorator:
    """``@app.periodic(...)``: registers the function as a task, then schedules it.

    The schedule (already validated, with a placeholder name) takes the task's name.
    """

    def __init__(
        self,
        app: App,
        register: Callable[[Callable[..., Any]], Task[Any, Any]],
        template: Schedule,
    ) -> None:
        self._app = app
        self._register = register
        self._template = template

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Task[Any, Any]:
        task = self._register(fn)
        try:
            add_schedule(self._app, replace(self._template, name=task.name, task=task.name))
        except BaseException:
            self._app._unregister(task.name)  # a task that cannot be scheduled is not kept
            raise
        return task
