"""aioqueue callers → an unchanged Celery worker (issue 16, second direction).

A real ``celery -A tests.apps.celery_tasks worker`` subprocess (result backend ``rpc://``, JSON)
on the tests' own RabbitMQ node runs the tasks; an aioqueue `App` submits them with
``app.celery_task(...)`` and awaits ordinary handles. One worker per module, on a queue of the
module's own.

The worker uses the prefork pool with one child, not ``--pool solo``: Celery enforces time
limits only in the prefork pool (the solo pool lists no timeouts), and one test needs one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import aio_pika
import orjson
import pytest
from pamqp import commands as spec

import aioqueue.testing as aioqueue_testing
from aioqueue import (
    App,
    PublishError,
    ResultUnavailableError,
    Settings,
    TaskError,
    TaskTimeoutError,
)
from aioqueue.errors import AioqueueError
from tests.conftest import ROOT
from tests.rabbit import RabbitNode
from tests.waiting import poll_until, wait_until

READY_TIMEOUT = 90.0  # a Celery worker boots in a few seconds; 2 busy cores get a wide margin
RESULT_TIMEOUT = 60.0


class CeleryWorker:
    """A real Celery worker subprocess with its output in a file."""

    def __init__(
        self, broker_url: str, queue: str, log: Path, *, queue_type: str = "classic"
    ) -> None:
        self.queue = queue
        self.log_path = log
        self._log = log.open("wb")
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.celery_tasks",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "-Q",
            queue,
            "-n",
            f"{queue}@%h",
            "--loglevel",
            "INFO",
        ]
        env = {
            **os.environ,
            "AIOQUEUE_BROKER_URL": broker_url,
            "AIOQUEUE_CELERY_QUEUE": queue,
            "AIOQUEUE_CELERY_QUEUE_TYPE": queue_type,
        }
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        ready = poll_until(
            lambda: " ready." in self.output() or self.proc.poll() is not None,
            timeout=READY_TIMEOUT,
        )
        assert ready, f"no Celery 'ready' line within {READY_TIMEOUT}s:\n{self.output()}"
        assert self.proc.poll() is None, f"the Celery worker exited:\n{self.output()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def celery_worker(
    rabbit: RabbitNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    queue = f"test.celery.{uuid.uuid4().hex[:12]}"
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    worker = CeleryWorker(rabbit.url, queue, log)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.kill()


@pytest.fixture
async def app(rabbit: RabbitNode, queue_name: str) -> AsyncIterator[App]:
    async with App("tests", broker_url=rabbit.url, default_queue=queue_name) as app:
        yield app


async def test_add_returns_the_celery_workers_result(app: App, celery_worker: CeleryWorker) -> None:
    # Given a Celery task named as Celery names it, on the Celery worker's queue
    add = app.celery_task("tasks.add", queue=celery_worker.queue)
    # When it is submitted from aioqueue
    handle = await add.submit(2, 3)
    # Then the handle resolves to the Celery worker's return value
    assert await handle.result(timeout=RESULT_TIMEOUT) == 5
    assert handle.done()


async def test_the_handle_id_is_the_celery_task_id(app: App, celery_worker: CeleryWorker) -> None:
    # Given a confirmed submit
    whoami = app.celery_task("tasks.whoami", queue=celery_worker.queue)
    handle = await whoami.submit()
    # When the Celery worker runs it
    seen = await handle.result(timeout=RESULT_TIMEOUT)
    # Then it saw the handle's id as its task id, and replies to this client's reply queue
    assert seen["id"] == handle.id
    assert seen["correlation_id"] == handle.id
    assert app._replies is not None and seen["reply_to"] == app._replies.queue
    assert seen["eta"] is None


async def test_a_failure_is_a_task_error_naming_the_remote_error(
    app: App, celery_worker: CeleryWorker
) -> None:
    fail = app.celery_task("tasks.fail", queue=celery_worker.queue)
    handle = await fail.submit()
    with pytest.raises(TaskError) as caught:
        await handle.result(timeout=RESULT_TIMEOUT)
    error = caught.value
    assert type(error) is TaskError
    assert (error.type_name, error.message) == ("ValueError", "boom")
    assert str(error).startswith("ValueError: boom")
    assert error.task_id == handle.id and error.task_name == "tasks.fail"
    assert "ValueError" in error.traceback  # Celery's own traceback comes along


async def test_a_retried_task_returns_its_final_value(
    app: App, celery_worker: CeleryWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aioqueue.results")
    # Given a Celery task that retries once (Celery publishes a RETRY state to the caller)
    retry_once = app.celery_task("tasks.retry_once", queue=celery_worker.queue)
    handle = await retry_once.submit("x")
    # Then the RETRY state does not resolve the handle: the final value does
    assert await handle.result(timeout=RESULT_TIMEOUT) == {"value": "x", "retries": 1}
    replies = app._replies
    assert replies is not None and replies.unreadable == 0 and replies.dropped == 0
    # (the RETRY state did come, before the outcome, and was passed over)
    passed_over = [r for r in caplog.records if "not done yet" in r.getMessage()]
    assert [handle.id in r.getMessage() for r in passed_over] == [True]


async def test_countdown_is_honoured_by_the_celery_worker(
    app: App, celery_worker: CeleryWorker
) -> None:
    # Given a task submitted with a countdown
    whoami = app.celery_task("tasks.whoami", queue=celery_worker.queue)
    before = time.time()
    handle = await whoami.submit_with_options(countdown=2.0)
    # When it ran
    seen = await handle.result(timeout=RESULT_TIMEOUT)
    # Then the Celery worker got the eta header and did not run it before (wide margin)
    eta = datetime.fromisoformat(seen["eta"]).timestamp()
    assert before + 1.5 <= eta <= time.time()
    assert seen["ran_at"] >= before + 1.5


async def test_an_eta_is_honoured_by_the_celery_worker(
    app: App, celery_worker: CeleryWorker
) -> None:
    whoami = app.celery_task("tasks.whoami", queue=celery_worker.queue)
    eta = datetime.now(UTC) + timedelta(seconds=1.5)
    handle = await whoami.submit_with_options(eta=eta)
    seen = await handle.result(timeout=RESULT_TIMEOUT)
    assert abs(datetime.fromisoformat(seen["eta"]).timestamp() - eta.timestamp()) < 0.01
    assert seen["ran_at"] >= eta.timestamp() - 0.5


async def test_expires_in_the_past_is_revoked(app: App, celery_worker: CeleryWorker) -> None:
    # Given a task whose expiry has passed when the Celery worker receives it
    add = app.celery_task("tasks.add", queue=celery_worker.queue)
    handle = await add.submit_with_options(args=(1, 1), expires=datetime.now(UTC) - timedelta(1))
    # Then Celery revokes it, and the caller learns why
    with pytest.raises(TaskError) as caught:
        await handle.result(timeout=RESULT_TIMEOUT)
    assert caught.value.type_name == "TaskRevokedError"
    assert caught.value.message == "expired"


async def test_expires_in_the_future_runs(app: App, celery_worker: CeleryWorker) -> None:
    add = app.celery_task("tasks.add", queue=celery_worker.queue)
    handle = await add.submit_with_options(args=(4, 4), expires=300)
    assert await handle.result(timeout=RESULT_TIMEOUT) == 8


async def test_ignore_result_gives_a_handle_without_a_result(
    app: App, celery_worker: CeleryWorker
) -> None:
    # Given a Celery task submitted with ignore_result, then one that wants its result
    whoami = app.celery_task("tasks.whoami", queue=celery_worker.queue)
    ignored = await whoami.submit_with_options(ignore_result=True)
    # Then the first handle has no result, at once
    with pytest.raises(ResultUnavailableError):
        await ignored.result(timeout=1)
    assert not ignored.done()
    # And the Celery worker (one at a time, in order) sent no reply for it: when the second
    # one's reply arrived, nothing was dropped as a reply to no pending handle
    later = await whoami.submit()
    assert (await later.result(timeout=RESULT_TIMEOUT))["id"] == later.id
    replies = app._replies
    assert replies is not None and replies.dropped == 0 and replies.unreadable == 0
    # And an app-level default works the same way
    quiet = app.celery_task("tasks.add", queue=celery_worker.queue, ignore_result=True)
    with pytest.raises(ResultUnavailableError):
        await (await quiet.submit(1, 2)).result()


async def test_a_time_limit_is_a_task_timeout_error(app: App, celery_worker: CeleryWorker) -> None:
    slow = app.celery_task("tasks.slow", queue=celery_worker.queue)
    handle = await slow.submit()
    with pytest.raises(TaskTimeoutError) as caught:
        await handle.result(timeout=RESULT_TIMEOUT)
    assert caught.value.type_name == "TimeLimitExceeded"
    # the pool replaces the killed child: the worker still runs tasks
    add = app.celery_task("tasks.add", queue=celery_worker.queue)
    assert await (await add.submit(1, 2)).result(timeout=RESULT_TIMEOUT) == 3


async def test_kombu_typed_values_are_decoded(app: App, celery_worker: CeleryWorker) -> None:
    typed = app.celery_task("tasks.typed", queue=celery_worker.queue)
    value = await (await typed.submit()).result(timeout=RESULT_TIMEOUT)
    assert value == {
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "amount": Decimal("1.10"),
        "plain": 7,
    }


async def test_keyword_arguments_reach_the_celery_task(
    app: App, celery_worker: CeleryWorker
) -> None:
    add = app.celery_task("tasks.add", queue=celery_worker.queue)
    assert await (await add.submit(x=2, y=40)).result(timeout=RESULT_TIMEOUT) == 42
    handle = await add.submit_with_options(args=(1,), kwargs={"y": 9})
    assert await handle.result(timeout=RESULT_TIMEOUT) == 10


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_submit_before_the_celery_worker_started(
    rabbit: RabbitNode, queue_name: str, tmp_path: Path, queue_type: Literal["classic", "quorum"]
) -> None:
    # Given an aioqueue caller that declares the Celery queue first (a quorum one with
    # App(queue_type="quorum"), as Celery's task_default_queue_type="quorum" declares it)
    async with App("tests", broker_url=rabbit.url, queue_type=queue_type) as app:
        add = app.celery_task("tasks.add", queue=queue_name)
        handle = await add.submit(20, 22)
        later = await add.submit_with_options(args=(1, 2), countdown=0.5)
        # When the Celery worker starts afterwards and declares the same queue its own way
        worker = CeleryWorker(rabbit.url, queue_name, tmp_path / "w.log", queue_type=queue_type)
        try:
            await asyncio.to_thread(worker.wait_ready)
            # Then its declaration is compatible, and it runs what waited there
            assert await handle.result(timeout=RESULT_TIMEOUT) == 42
            assert await later.result(timeout=RESULT_TIMEOUT) == 3
        finally:
            await asyncio.to_thread(worker.kill)
    assert "PRECONDITION_FAILED" not in worker.output()


# -- without a Celery worker: the caller's own side -------------------------------------------


async def test_a_pickled_celery_reply_is_unreadable_and_the_handle_keeps_waiting(
    app: App, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a Celery task on a queue no worker consumes (the handle stays pending)
    add = app.celery_task("tasks.add", queue=queue_name)
    handle = await add.submit(2, 3)
    replies = app._replies
    assert replies is not None
    # When its reply comes pickled (a Celery app with result_serializer="pickle")
    pickled = spec.Basic.Properties(
        content_type="application/x-python-serialize", correlation_id=handle.id
    )
    await app.broker.publish(replies.queue, b"\x80\x04\x95", pickled)
    # Then it is counted and logged with what to change, and the handle keeps waiting
    await wait_until(lambda: replies.unreadable == 1, what="the unreadable reply counted")
    assert not handle.done()
    assert "result_serializer" in caplog.text and handle.id in caplog.text
    # And a readable JSON reply still resolves it
    meta = (
        b'{"task_id": "%s", "status": "SUCCESS", "result": 5, "traceback": null, '
        b'"children": [], "date_done": "2026-01-01T00:00:00+00:00"}' % handle.id.encode()
    )
    json_reply = spec.Basic.Properties(content_type="application/json", correlation_id=handle.id)
    await app.broker.publish(replies.queue, meta, json_reply)
    assert await handle.result(timeout=RESULT_TIMEOUT) == 5


async def test_the_message_is_celerys_protocol_2(app: App, queue_name: str) -> None:
    # Given a Celery task submitted with every option to a queue nobody consumes
    add = app.celery_task("tasks.add", queue=queue_name)
    eta = datetime.now(UTC) + timedelta(hours=1)
    handle = await add.submit_with_options(args=(2, 3), eta=eta, expires=7200.0)
    # Then the queue holds Celery's message: headers, properties and body
    message = await _get_one(app, queue_name)
    headers: dict[str, Any] = message["headers"]
    assert headers["task"] == "tasks.add" and headers["id"] == handle.id
    assert headers["root_id"] == handle.id and headers["retries"] == 0
    assert datetime.fromisoformat(headers["eta"]) == eta
    assert datetime.fromisoformat(headers["expires"]) > eta
    assert headers["ignore_result"] is False
    assert message["correlation_id"] == handle.id
    assert message["content_type"] == "application/json"
    assert 7_000_000 <= int(message["expiration"]) <= 7_200_000  # the AMQP TTL, as kombu's
    assert message["body"] == [[2, 3], {}, _EMBED]


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


async def _get_one(app: App, queue: str) -> dict[str, Any]:
    """The one message in ``queue``, read with a plain basic.get (its properties and body)."""
    connection = await aio_pika.connect(app.broker_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        got = await wait_until(lambda: q.get(fail=False, no_ack=True), what="the message")
        return {
            "headers": dict(got.headers),
            "correlation_id": got.correlation_id,
            "content_type": got.content_type,
            "expiration": got.properties.expiration,
            "body": orjson.loads(got.body),
        }


async def test_a_nacked_publish_is_a_publish_error(rabbit: RabbitNode, queue_name: str) -> None:
    # Given a Celery queue that refuses every message (a policy: length 0, reject-publish)
    definition = '{"max-length": 0, "overflow": "reject-publish"}'
    policy = f"nack-{queue_name}"
    rabbit.ctl("set_policy", policy, f"^{queue_name}$", definition, "--apply-to", "queues")
    # (nacks are published again until the publish deadline: a short one keeps the test short)
    settings = Settings(publish_timeout=3.0)
    try:
        async with App("tests", broker_url=rabbit.url, settings=settings) as app:
            add = app.celery_task("tasks.add", queue=queue_name)
            # When a Celery task is submitted to it, Then RabbitMQ's nack is a PublishError
            with pytest.raises(PublishError, match="nacked") as caught:
                await add.submit(2, 3)
            assert caught.value.task_name == "tasks.add" and caught.value.task_id
            replies = app._replies
            assert replies is not None and replies.pending == 0  # nothing left waiting
    finally:
        rabbit.ctl("clear_policy", policy)


async def test_options_are_checked_before_publishing(app: App, queue_name: str) -> None:
    add = app.celery_task("tasks.add", queue=queue_name)
    with pytest.raises(TypeError):  # EncodeError: not JSON-native
        await add.submit(object())
    with pytest.raises(ValueError, match="not both"):
        await add.submit_with_options(countdown=1, eta=datetime.now(UTC))
    with pytest.raises(ValueError, match="aware"):
        await add.submit_with_options(eta=datetime.now())
    with pytest.raises(ValueError, match="negative"):
        await add.submit_with_options(countdown=-1)
    with pytest.raises(ValueError, match="queue name"):
        app.celery_task("tasks.add", queue="bad*queue")
    replies = app._replies
    assert replies is None or replies.pending == 0


async def test_the_memory_broker_refuses_celery_tasks(queue_name: str) -> None:
    url = f"memory://{queue_name}"
    try:
        async with App("tests", broker_url=url) as app:
            add = app.celery_task("tasks.add")
            with pytest.raises(AioqueueError, match="no Celery worker"):
                await add.submit(2, 3)
    finally:
        aioqueue_testing.reset(url)
