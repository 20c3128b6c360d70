"""Retries, delays, expiry and dead letters, held by RabbitMQ — on classic and quorum queues."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aioqueue import (
    App,
    DeadLetteredError,
    Retry,
    RetryPolicy,
    TaskError,
    TaskTimeoutError,
    task_context,
)
from aioqueue.message import Envelope, task_properties
from aioqueue.testing import reset
from tests.conftest import ROOT, running_worker, wait_until
from tests.rabbit import RabbitNode
from tests.test_core import get_dead_letter

FAST = RetryPolicy(max_attempts=3, backoff=0.1, max_delay=0.5, jitter=0.0)


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rabbit_qapp(make_app: Any, queue_type: str) -> App:
    """An app on RabbitMQ with classic or quorum queues."""
    app: App = make_app(queue_type=queue_type)
    return app


@pytest.fixture(params=["classic", "quorum", "memory"])
def qapp(request: pytest.FixtureRequest, make_app: Any, queue_name: str) -> Iterator[App]:
    """The portable behaviour: RabbitMQ classic, RabbitMQ quorum, and the in-memory broker."""
    if request.param == "memory":
        url = f"memory://{queue_name}"
        yield App("tests", broker_url=url, default_queue=queue_name)
        reset(url)
    else:
        yield make_app(queue_type=request.param)


async def test_retries_until_success_and_caller_sees_only_the_final_result(qapp: App) -> None:
    attempts: list[tuple[int, str]] = []

    @qapp.task(name="t.flaky", retry=FAST)
    async def flaky() -> int:
        ctx = task_context()
        attempts.append((ctx.attempt, ctx.id))
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return ctx.attempt

    async with qapp, running_worker(qapp):
        handle = await flaky.submit()
        assert await handle.result(timeout=60) == 3
    assert attempts == [(1, handle.id), (2, handle.id), (3, handle.id)]


async def test_exhausted_retries_dead_letter_with_the_last_error(
    qapp: App, rabbit: RabbitNode, queue_name: str
) -> None:
    @qapp.task(name="t.always", retry=FAST)
    async def always() -> None:
        raise ValueError(f"failure #{task_context().attempt}")

    async with qapp, running_worker(qapp):
        handle = await always.submit()
        with pytest.raises(TaskError) as info:
            await handle.result(timeout=60)
    assert info.value.type_name == "ValueError"
    assert info.value.message == "failure #3"
    dead = await get_dead_letter(qapp.broker_url, f"{queue_name}.dlq")
    assert dead.message_id == handle.id
    assert dead.headers["aioqueue-attempt"] == 3
    assert dead.headers["aioqueue-dead-reason"] == "failed"
    assert dead.headers["aioqueue-dead-error"] == "ValueError: failure #3"
    assert "x-death" not in dead.headers


async def test_only_listed_exceptions_are_retried(qapp: App) -> None:
    runs: list[int] = []
    policy = RetryPolicy(max_attempts=5, backoff=0.1, retry_on=(ConnectionError,))

    @qapp.task(name="t.picky", retry=policy)
    async def picky() -> None:
        runs.append(task_context().attempt)
        raise KeyError("not retryable")

    async with qapp, running_worker(qapp):
        with pytest.raises(TaskError, match="KeyError"):
            await (await picky.submit()).result(timeout=60)
    assert runs == [1]


async def test_raise_retry_waits_its_delay_and_uses_an_attempt(qapp: App) -> None:
    seen: list[tuple[int, float]] = []

    @qapp.task(name="t.again", retry=RetryPolicy(max_attempts=2, backoff=30))
    async def again() -> str:
        ctx = task_context()
        seen.append((ctx.attempt, time.monotonic()))
        if ctx.attempt == 1:
            raise Retry(delay=0.5)
        return "second time lucky"

    async with qapp, running_worker(qapp):
        assert await (await again.submit()).result(timeout=60) == "second time lucky"
    (a1, t1), (a2, t2) = seen
    assert (a1, a2) == (1, 2)
    assert t2 - t1 >= 0.5  # never early


async def test_a_retry_without_delay_is_run_not_taken_for_a_redelivery(qapp: App) -> None:
    # Given a task that asks for its second attempt at once: the retry is published, and may
    # be delivered, before the first attempt is settled
    attempts: list[int] = []

    @qapp.task(name="t.at_once", retry=RetryPolicy(max_attempts=2))
    async def at_once() -> int:
        attempts.append(task_context().attempt)
        if task_context().attempt == 1:
            raise Retry(delay=0)
        return 2

    async with qapp, running_worker(qapp):
        # Then the second attempt runs and its result arrives (it was acked unrun as a
        # "redelivery" of the running first attempt, and the caller waited forever)
        assert await (await at_once.submit()).result(timeout=60) == 2
    assert attempts == [1, 2]


async def test_raise_retry_is_bounded_by_the_policy_and_the_last_one_says_so(qapp: App) -> None:
    # Given a task that always raises Retry, without a policy, and one allowing 3 attempts
    seen: dict[str, list[int]] = {"t.default": [], "t.three": []}

    async def again() -> None:
        ctx = task_context()
        seen[ctx.name].append(ctx.attempt)
        raise Retry(delay=0)

    qapp.task(name="t.default")(again)
    qapp.task(name="t.three", retry=RetryPolicy(max_attempts=3, backoff=0.1))(again)
    async with qapp, running_worker(qapp):
        for name in seen:
            with pytest.raises(TaskError) as info:
                await (await qapp.submit(name)).result(timeout=60)
            # Then each ran as often as its policy allows (the default: once, no retry)
            allowed = {"t.default": 1, "t.three": 3}[name]
            assert seen[name] == list(range(1, allowed + 1))
            # and the caller learns that the Retry asked for an attempt not left
            assert info.value.type_name == "Retry"
            assert f"attempt {allowed} was the last" in info.value.message
            assert f"(max_attempts={allowed})" in info.value.message
    # as the README says (it said Retry "always" asks for another attempt)
    readme = (ROOT / "README.md").read_text()
    assert "always asks for another attempt" not in readme
    assert "default policy is no\n  retry (`max_attempts=1`), so there a `Retry` fails" in readme


async def test_retry_on_last_attempt_reports_its_cause(qapp: App) -> None:
    @qapp.task(name="t.cause", retry=RetryPolicy(max_attempts=1))
    async def cause() -> None:
        try:
            raise TimeoutError("upstream slow")
        except TimeoutError as exc:
            raise Retry(delay=0.1) from exc

    async with qapp, running_worker(qapp):
        with pytest.raises(TaskError) as info:
            await (await cause.submit()).result(timeout=60)
    assert info.value.type_name == "TimeoutError"
    assert info.value.message == "upstream slow"


async def test_thread_timeout_is_retried_when_the_policy_says(make_app: Any) -> None:
    app: App = make_app()
    release = threading.Event()
    runs: list[int] = []

    @app.task(
        name="t.stuck",
        timeout=0.3,
        retry=RetryPolicy(max_attempts=2, backoff=0.1, retry_on=(TaskTimeoutError,)),
    )
    def stuck() -> str:
        runs.append(task_context().attempt)
        release.wait(30)
        return "too late"

    async with app, running_worker(app):
        with pytest.raises(TaskTimeoutError):
            await (await stuck.submit()).result(timeout=60)
        release.set()
    assert runs == [1, 2]


@pytest.mark.parametrize("countdown", [0.3, 1.5])
async def test_countdown_runs_no_earlier_than_due_and_promptly_after(
    qapp: App, countdown: float
) -> None:
    ran_at: list[float] = []

    @qapp.task(name="t.later")
    async def later() -> None:
        ran_at.append(time.time())

    async with qapp, running_worker(qapp) as worker:
        submitted = time.time()
        handle = await later.submit_with_options(countdown=countdown)
        # while it waits, no worker holds it
        assert worker.statistics().in_hand == 0
        await handle.result(timeout=60)
    lateness = ran_at[0] - (submitted + countdown)
    assert lateness >= 0, "ran early"
    assert lateness < 5.0, f"ran {lateness:.2f}s late"  # wide margin: 2 busy cores


async def test_eta_as_aware_datetime(qapp: App) -> None:
    @qapp.task(name="t.at")
    async def at() -> float:
        return time.time()

    due = datetime.now(UTC) + timedelta(seconds=1)
    async with qapp, running_worker(qapp):
        ran = await (await at.submit_with_options(eta=due)).result(timeout=60)
    assert ran >= due.timestamp()
    with pytest.raises(ValueError, match="aware"):
        await at.submit_with_options(eta=datetime.now())
    with pytest.raises(ValueError, match="exceeds"):
        await at.submit_with_options(countdown=60 * 86400)


async def test_a_thirty_day_delay_waits_in_rabbitmq_not_in_the_worker(
    rabbit_qapp: App, rabbit: RabbitNode, queue_type: str
) -> None:
    @rabbit_qapp.task(name="t.month")
    async def month() -> None:
        raise AssertionError("must not run")

    async with rabbit_qapp, running_worker(rabbit_qapp) as worker:
        await month.submit_with_options(countdown=30 * 86400, ignore_result=True)
        # 30 days = 25,920,000 units: highest bit is level 24
        top = f"aioqueue.delay.{queue_type}.24.q"
        await wait_until(
            lambda: rabbit.queue_stats().get(top, {}).get("messages") == 1,
            what=f"the message waiting in {top}",
        )
        assert worker.statistics().in_hand == 0
    rabbit.ctl("purge_queue", top)


async def test_delays_survive_a_broker_restart(rabbit_qapp: App, rabbit: RabbitNode) -> None:
    @rabbit_qapp.task(name="t.durable_delay")
    async def durable_delay() -> float:
        return time.time()

    async with rabbit_qapp, running_worker(rabbit_qapp):
        submitted = time.time()
        handle = await durable_delay.submit_with_options(countdown=4)
        await asyncio.to_thread(rabbit.restart)
        ran = await handle.result(timeout=90)
    assert ran >= submitted + 4


async def test_expired_task_is_not_run_and_caller_gets_dead_lettered_error(
    qapp: App, rabbit: RabbitNode, queue_name: str
) -> None:
    runs: list[str] = []

    @qapp.task(name="t.stale")
    async def stale() -> None:
        runs.append("ran")

    async with qapp:
        # Given tasks whose expiry passes before any worker starts them
        past = await stale.submit_with_options(expires=datetime.now(UTC) - timedelta(seconds=1))
        delayed = await stale.submit_with_options(countdown=1.0, expires=0.5)
        async with running_worker(qapp):
            for handle in (past, delayed):
                with pytest.raises(DeadLetteredError) as info:
                    await handle.result(timeout=60)
                assert info.value.reason == "expired"
    assert runs == []
    dead = await get_dead_letter(qapp.broker_url, f"{queue_name}.dlq")
    assert dead.headers["aioqueue-dead-reason"] == "expired"


async def test_poison_message_goes_to_dlq_after_five_worker_deaths(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, queue_type: str
) -> None:
    env = {"AIOQUEUE_TEST_QUEUE_TYPE": queue_type}
    async with App(
        "client", broker_url=rabbit.url, default_queue=queue_name, queue_type=queue_type
    ) as app:  # type: ignore[arg-type]
        handle = await app.submit("tests.crash")
        deaths = 0
        while deaths < 10:
            worker = spawn_worker(env=env)
            await wait_until(
                lambda w=worker: w.proc.poll() is not None or handle.done(),
                timeout=120,
                what="a worker death or the outcome",
            )
            if handle.done():
                break
            assert worker.proc.returncode == 3, worker.output()
            deaths += 1
        with pytest.raises(DeadLetteredError) as info:
            await handle.result(timeout=60)
    assert info.value.reason == "poison"
    assert deaths == 5
    dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    assert dead.headers["aioqueue-dead-reason"] == "poison"


async def test_a_delivery_count_set_by_a_publisher_never_makes_a_task_poison(
    rabbit_qapp: App, queue_type: str
) -> None:
    # Given a task message whose publisher wrote RabbitMQ's own delivery-count header
    app = rabbit_qapp
    runs: list[int] = []

    @app.task(name="t.counted")
    async def counted(x: int) -> int:
        runs.append(x)
        return x

    async with app, running_worker(app):
        replies = app._replies
        assert replies is not None
        await replies.ensure_started()
        envelope = Envelope(id=uuid.uuid4().hex, task="t.counted", args=(7,))
        future, _ = replies.expect(envelope.id)
        envelope = replace(envelope, reply_to=replies.queue)
        props = task_properties(envelope)
        props.headers = {**(props.headers or {}), "x-delivery-count": 99}
        await app.broker.publish(app.default_queue, envelope.encode(), props)
        # Then it runs once and its caller gets the value: a quorum queue writes its own
        # count over it (0), a classic queue's header is a publisher's and counts for nothing
        outcome = await asyncio.wait_for(future, 60)
    assert outcome.value == 7 and runs == [7], (queue_type, outcome)
