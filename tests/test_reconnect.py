"""Producers, workers and callers survive broker restarts and dropped connections.

Real worker subprocesses where the behaviour belongs to a process; the broker is the tests'
own node (``rabbit``), restarted or killed in a thread so the event loop keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from aioqueue import App, BrokerConnectionError, PublishError, Settings
from aioqueue.rabbit.connection import CHANNEL_FRAME_BUFFER
from aioqueue.topology import work_queue_arguments
from tests.conftest import WorkerProcess, running_worker, wait_until
from tests.rabbit import RabbitNode


def client(rabbit: RabbitNode, queue_name: str, **settings: Any) -> App:
    """A producer-only app that knows the subprocess's tasks by name."""
    return App(
        "tests-client",
        broker_url=rabbit.url,
        default_queue=queue_name,
        settings=Settings(**settings),
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def connection_of(app: App) -> Any:
    """The app's aio-pika robust connection (RabbitMQ broker only)."""
    broker: Any = app.broker
    return broker._connection


async def consumers(rabbit: RabbitNode, queue: str) -> int:
    stats = await asyncio.to_thread(rabbit.queue_stats)
    return stats.get(queue, {}).get("consumers", 0)


@pytest.mark.parametrize("outage", ["restart", "kill"])
async def test_callers_wait_across_a_broker_outage_and_get_their_results(
    outage: str,
    spawn_worker: Callable[..., WorkerProcess],
    rabbit: RabbitNode,
    queue_name: str,
    tmp_path: Path,
) -> None:
    # Given a worker running a task and callers waiting for many results
    worker = spawn_worker()
    await worker.wait_ready()
    async with client(rabbit, queue_name) as app:
        running = await app.submit("tests.gated", outage)
        await wait_until(lambda: lines(tmp_path / f"started-{outage}"), what="task started")
        before = [await app.submit("tests.add", i, 1) for i in range(20)]
        await asyncio.gather(*(h.result(timeout=60) for h in before))
        # When the broker goes away (stop_app/start_app, or kill -9 of the node) and returns
        await asyncio.to_thread(rabbit.restart if outage == "restart" else rabbit.kill)
        # Then new submits work, the running task finishes, and every caller gets its result
        after = [await app.submit("tests.add", i, 2) for i in range(20)]
        (tmp_path / f"release-{outage}").touch()
        result = await running.result(timeout=90)
        assert result["key"] == outage
        assert await asyncio.gather(*(h.result(timeout=90) for h in after)) == [
            i + 2 for i in range(20)
        ]
        assert worker.proc.poll() is None, worker.output()
        replies: Any = app._replies
        assert replies.pending == 0


async def test_close_all_connections_repeatedly_while_tasks_flow(
    spawn_worker: Callable[..., WorkerProcess], rabbit: RabbitNode, queue_name: str
) -> None:
    # Given two workers and a producer submitting a steady stream of tasks
    workers = [spawn_worker("--concurrency", "20") for _ in range(2)]
    for worker in workers:
        await worker.wait_ready()
    async with client(rabbit, queue_name) as app:
        handles: list[Any] = []

        async def produce() -> None:
            for i in range(600):
                handles.append(await app.submit("tests.add", i, i))

        producing = asyncio.ensure_future(produce())
        # When every connection (producer's and workers') is closed three times mid-stream
        for round_ in range(1, 4):
            await wait_until(lambda: len(handles) >= 150 * round_, timeout=90, what="submits")  # noqa: B023
            await asyncio.to_thread(rabbit.close_all_connections)
        await asyncio.wait_for(producing, 120)
        # Then every confirmed submit is run and its caller gets the right result
        results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
        assert results == [2 * i for i in range(600)]
        assert all(w.proc.poll() is None for w in workers)
        assert "lost the channel" in workers[0].output() + workers[1].output()


async def test_a_server_side_consumer_cancel_is_recovered(
    spawn_worker: Callable[..., WorkerProcess], rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a worker consuming its queue
    worker = spawn_worker()
    await worker.wait_ready()
    await wait_until(lambda: consumers(rabbit, queue_name), what="the worker's consumer")
    # When the queue is deleted and re-created under it (RabbitMQ sends Basic.Cancel)
    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel()
        await channel.queue_delete(queue_name)
        await channel.declare_queue(queue_name, durable=True, arguments=work_queue_arguments())
    # Then the worker consumes again, and a later submit runs
    await wait_until(lambda: "cancelled by the server" in worker.output(), what="the cancel")
    await wait_until(lambda: consumers(rabbit, queue_name), timeout=60, what="re-consuming")
    async with client(rabbit, queue_name) as app:
        handle = await app.submit("tests.add", 20, 22)
        assert await handle.result(timeout=60) == 42
    assert worker.proc.poll() is None


async def test_a_stale_ack_after_a_connection_loss_never_crashes_the_worker(
    spawn_worker: Callable[..., WorkerProcess],
    rabbit: RabbitNode,
    queue_name: str,
    tmp_path: Path,
) -> None:
    # Given a worker running a task
    worker = spawn_worker("--log-level", "DEBUG")
    await worker.wait_ready()
    async with client(rabbit, queue_name) as app:
        handle = await app.submit("tests.gated", "stale")
        await wait_until(lambda: lines(tmp_path / "started-stale"), what="task started")
        # When its connection is closed under it, and the task finishes only once RabbitMQ
        # has redelivered it to the same worker (a redelivery after the finish would run it
        # again, rightly: its ack went with the old channel)
        await asyncio.to_thread(rabbit.close_all_connections)
        await wait_until(lambda: "lost the channel" in worker.output(), what="channel lost")
        await wait_until(
            lambda: "is already running here" in worker.output(), timeout=60, what="redelivery"
        )
        (tmp_path / "release-stale").touch()
        # Then its ack on the dead channel is dropped, the caller gets the one result, and
        # the worker lives on
        assert (await handle.result(timeout=60))["key"] == "stale"
        await wait_until(lambda: "dropped stale" in worker.output(), what="stale ack")
        assert await (await app.submit("tests.add", 1, 2)).result(timeout=60) == 3
        assert worker.proc.poll() is None
        assert "unexpected error" not in worker.output()
    assert len(lines(tmp_path / "started-stale")) == 1  # the redelivery did not run it again


async def test_a_publish_while_the_broker_is_down_completes_once_it_returns(
    make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given a connected app and a worker
    app = make_app()

    @app.task(name="t.echo")
    async def echo(x: int) -> int:
        return x

    async with app, running_worker(app):
        assert await (await echo.submit(1)).result(timeout=30) == 1
        # When the broker stops, a submit waits (it is not confirmed, so it has not returned)
        await asyncio.to_thread(rabbit.stop_app)
        try:
            started = time.monotonic()
            submit = asyncio.ensure_future(echo.submit(2))
            done, _ = await asyncio.wait({submit}, timeout=1.0)
            assert not done, "a submit returned while the broker was down"
        finally:
            await asyncio.to_thread(rabbit.start_app)
        # Then it completes after the broker returns, within the publish deadline
        handle = await asyncio.wait_for(submit, app.settings.publish_timeout)
        assert time.monotonic() - started < app.settings.publish_timeout
        assert await handle.result(timeout=60) == 2


@pytest.mark.parametrize("first_submit", [False, True])
async def test_a_publish_while_the_broker_stays_down_raises_publish_error_in_time(
    first_submit: bool, make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given an app with a short publish deadline (that has or has not submitted before)
    app = make_app(settings=Settings(publish_timeout=3))
    async with app:
        if not first_submit:
            await app.submit_with_options("t.nothing", ignore_result=False)
        await asyncio.to_thread(rabbit.stop_app)
        try:
            # When the broker stays down past the deadline
            started = time.monotonic()
            with pytest.raises(PublishError):
                await asyncio.wait_for(app.submit("t.nothing"), 30)
            elapsed = time.monotonic() - started
        finally:
            await asyncio.to_thread(rabbit.start_app)
        # Then the submit raised PublishError at its deadline, not later, and forgot its handle
        assert elapsed < 3 + 2, elapsed
        replies: Any = app._replies
        assert replies.pending == (0 if first_submit else 1)


async def test_the_heartbeat_is_negotiated_from_settings_unless_the_url_sets_it(
    rabbit: RabbitNode, queue_name: str
) -> None:
    async with App("hb", broker_url=rabbit.url, settings=Settings(heartbeat=7)) as app:
        assert connection_of(app).transport.connection.heartbeat_timeout == 7
    async with App("hb", broker_url=rabbit.url + "?heartbeat=3") as app:
        assert connection_of(app).transport.connection.heartbeat_timeout == 3


async def test_credentials_never_appear_in_reprs_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = "amqp://user:hunter2@127.0.0.1:1/?heartbeat=5"
    app = App("secret", broker_url=url, settings=Settings(connect_timeout=1))
    with pytest.raises(BrokerConnectionError) as info:
        await app.connect()
    assert "user:****@127.0.0.1:1" in str(info.value)
    for text in (repr(app), str(info.value), repr(info.value), caplog.text):
        assert "hunter2" not in text


async def test_every_channel_gets_the_deep_frame_buffer_after_a_reconnect_too(
    make_app: Callable[..., App], rabbit: RabbitNode
) -> None:
    # Given a connected app with a publishing channel and a consumed reply queue
    app = make_app()
    async with app:
        await app.submit_with_options("t.nothing", ignore_result=False)

        def buffers() -> set[int] | None:
            transport = connection_of(app).transport
            if transport is None or not transport.connection.is_opened:
                return None
            channels = transport.connection.channels.values()
            return {channel.frames.maxsize for channel in channels} or None

        before = connection_of(app).transport.connection
        assert buffers() == {CHANNEL_FRAME_BUFFER}
        # When the connection is closed under it and comes back
        await asyncio.to_thread(rabbit.close_all_connections)
        await wait_until(
            lambda: (
                connection_of(app).transport is not None
                and connection_of(app).transport.connection is not before
                and buffers()
            ),
            timeout=60,
            what="a new connection",
        )
        await app.submit_with_options("t.nothing", ignore_result=False)
        # Then its channels, restored or new, have the deep buffer as well
        assert buffers() == {CHANNEL_FRAME_BUFFER}
        assert len(connection_of(app).transport.connection.channels) >= 2


async def test_a_nacked_publish_is_sent_again_until_its_deadline_then_raises(
    rabbit: RabbitNode, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aioqueue.broker")
    # Given a queue that rejects publishes while full (RabbitMQ nacks them), and full
    full = f"{queue_name}.full"
    args = {"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"}
    async with await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(full, durable=True, arguments=args)
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=full)
        async with client(rabbit, queue_name, publish_timeout=3.0) as app:
            broker: Any = app.broker
            await broker.declare_queue(full, args)
            # When a submit's publish is nacked until its deadline, it raises PublishError then
            started = time.monotonic()
            with pytest.raises(PublishError, match="nacked"):
                await app.submit_with_options("tests.add", (1, 2), queue=full)
            assert 2.0 < time.monotonic() - started < 10
            # And one nacked at first goes through once the queue has room, within its deadline
            caplog.clear()
            submit = asyncio.ensure_future(
                app.submit_with_options("tests.add", (1, 2), queue=full, ignore_result=True)
            )
            await wait_until(lambda: "publishing again" in caplog.text, what="a nack")
            await queue.purge()
            await asyncio.wait_for(submit, 10)
        assert (await queue.declare()).message_count == 1
        await queue.delete(if_unused=False, if_empty=False)
