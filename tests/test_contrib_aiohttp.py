"""``aioqueue.contrib.aiohttp``: the App's lifetime, worker and scheduler inside a web server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aioqueue import AioqueueError, App, BrokerConnectionError
from aioqueue.contrib.aiohttp import AIOQUEUE_APP, AIOQUEUE_EMBEDDED, get_app, setup
from tests.conftest import ROOT, wait_until
from tests.rabbit import RabbitNode


@pytest.fixture
async def app(rabbit: RabbitNode, queue_name: str) -> AsyncIterator[App]:
    """An app with a name of its own (its scheduler lease is its own too)."""
    yield App(f"contrib-{uuid.uuid4().hex[:8]}", broker_url=rabbit.url, default_queue=queue_name)
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        for name in (queue_name, f"{queue_name}.dlq"):
            await channel.queue_delete(name)


async def submit_add(request: web.Request) -> web.Response:
    handle = await get_app(request).submit("contrib.add", 2, 3)
    return web.json_response({"result": await handle.result(timeout=30)})


async def test_the_app_is_connected_while_the_server_runs(app: App) -> None:
    # Given a web application set up with an app and an in-process worker
    @app.task(name="contrib.add")
    async def add(x: int, y: int) -> int:
        return x + y

    web_app = web.Application()
    setup(web_app, app, worker=True, worker_options={"concurrency": 5})
    web_app.router.add_get("/add", submit_add)
    assert web_app[AIOQUEUE_APP] is app and get_app(web_app) is app
    with pytest.raises(AioqueueError, match="not connected"):
        app.broker  # noqa: B018 - not connected before startup

    # When it serves, handlers submit and the embedded worker runs the task
    async with TestClient(TestServer(web_app)) as client:
        embedded = web_app[AIOQUEUE_EMBEDDED]
        assert embedded.worker is not None and embedded.worker.concurrency == 5
        assert embedded.scheduler is None
        response = await client.get("/add")
        assert response.status == 200 and await response.json() == {"result": 5}

    # Then cleanup stopped the worker and closed the app
    assert embedded.worker is None
    with pytest.raises(AioqueueError, match="not connected"):
        app.broker  # noqa: B018


async def test_get_app_works_in_sub_applications(app: App) -> None:
    async def name(request: web.Request) -> web.Response:
        return web.Response(text=get_app(request).name)

    web_app, api = web.Application(), web.Application()
    setup(web_app, app)
    api.router.add_get("/name", name)
    web_app.add_subapp("/api", api)
    async with TestClient(TestServer(web_app)) as client:
        assert await (await client.get("/api/name")).text() == app.name

    with pytest.raises(LookupError, match=r"call aioqueue\.contrib\.aiohttp\.setup"):
        get_app(web.Application())


async def test_cleanup_stops_the_worker_gracefully_before_closing(
    app: App, rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a task running in the embedded worker
    gate, finished = asyncio.Event(), asyncio.Event()

    @app.task(name="contrib.slow")
    async def slow() -> None:
        await gate.wait()
        finished.set()

    web_app = web.Application()
    setup(web_app, app, worker=True)
    client = TestClient(TestServer(web_app))
    await client.start_server()
    worker = web_app[AIOQUEUE_EMBEDDED].worker
    assert worker is not None
    stopping = asyncio.Event()
    stop = worker.stop

    def spy() -> None:
        stopping.set()
        stop()

    worker.stop = spy  # type: ignore[method-assign]
    await app.submit("contrib.slow")
    await wait_until(lambda: worker.statistics().running == 1, what="the task to start")

    # When the server shuts down while it runs
    closing = asyncio.ensure_future(client.close())
    await asyncio.wait_for(stopping.wait(), 30)
    assert not closing.done()
    gate.set()
    await asyncio.wait_for(closing, 60)

    # Then the task finished and its message was settled, not returned to the queue
    assert finished.is_set()
    assert rabbit.queue_stats()[queue_name]["messages"] == 0


async def test_close_fails_pending_handles(app: App) -> None:
    # Given a handle whose task no worker runs
    web_app = web.Application()
    setup(web_app, app)
    async with TestClient(TestServer(web_app)):
        handle = await app.submit("contrib.nobody_runs_this")
        assert not handle.done()

    # When the server shut down, Then the handle fails at once instead of hanging
    with pytest.raises(BrokerConnectionError):
        await handle.result(timeout=5)


async def test_the_embedded_scheduler_fires_and_the_worker_runs_it(app: App) -> None:
    fired = asyncio.Event()

    @app.periodic(every=1, name="contrib.tick", ignore_result=True)
    async def tick() -> None:
        fired.set()

    web_app = web.Application()
    setup(web_app, app, worker=True, scheduler=True)
    async with TestClient(TestServer(web_app)):
        scheduler = web_app[AIOQUEUE_EMBEDDED].scheduler
        assert scheduler is not None
        await asyncio.wait_for(fired.wait(), 30)
        assert scheduler.is_leader
    assert web_app[AIOQUEUE_EMBEDDED].scheduler is None
    assert not scheduler.is_leader


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"worker": True, "worker_options": {"concurency": 5}}, TypeError),
        ({"worker_options": {"concurrency": 5}}, TypeError),
    ],
)
def test_setup_refuses_wrong_options(app: App, kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        setup(web.Application(), app, **kwargs)


def test_setup_twice_is_an_error(app: App) -> None:
    web_app = web.Application()
    setup(web_app, app)
    with pytest.raises(RuntimeError, match="already set up"):
        setup(web_app, app)


def test_without_aiohttp_the_import_error_names_the_extra() -> None:
    code = "import sys; sys.modules['aiohttp'] = None; import aioqueue.contrib.aiohttp"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "pip install aioqueue-rabbit[aiohttp]" in proc.stderr
