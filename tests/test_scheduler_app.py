"""Defining schedules on an App: ``@app.periodic``, ``app.schedule``, checked when defined."""

from __future__ import annotations

from datetime import timedelta

import pytest

import aioqueue
from aioqueue import App, Misfire, Schedule, Scheduler


def make() -> App:
    return App("shop", broker_url="amqp://guest:guest@127.0.0.1:1/")


def test_periodic_registers_a_task_and_its_schedule() -> None:
    app = make()

    @app.periodic(cron="0 3 * * *", tz="Europe/Berlin", args=(7,), queue="reports")
    async def nightly_report(days: int) -> int:
        return days

    assert nightly_report.name.startswith("tests.test_scheduler_app.")
    assert app.tasks[nightly_report.name] is nightly_report
    schedule = app.schedules[nightly_report.name]
    assert schedule.task == schedule.name == nightly_report.name
    assert (schedule.cron, schedule.tz, schedule.args, schedule.queue) == (
        "0 3 * * *",
        "Europe/Berlin",
        (7,),
        "reports",
    )
    assert nightly_report.options.queue == "reports"


async def test_a_periodic_task_stays_callable_locally() -> None:
    app = make()

    @app.periodic(every=timedelta(seconds=30), name="metrics.flush", kwargs={"n": 2})
    async def flush(n: int) -> int:
        return n * 2

    assert await flush(n=4) == 8
    assert app.schedules["metrics.flush"].every == timedelta(seconds=30)
    assert app.schedules["metrics.flush"].kwargs == {"n": 2}


def test_periodic_arguments_are_checked_when_defined() -> None:
    app = make()
    with pytest.raises(TypeError, match="missing a required argument"):

        @app.periodic(every=60)
        def needs_an_argument(x: int) -> None: ...

    # Nothing half-registered is left behind.
    assert app.tasks == {} and app.schedules == {}


def test_bad_schedule_options_fail_before_the_function_is_registered() -> None:
    app = make()
    with pytest.raises(ValueError, match="5 fields"):
        app.periodic(cron="* * * * * *")
    assert app.tasks == {}


def test_schedule_by_name_with_arguments() -> None:
    app = make()

    @app.task(name="shop.cleanup")
    async def cleanup(days: int) -> None: ...

    schedule = app.schedule("shop.cleanup", cron="*/15 * * * *", args=(7,))
    assert schedule == app.schedules["shop.cleanup"]
    assert isinstance(schedule, Schedule)
    second = app.schedule(
        "shop.cleanup", name="cleanup-30", cron="0 * * * *", args=[30], misfire="once"
    )
    assert second.misfire is Misfire.ONCE and second.args == (30,)
    with pytest.raises(TypeError, match=r"shop\.cleanup"):
        app.schedule("shop.cleanup", name="bad", cron="0 * * * *", args=(1, 2))
    with pytest.raises(ValueError, match="already defined"):
        app.schedule("shop.cleanup", cron="0 * * * *", args=(1,))


def test_a_task_of_another_service_can_be_scheduled_by_name() -> None:
    app = make()
    schedule = app.schedule("billing.invoice", every=3600, kwargs={"month": "current"})
    assert schedule.task == "billing.invoice" and schedule.queue is None
    scheduler = Scheduler(app)
    assert scheduler._queue_of(schedule) == app.default_queue


def test_unknown_options_are_refused() -> None:
    app = make()
    with pytest.raises(TypeError, match="cronn"):
        app.schedule("t", cronn="* * * * *")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unknown schedule option"):
        app.periodic(every=5, misfire_grace=5)  # type: ignore[call-arg]


def test_names_that_make_too_long_queue_names_are_refused() -> None:
    app = make()
    with pytest.raises(ValueError, match="too long"):
        app.schedule("t", name="x" * 250, every=5)


def test_scheduler_of_the_app() -> None:
    app = make()
    scheduler = app.scheduler(poll_interval=0.2, identity="me")
    assert isinstance(scheduler, Scheduler)
    assert (scheduler.app, scheduler.identity, scheduler.poll_interval) == (app, "me", 0.2)
    assert repr(scheduler) == "<Scheduler me of 'shop' follower>"


def test_public_names() -> None:
    for name in ("Misfire", "Schedule", "Scheduler"):
        assert name in aioqueue.__all__
    assert aioqueue.__all__ == sorted(aioqueue.__all__)
