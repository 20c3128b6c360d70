"""Queues deleted under a running system come back; a hand-off that cannot be made never spins.

Issue 13, around the queues: a deleted ``Q.dlq`` is declared again by the worker that dead-letters
into it, a dead letter that still cannot be stored is requeued with a back-off, and a producer
declares a work queue of its own again after someone deleted it. Against the tests' RabbitMQ.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq
import pytest

from aioqueue import App, Settings
from tests.conftest import running_worker, wait_until
from tests.rabbit import RabbitNode
from tests.test_core import get_dead_letter, publish_raw


@asynccontextmanager
async def raw_channel(url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    async with await aio_pika.connect(url) as connection:
        yield await connection.channel()


async def ready_in(url: str, queue: str) -> int | None:
    """Messages ready in ``queue``, or None when it does not exist."""
    async with raw_channel(url) as channel:
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return declared.declaration_result.message_count or 0


def lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if fragment in r.getMessage()]


def add_ok_task(app: App) -> Any:
    @app.task(name="q.ok")
    async def ok(i: int = 0) -> int:
        return i

    return ok


async def test_a_deleted_dead_letter_queue_is_declared_again(
    make_app: Callable[..., App],
    rabbit: RabbitNode,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a running worker whose dead-letter queue was deleted under it
    app = make_app()
    ok = add_ok_task(app)
    dlq = f"{queue_name}.dlq"
    caplog.set_level(logging.INFO, logger="aioqueue")
    async with app, running_worker(app):
        async with raw_channel(rabbit.url) as channel:
            await channel.queue_delete(dlq)
        assert await ready_in(rabbit.url, dlq) is None
        # When a malformed message arrives
        await publish_raw(rabbit.url, queue_name, b"garbage")
        # Then the worker declares Q.dlq again and dead-letters the message there, once
        await wait_until(lambda: ready_in(rabbit.url, dlq), what=f"a message in {dlq}")
        # and goes on serving valid tasks
        assert await (await ok.submit(7)).result(timeout=30) == 7
    assert len(lines(caplog, "was deleted; declaring it again")) == 1
    assert len(lines(caplog, "dead-lettered task")) == 1
    assert not lines(caplog, "could not dead-letter")  # not once requeued
    assert await ready_in(rabbit.url, dlq) == 1
    dead = await get_dead_letter(rabbit.url, dlq)
    assert dead.body == b"garbage"
    assert dead.headers["aioqueue-dead-reason"] == "decode"
    assert await ready_in(rabbit.url, queue_name) == 0


async def test_a_dead_letter_that_cannot_be_stored_is_requeued_with_back_off(
    make_app: Callable[..., App],
    rabbit: RabbitNode,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a worker whose Q.dlq refuses every message (a policy: at most 0, reject-publish);
    # a refused publish is sent again until its deadline, here 1 s, then the hand-off failed
    app = make_app(settings=Settings(publish_timeout=1.0))
    ok = add_ok_task(app)
    dlq = f"{queue_name}.dlq"
    policy = f"refuse-{uuid.uuid4().hex[:8]}"
    refuse = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    caplog.set_level(logging.INFO, logger="aioqueue")
    async with app, running_worker(app):
        rabbit.ctl("set_policy", policy, f"^{dlq}$", refuse, "--apply-to", "queues")
        try:

            async def refused() -> bool:
                async with await aio_pika.connect(rabbit.url) as connection:
                    confirming = await connection.channel(publisher_confirms=True)
                    try:
                        await confirming.default_exchange.publish(
                            aio_pika.Message(b"probe"), routing_key=dlq
                        )
                    except aio_pika.exceptions.DeliveryError:
                        return True
                    return False

            await wait_until(refused, what=f"the policy refusing messages to {dlq}")
            # When a malformed message arrives
            await publish_raw(rabbit.url, queue_name, b"garbage")
            # Then each failed hand-off holds it longer before the requeue (0.5 s, 1 s, ...):
            # no tight loop of redeliveries and ERROR lines
            failed = await wait_until(
                lambda: (found := lines(caplog, "could not dead-letter"))[2:] and found,
                what="three failed dead letters",
            )
            assert failed[2].created - failed[0].created >= 1.4
            started = time.monotonic()
            # and valid tasks are still served meanwhile
            assert await (await ok.submit(3)).result(timeout=30) == 3
        finally:
            rabbit.ctl("clear_policy", policy)
        # When Q.dlq accepts messages again, the message ends there, once
        await wait_until(lambda: ready_in(rabbit.url, dlq), what=f"a message in {dlq}")
        elapsed = time.monotonic() - started
    failures = len(lines(caplog, "could not dead-letter"))
    assert failures <= 3 + elapsed / 0.5, failures  # a handful, never thousands
    assert len(lines(caplog, "dead-lettered task")) == 1
    assert await ready_in(rabbit.url, dlq) == 1
    assert await ready_in(rabbit.url, queue_name) == 0


async def test_a_deleted_work_queue_is_declared_again_by_its_producer(
    make_app: Callable[..., App],
    rabbit: RabbitNode,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a producer that declared its queue with a submit, no worker consuming it
    app = make_app()
    ok = add_ok_task(app)
    caplog.set_level(logging.WARNING, logger="aioqueue.app")
    async with app:
        await ok.submit(0)
        assert await ready_in(rabbit.url, queue_name) == 1
        # When someone deletes the queue
        async with raw_channel(rabbit.url) as channel:
            await channel.queue_delete(queue_name)
        assert await ready_in(rabbit.url, queue_name) is None
        # Then the next submits succeed (concurrent ones share one declare) ...
        handles = await asyncio.gather(*(ok.submit(i) for i in range(1, 6)))
        assert await ready_in(rabbit.url, queue_name) == 5
        assert app.broker.is_declared(queue_name)
        # ... and a worker started afterwards runs them
        async with running_worker(app):
            results = [await handle.result(timeout=30) for handle in handles]
        assert results == [1, 2, 3, 4, 5]
    assert 1 <= len(lines(caplog, "was deleted; declaring it again")) <= 5


async def test_a_queue_declared_again_gets_its_delay_route_back(
    make_app: Callable[..., App], rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a producer that sent a delayed task (so its queue is bound to the delay ladder's
    # exit), no worker consuming it
    app = make_app()
    ok = add_ok_task(app)
    async with app:
        await ok.submit_with_options(args=(0,), countdown=0.1)
        await wait_until(
            lambda: _ready_is(rabbit.url, queue_name, 1), timeout=30, what="the delayed task"
        )
        # When someone deletes the queue, and a submit declares it again
        async with raw_channel(rabbit.url) as channel:
            await channel.queue_delete(queue_name)
        now = await ok.submit(1)
        # Then a delayed task sent afterwards still reaches it (the binding went with the
        # queue; without it RabbitMQ drops the message at the ladder's exit, silently)
        later = await ok.submit_with_options(args=(2,), countdown=0.2)
        await wait_until(
            lambda: _ready_is(rabbit.url, queue_name, 2), timeout=30, what="both tasks queued"
        )
        async with running_worker(app):
            assert [await h.result(timeout=30) for h in (now, later)] == [1, 2]


async def _ready_is(url: str, queue: str, count: int) -> bool:
    return await ready_in(url, queue) == count


async def test_a_queue_a_worker_declares_again_gets_its_delay_route_back(
    make_app: Callable[..., App], rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a worker whose queue is bound to the delay ladder's exit (a delayed task ran)
    app = make_app()
    ok = add_ok_task(app)
    async with app, running_worker(app) as worker:
        first = await ok.submit_with_options(args=(0,), countdown=0.1)
        assert await first.result(timeout=30) == 0
        # When someone deletes the queue under it, and its consumer declares it again
        async with raw_channel(rabbit.url) as channel:
            await channel.queue_delete(queue_name)
        await wait_until(
            lambda: _consumers_are(rabbit.url, queue_name, 1), timeout=30, what="re-consumed"
        )
        # Then a delayed task still reaches it and runs
        later = await ok.submit_with_options(args=(2,), countdown=0.2)
        assert await later.result(timeout=30) == 2
        assert not worker._stop.is_set()


async def _consumers_are(url: str, queue: str, count: int) -> bool:
    async with raw_channel(url) as channel:
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return declared.declaration_result.consumer_count == count
