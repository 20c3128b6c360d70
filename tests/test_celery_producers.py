"""Unchanged Celery 5 producers → an aioqueue worker, on the tests' own RabbitMQ node.

The Celery side is the real Celery package (``add.delay``, ``apply_async``, ``send_task``,
``AsyncResult.get`` with the ``rpc://`` backend); its calls block, so each runs in a thread,
sending and waiting in the same thread (the rpc backend's reply queue is per thread).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import aio_pika
import kombu.pools
import pytest
from celery import Celery
from celery.exceptions import NotRegistered, TaskRevokedError, TimeLimitExceeded
from kombu import Queue

from aioqueue import App, RetryPolicy, task_context
from tests.conftest import running_worker
from tests.rabbit import RabbitNode
from tests.test_core import get_dead_letter
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.timeout(120),
    # kombu keeps a connection pool per URL for every Celery client of the process, and
    # closes its connections only when they are collected: see `celery_pools` below
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def celery_pools() -> Iterator[None]:
    """Close kombu's shared connection pools once this module is done, so that no socket
    of theirs is collected (with a ResourceWarning) during another module's test."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kombu.pools.reset()
        gc.collect()


def celery_app(url: str, queue: str, **conf: Any) -> Celery:
    """A Celery producer as its users write it: tasks declared by name, JSON, rpc:// results."""
    capp = Celery("tasks", broker=url, backend="rpc://", set_as_current=False)
    capp.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=False,
        **conf,
    )

    @capp.task(name="tasks.add", shared=False)
    def add(x: int, y: int) -> int:  # pragma: no cover - runs on the aioqueue worker
        return x + y

    return capp


@pytest.fixture
def celery(rabbit: RabbitNode, queue_name: str) -> Iterator[Celery]:
    capp = celery_app(rabbit.url, queue_name)
    yield capp
    close_celery(capp)


def close_celery(capp: Celery) -> None:
    """Close the connection a Celery client's rpc:// backend opened to read replies."""
    consumer = capp.backend.result_consumer
    if consumer._consumer is not None:
        consumer.stop()
    capp.close()  # its pools are kombu's, shared by every client of one URL: left open


@pytest.fixture
def app(rabbit: RabbitNode, queue_name: str) -> App:
    return App("celery-interop", broker_url=rabbit.url, default_queue=queue_name)


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


async def message_count(url: str, queue: str) -> int:
    async with await aio_pika.connect(url) as conn:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, passive=True)
        return q.declaration_result.message_count or 0


async def test_delay_runs_on_an_aioqueue_worker_and_get_returns_the_value(
    app: App, celery: Celery, queue_name: str
) -> None:
    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int) -> int:
        return x + y

    def call() -> tuple[Any, ...]:
        result = celery.tasks["tasks.add"].delay(2, 3)
        value = result.get(timeout=30)
        by_name = celery.send_task("tasks.add", (10, 20)).get(timeout=30)
        return value, result.ready(), result.successful(), result.state, by_name

    async with app, running_worker(app):
        value, ready, successful, state, by_name = await in_thread(call)
    assert (value, ready, successful, state, by_name) == (5, True, True, "SUCCESS", 30)


async def test_a_failure_raises_the_remote_type_and_message_in_get(
    app: App, celery: Celery, queue_name: str
) -> None:
    @app.task(name="tasks.fail", queue=queue_name)
    def fail() -> None:
        raise ValueError("boom")

    def call() -> tuple[BaseException, str, bool]:
        result = celery.send_task("tasks.fail")
        try:
            result.get(timeout=30)
        except Exception as exc:
            return exc, result.state, result.successful()
        raise AssertionError("get() returned")

    async with app, running_worker(app):
        exc, state, successful = await in_thread(call)
    assert type(exc) is ValueError and str(exc) == "boom"
    assert (state, successful) == ("FAILURE", False)


async def test_countdown_waits_in_the_delay_ladder_not_in_the_worker(
    app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    ran_at: list[float] = []

    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int) -> int:
        ran_at.append(time.time())
        return x + y

    async with app, running_worker(app) as worker:
        sent = time.time()
        result = await in_thread(lambda: celery.tasks["tasks.add"].apply_async((2, 3), countdown=3))

        # the worker took it and handed it to aioqueue's delay queues: nothing is held here
        async def waiting_in_ladder() -> bool:
            stats = await asyncio.to_thread(rabbit.queue_stats)
            in_ladder = sum(
                s["messages"] for q, s in stats.items() if q.startswith("aioqueue.delay.")
            )
            return in_ladder == 1 and stats[queue_name]["messages"] == 0

        await wait_until(waiting_in_ladder, timeout=30, what="the message in the delay ladder")
        assert not ran_at and worker.statistics().in_hand == 0
        assert await in_thread(lambda: result.get(timeout=30)) == 5
    assert ran_at[0] >= sent + 3 - 0.01  # not before its ETA (sent is taken before the send)


async def test_expires_is_enforced_and_the_caller_sees_it_revoked(
    app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    runs: list[int] = []

    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int) -> int:
        runs.append(1)
        return x + y

    def call() -> tuple[BaseException, str]:
        # due in 3 s, expired after 1.5 s: it waits in the ladder and must not run
        result = celery.tasks["tasks.add"].apply_async((2, 3), countdown=3, expires=1.5)
        try:
            result.get(timeout=30)
        except Exception as exc:
            return exc, result.state
        raise AssertionError("get() returned")

    async with app, running_worker(app):
        exc, state = await in_thread(call)
        dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    assert isinstance(exc, TaskRevokedError) and state == "REVOKED"
    assert not runs
    assert dead.headers["aioqueue-dead-reason"] == "expired"
    assert dead.headers["task"] == "tasks.add"  # the Celery message itself, kept whole


async def test_retries_count_attempts_and_keep_root_and_parent_ids(
    app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    attempts: list[int] = []

    @app.task(name="tasks.flaky", queue=queue_name, retry=RetryPolicy(max_attempts=3, backoff=0.1))
    async def flaky() -> str:
        attempts.append(task_context().attempt)
        raise RuntimeError(f"attempt {task_context().attempt}")

    def call() -> BaseException:
        result = celery.send_task("tasks.flaky", retries=1, root_id="root-1", parent_id="parent-1")
        try:
            result.get(timeout=30)
        except Exception as exc:
            return exc
        raise AssertionError("get() returned")

    async with app, running_worker(app):
        exc = await in_thread(call)
        dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    # retries=1 in the message: this is attempt 2; the policy allows 3, so one retry
    assert attempts == [2, 3]
    assert type(exc) is RuntimeError and str(exc) == "attempt 3"
    assert dead.headers["retries"] == 2
    assert (dead.headers["root_id"], dead.headers["parent_id"]) == ("root-1", "parent-1")


async def test_timelimit_is_the_task_timeout(app: App, celery: Celery, queue_name: str) -> None:
    @app.task(name="tasks.slow", queue=queue_name)
    async def slow() -> None:
        await asyncio.Event().wait()

    def call() -> BaseException:
        result = celery.send_task("tasks.slow", time_limit=60, soft_time_limit=0.5)
        try:
            result.get(timeout=30)
        except Exception as exc:
            return exc
        raise AssertionError("get() returned")

    async with app, running_worker(app):
        exc = await in_thread(call)
    assert isinstance(exc, TimeLimitExceeded)
    assert "0.5s" in str(exc)


async def test_ignore_result_sends_no_reply(app: App, celery: Celery, queue_name: str) -> None:
    ran = asyncio.Event()
    loop = asyncio.get_running_loop()

    @app.task(name="tasks.add", queue=queue_name)
    def add(x: int, y: int) -> int:
        loop.call_soon_threadsafe(ran.set)
        return x + y

    def send() -> str:
        # the queue Celery's rpc:// backend reads replies from, made here: with
        # ignore_result Celery does not declare it, and a reply would be dropped unseen
        oid = str(celery.thread_oid)
        with celery.connection_for_write() as conn:
            Queue(oid, durable=True)(conn.default_channel).declare()
        celery.tasks["tasks.add"].apply_async((2, 3), ignore_result=True)
        return oid

    async with app, running_worker(app) as worker:
        reply_queue = await in_thread(send)
        await asyncio.wait_for(ran.wait(), 30)
        # once the worker has handed it off, the Celery caller's reply queue is still empty
        await wait_until(
            lambda: worker.statistics().in_hand == 0, timeout=30, what="the delivery settled"
        )
        assert await message_count(app.broker_url, reply_queue) == 0
        await app.broker.delete_queue(reply_queue)


async def test_unregistered_name_is_dead_lettered_and_get_raises_not_registered(
    app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int) -> int:
        return x + y

    def call() -> BaseException:
        try:
            celery.send_task("tasks.nope", (1,)).get(timeout=30)
        except Exception as exc:
            return exc
        raise AssertionError("get() returned")

    async with app, running_worker(app):
        exc = await in_thread(call)
        dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    assert isinstance(exc, NotRegistered) and "tasks.nope" in str(exc)
    assert dead.headers["aioqueue-dead-reason"] == "not_found"


def _send_raw(celery: Celery, queue: str, body: bytes, content_type: str, **options: Any) -> Any:
    """A Celery task message as Celery builds it, with a body in another serializer."""
    task_id = str(uuid.uuid4())
    message = celery.amqp.as_task_v2(task_id, "tasks.add", args=(2, 3), reply_to=celery.thread_oid)
    with celery.producer_or_acquire() as producer:
        celery.backend.on_task_call(producer, task_id)  # its reply queue, as apply_async does
        producer.publish(
            body,
            routing_key=queue,
            headers=message.headers,
            correlation_id=task_id,
            reply_to=celery.thread_oid,
            content_type=content_type,
            content_encoding="binary",
            **options,
        )
    return celery.AsyncResult(task_id)


REFUSED: dict[str, Callable[[Celery, str], Any]] = {
    "pickle": lambda c, q: c.tasks["tasks.add"].apply_async((2, 3), serializer="pickle"),
    "yaml": lambda c, q: c.tasks["tasks.add"].apply_async((2, 3), serializer="yaml"),
    "msgpack": lambda c, q: _send_raw(c, q, b"\x93\x92\x02\x03\x80\x80", "application/x-msgpack"),
    "link": lambda c, q: c.tasks["tasks.add"].apply_async(
        (2, 3), link=c.signature("tasks.add", (1,))
    ),
    "link_error": lambda c, q: c.tasks["tasks.add"].apply_async(
        (2, 3), link_error=c.signature("tasks.add", (1,))
    ),
    "chain": lambda c, q: (
        (c.signature("tasks.add", (2, 3)) | c.signature("tasks.add", (4,))).apply_async().parent
    ),
    "chord": lambda c, q: c.send_task("tasks.add", (2, 3), chord=c.signature("tasks.add", (1,))),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_serializer_or_canvas_part_aioqueue_does_not_run_is_dead_lettered_first(
    case: str, app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    runs: list[tuple[int, int]] = []

    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int = 0) -> int:
        runs.append((x, y))
        return x + y

    def call() -> BaseException:
        result = REFUSED[case](celery, queue_name)
        try:
            result.get(timeout=30)
        except Exception as exc:
            return exc
        raise AssertionError("get() returned")

    async with app, running_worker(app):
        exc = await in_thread(call)
        dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    reason = case if case in ("link", "link_error", "chain", "chord") else "serializer"
    assert dead.headers["aioqueue-dead-reason"] == reason
    assert not runs  # refused before anything ran: nothing unpickled, no part dropped
    if reason == "serializer":
        assert type(exc).__name__ == "ContentDisallowed", exc
        assert "only Celery's JSON serializer" in str(exc)
    else:
        assert isinstance(exc, NotImplementedError), exc
        assert f"Celery {reason}" in str(exc)


async def test_kombu_typed_arguments_become_what_the_annotations_ask_for(
    app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    seen: list[Any] = []

    @app.task(name="tasks.typed", queue=queue_name)
    async def typed(when: dt.datetime, price: float, ref: str, day: dt.date) -> str:
        seen.extend([when, price, ref, day])
        return f"{price:.2f}"

    @app.task(name="tasks.untyped", queue=queue_name)
    async def untyped(price):  # type: ignore[no-untyped-def]
        seen.append(price)

    when = dt.datetime(2026, 12, 5, 6, 0, tzinfo=dt.UTC)
    ref = uuid.uuid4()

    def call() -> tuple[Any, BaseException]:
        value = celery.send_task(
            "tasks.typed", (when, Decimal("9.50"), ref, dt.date(2026, 12, 24))
        ).get(timeout=30)
        try:
            celery.send_task("tasks.untyped", (Decimal("1.5"),)).get(timeout=30)
        except Exception as exc:
            return value, exc
        raise AssertionError("get() returned")

    async with app, running_worker(app):
        value, exc = await in_thread(call)
        dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    assert value == "9.50"
    assert seen == [when, 9.5, str(ref), dt.date(2026, 12, 24)]
    assert seen[0].tzinfo is not None
    # a Decimal for a parameter with no annotation is refused, not passed on as a Decimal
    assert "DecodeError" in type(exc).__name__ and "'price' is a Decimal" in str(exc)
    assert dead.headers["aioqueue-dead-reason"] == "decode"


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@pytest.mark.parametrize("first", ["celery", "aioqueue"])
async def test_celery_and_aioqueue_declare_the_same_queue_in_either_order(
    first: str, queue_type: str, rabbit: RabbitNode, queue_name: str
) -> None:
    # Celery declares its queue (and exchange, binding) with its own arguments on every send;
    # the worker declares it with aioqueue's: neither declare may fail, whoever comes first
    conf = {"task_default_queue_type": queue_type} if queue_type == "quorum" else {}
    capp = celery_app(rabbit.url, queue_name, **conf)
    app = App("interop", broker_url=rabbit.url, default_queue=queue_name, queue_type=queue_type)  # type: ignore[arg-type]

    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int) -> int:
        return x + y

    def send_and_get() -> list[int]:
        early = capp.tasks["tasks.add"].delay(1, 2)
        later = capp.tasks["tasks.add"].apply_async((3, 4), countdown=0.3)  # through the ladder
        return [early.get(timeout=30), later.get(timeout=30)]

    try:
        async with app:
            if first == "celery":
                sent = capp.tasks["tasks.add"].delay(5, 6)  # declares; nobody consumes yet
                async with running_worker(app):
                    values = await in_thread(send_and_get)
                    values.append(await in_thread(lambda: sent.get(timeout=30)))
            else:
                async with running_worker(app):
                    values = await in_thread(send_and_get)
                    values.append(11)
    finally:
        close_celery(capp)
    assert values == [3, 7, 11]
    stats = await asyncio.to_thread(rabbit.queue_stats)
    assert stats[queue_name]["messages"] == 0


async def test_dlq_commands_list_and_replay_a_dead_celery_message_by_its_celery_id(
    app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    from tests.test_admin import admin

    runs: list[tuple[int, int]] = []

    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int) -> int:
        runs.append((x, y))
        return x + y

    async with app:
        # a Celery message for a task this worker does not have yet is dead-lettered
        result = await in_thread(lambda: celery.send_task("tasks.later", (1, 2)))
        async with running_worker(app):
            await wait_until(
                lambda: rabbit.queue_stats().get(f"{queue_name}.dlq", {}).get("messages") == 1,
                what="the dead letter",
            )
        code, out = await admin(rabbit, queue_name, "list")
        assert code == 0 and result.id in out and "tasks.later" in out and "not_found" in out

        # once the worker has the task, `dlq replay <Celery task id>` runs it after all
        @app.task(name="tasks.later", queue=queue_name)
        async def later(x: int, y: int) -> int:
            runs.append((x, y))
            return x - y

        code, out = await admin(rabbit, queue_name, "replay", result.id)
        assert code == 0 and "replayed 1" in out, out
        async with running_worker(app):
            await wait_until(lambda: runs == [(1, 2)], what="the replayed run")


async def test_a_policy_dead_letters_what_rabbitmq_expires_itself_without_queue_arguments(
    app: App, celery: Celery, queue_name: str, rabbit: RabbitNode
) -> None:
    # kombu also sets the AMQP expiration of a message with `expires`: RabbitMQ drops it
    # unseen if nobody takes it in time. The documented policy (docs/from-celery.md) sends it
    # to Q.dlq instead, with no queue argument Celery's own declaration would disagree with.
    policy = f"dlx-{queue_name}"
    definition = f'{{"dead-letter-exchange": "", "dead-letter-routing-key": "{queue_name}.dlq"}}'
    pattern = "^" + queue_name.replace(".", r"\.") + "$"
    await asyncio.to_thread(
        rabbit.ctl, "set_policy", policy, pattern, definition, "--apply-to", "queues"
    )
    try:
        async with app:
            await app.broker.declare_queue(f"{queue_name}.dlq", {"x-queue-type": "classic"})
            await in_thread(lambda: celery.tasks["tasks.add"].apply_async((2, 3), expires=0.2))
            dead = await get_dead_letter(rabbit.url, f"{queue_name}.dlq")
    finally:
        await asyncio.to_thread(rabbit.ctl, "clear_policy", policy)
    assert dead.headers["x-first-death-reason"] == "expired"
    assert dead.headers["task"] == "tasks.add"


async def test_a_worker_uses_a_queue_celery_declared_with_arguments_of_its_own(
    rabbit: RabbitNode, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Celery declared the queue first with x-max-priority (task_queue_max_priority): the
    # worker's own declaration differs, so it uses the queue as it is instead of failing
    capp = celery_app(rabbit.url, queue_name, task_queue_max_priority=10)
    app = App("interop", broker_url=rabbit.url, default_queue=queue_name)

    @app.task(name="tasks.add", queue=queue_name)
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        sent = await in_thread(lambda: capp.tasks["tasks.add"].apply_async((2, 3), priority=5))
        async with app, running_worker(app):
            assert await in_thread(lambda: sent.get(timeout=30)) == 5
            # and later sends, declaring it again with Celery's arguments, still work
            again = await in_thread(lambda: capp.tasks["tasks.add"].delay(4, 5).get(timeout=30))
    finally:
        close_celery(capp)
    assert again == 9
    assert f"queue '{queue_name}' exists with other arguments" in caplog.text
    assert "x-max-priority" in caplog.text
