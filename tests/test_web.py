"""``services/web``: the HTTP API in front of aioqueue, against the tests' RabbitMQ node.

Each test builds the web application with ``create_app`` around an `App` of its own (own name,
own queue, tasks registered here) and runs the worker inside it (``worker=True``).
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from aioqueue import App, BrokerConnectionError, PublishError, Settings, TaskError, task_context
from services.web.handles import HandleStore
from services.web.service import HANDLES, create_app, health
from tests.conftest import wait_until
from tests.rabbit import RabbitNode


@dataclass
class Tasks:
    """An app with the tasks these tests submit over HTTP; ``gate`` holds ``web.gated`` back."""

    app: App
    gate: asyncio.Event = field(default_factory=asyncio.Event)


def make_tasks(rabbit: RabbitNode, queue: str, **settings: Any) -> Tasks:
    app = App(
        f"web-{uuid.uuid4().hex[:8]}",
        broker_url=rabbit.url,
        default_queue=queue,
        settings=Settings(**settings),
    )
    tasks = Tasks(app)

    @app.task(name="web.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="web.fail")
    async def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="web.gated")
    async def gated(key: str) -> str:
        await tasks.gate.wait()
        return f"released {key}"

    @app.task(name="web.notify", ignore_result=True)
    async def notify(address: str) -> None:
        return None

    return tasks


@pytest.fixture
async def tasks(rabbit: RabbitNode, queue_name: str) -> AsyncIterator[Tasks]:
    yield make_tasks(rabbit, queue_name)
    await delete_queues(rabbit.url, queue_name, f"{queue_name}.dlq")


async def delete_queues(url: str, *names: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def serve(web_app: web.Application) -> TestClient[web.Request, web.Application]:
    client = TestClient(TestServer(web_app))
    await client.start_server()
    return client


@pytest.fixture
async def client(tasks: Tasks) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = await serve(create_app(tasks.app, worker=True))
    try:
        yield client
    finally:
        tasks.gate.set()
        await client.close()


async def submit(client: TestClient[Any, Any], name: str, body: Any = None) -> ClientResponse:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body or {})
    return await client.post(f"/tasks/{name}", data=data)


async def poll(client: TestClient[Any, Any], task_id: str, *, timeout: float = 30) -> Any:
    """GET the task until it is no longer pending (deadline ``timeout``)."""

    async def finished() -> Any:
        response = await client.get(f"/tasks/{task_id}")
        assert response.status == 200, await response.text()
        body = await response.json()
        return body if body["status"] != "pending" else None

    return await wait_until(finished, timeout=timeout, what=f"task {task_id} to finish")


async def read_events(response: ClientResponse, until: str) -> list[tuple[str, Any]]:
    """Parse server-sent events from ``response`` up to and including the event ``until``."""
    events: list[tuple[str, Any]] = []
    name = ""
    async with asyncio.timeout(30):
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == until:
                    return events
    raise AssertionError(f"stream ended before an {until!r} event: {events}")


async def test_submit_then_poll_until_succeeded(client: TestClient[Any, Any]) -> None:
    # Given a running service with an in-process worker
    # When a task is submitted with positional and keyword arguments
    response = await submit(client, "web.add", {"args": [2], "kwargs": {"y": 3}})

    # Then it is accepted with its id, and polling shows its result
    assert response.status == 202, await response.text()
    accepted = await response.json()
    assert response.headers["Location"] == f"/tasks/{accepted['id']}"
    body = await poll(client, accepted["id"])
    assert body == {"id": accepted["id"], "task": "web.add", "status": "succeeded", "result": 5}


async def test_a_failure_reports_the_error_type_and_message(client: TestClient[Any, Any]) -> None:
    response = await submit(client, "web.fail", {"args": ["card declined"]})
    assert response.status == 202
    body = await poll(client, (await response.json())["id"])
    assert body["status"] == "failed"
    assert body["error"] == {"type": "ValueError", "message": "card declined"}
    assert "result" not in body


@pytest.mark.parametrize(
    ("name", "body", "status", "expected"),
    [
        ("web.add", "{not json", 400, "not valid JSON"),
        ("web.add", "[1, 2]", 400, "must be a JSON object"),
        ("web.add", {"args": [1], "extra": 1}, 400, "unknown key"),
        ("web.add", {"args": 5}, 400, '"args" must be a list'),
        ("web.add", {"args": [1]}, 400, "missing a required argument: 'y'"),
        ("web.add", {"args": [1, 2, 3]}, 400, "too many positional arguments"),
        ("web.add", '{"args": [NaN, 1]}', 400, "JSON cannot represent"),  # EncodeError
        ("web.add", {"args": [1, 2], "countdown": -1}, 400, "countdown must not be negative"),
        ("web.add", {"args": [1, 2], "countdown": "soon"}, 400, '"countdown" must be a number'),
        ("web.nope", {}, 404, "no task named 'web.nope'"),
        # 5,000 nested arrays: json.loads recurses, so RecursionError, not ValueError
        ("web.add", '{"args": [' + "[" * 5000 + "]" * 5000 + ", 5]}", 400, "nested too deeply"),
        ("web.add", {"args": [1, json.loads("[" * 100 + "]" * 100)]}, 400, "nested more than"),
    ],
)
async def test_bad_requests_publish_nothing(
    client: TestClient[Any, Any],
    rabbit: RabbitNode,
    queue_name: str,
    name: str,
    body: Any,
    status: int,
    expected: str,
) -> None:
    # When the body or the arguments are wrong
    response = await submit(client, name, body)

    # Then the caller learns why, and nothing was published
    assert response.status == status
    error = (await response.json())["error"]
    assert expected in error["message"], error
    assert rabbit.queue_stats().get(queue_name, {}).get("messages", 0) == 0


async def test_a_body_over_the_size_limit_is_413_in_the_documented_shape(
    client: TestClient[Any, Any], rabbit: RabbitNode, queue_name: str
) -> None:
    # When a body over aiohttp's client_max_size (1 MiB) arrives
    limit = 1024**2
    body = json.dumps({"args": ["x" * limit, 1]}).encode()
    response = await client.post("/tasks/web.add", data=io.BytesIO(body))

    # Then the answer is 413 as JSON {"error": {"type", "message"}}, and nothing was published
    assert response.status == 413
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error == {
        "type": "PayloadTooLarge",
        "message": f"the body is over the limit of {limit} bytes",
    }
    assert rabbit.queue_stats().get(queue_name, {}).get("messages", 0) == 0


async def test_unknown_ids_are_404(client: TestClient[Any, Any]) -> None:
    for path in ("/tasks/0123abc", "/tasks/0123abc/events"):
        response = await client.get(path)
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "UnknownTask"


async def test_an_ignore_result_task_is_accepted_but_not_kept(
    client: TestClient[Any, Any],
) -> None:
    response = await submit(client, "web.notify", {"args": ["ann@example.com"]})
    assert response.status == 202
    accepted = await response.json()
    assert accepted["ignore_result"] is True
    assert (await client.get(f"/tasks/{accepted['id']}")).status == 404


async def test_the_event_stream_sends_the_final_outcome(
    client: TestClient[Any, Any], tasks: Tasks
) -> None:
    # Given a task that waits at its gate
    response = await submit(client, "web.gated", {"args": ["a"]})
    task_id = (await response.json())["id"]

    # When a client follows its events, then the task finishes
    stream = await client.get(f"/tasks/{task_id}/events")
    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert (await poll_status(client, task_id)) == "pending"
    tasks.gate.set()

    # Then the stream delivers one outcome event, like GET, and ends
    events = await read_events(stream, until="outcome")
    assert events == [
        (
            "outcome",
            {"id": task_id, "task": "web.gated", "status": "succeeded", "result": "released a"},
        )
    ]
    assert (await stream.content.read()).strip() == b""  # and the stream ended

    # And a stream opened after the outcome arrived sends it at once (failures too)
    failed = await submit(client, "web.fail", {"args": ["no"]})
    failed_id = (await failed.json())["id"]
    await poll(client, failed_id)
    events = await read_events(await client.get(f"/tasks/{failed_id}/events"), until="outcome")
    assert events[0][1]["error"] == {"type": "ValueError", "message": "no"}


async def poll_status(client: TestClient[Any, Any], task_id: str) -> str:
    response = await client.get(f"/tasks/{task_id}")
    return str((await response.json())["status"])


async def test_memory_is_bounded_finished_handles_are_evicted_first(tasks: Tasks) -> None:
    client = await serve(create_app(tasks.app, max_handles=1, worker=True))
    try:
        # Given a store of one handle, holding a pending task
        first = await (await submit(client, "web.gated", {"args": ["a"]})).json()
        assert await poll_status(client, first["id"]) == "pending"

        # When it is full of pending handles, a new task is refused, not published
        response = await submit(client, "web.add", {"args": [1, 2]})
        assert response.status == 503 and response.headers["Retry-After"] == "1"

        # Once the first finished, a new task takes its place and the first is evicted
        tasks.gate.set()
        await poll(client, first["id"])
        response = await submit(client, "web.add", {"args": [1, 2]})
        assert response.status == 202
        assert (await client.get(f"/tasks/{first['id']}")).status == 404
        assert (await poll(client, (await response.json())["id"]))["result"] == 3
    finally:
        await client.close()


async def test_shutdown_ends_event_streams_and_fails_pending_handles(tasks: Tasks) -> None:
    # Given a pending task (no worker) followed by an event stream
    web_app = create_app(tasks.app)
    client = await serve(web_app)
    try:
        task_id = (await (await submit(client, "web.gated", {"args": ["a"]})).json())["id"]
        handle = web_app[HANDLES].get(task_id)
        assert handle is not None
        stream = await client.get(f"/tasks/{task_id}/events")
        assert stream.status == 200

        # When the server shuts down
        closing = asyncio.ensure_future(client.server.close())
        events = await read_events(stream, until="shutdown")
        await asyncio.wait_for(closing, 30)

        # Then the stream said so, and the handle failed instead of hanging
        assert events[-1][1]["id"] == task_id
        with pytest.raises(BrokerConnectionError):
            await handle.result(timeout=5)
    finally:
        await client.close()


async def test_an_unconfirmed_publish_is_503(rabbit: RabbitNode, queue_name: str) -> None:
    # Given a broker whose memory alarm blocks every publisher, and a 1 s publish deadline
    tasks = make_tasks(rabbit, queue_name, publish_timeout=1.0)
    client = await serve(create_app(tasks.app))
    try:
        rabbit.ctl("set_vm_memory_high_watermark", "0")
        try:
            # When a task is submitted, Then the service answers 503 with a PublishError
            response = await submit(client, "web.add", {"args": [1, 2]})
            assert response.status == 503
            assert (await response.json())["error"]["type"] == PublishError.__name__
        finally:
            rabbit.ctl("set_vm_memory_high_watermark", "0.4")

        # And once the alarm clears, submits are accepted again
        async def accepted() -> bool:
            return (await submit(client, "web.add", {"args": [1, 2]})).status == 202

        await wait_until(accepted, timeout=60, what="a submit after the alarm cleared")
    finally:
        await client.close()
        await delete_queues(rabbit.url, queue_name)


class FakeHandle:
    def __init__(self, task_id: str, done: bool = False) -> None:
        self.id = task_id
        self.finished = done

    def done(self) -> bool:
        return self.finished


def test_handle_store_evicts_the_oldest_finished_handle() -> None:
    store = HandleStore(max_handles=3)
    handles = [FakeHandle("a"), FakeHandle("b"), FakeHandle("c")]
    for handle in handles:
        assert store.reserve()
        store.add(handle)  # type: ignore[arg-type]
    assert not store.reserve()  # all pending: no room

    handles[2].finished = handles[1].finished = True
    assert store.reserve()  # evicts b, the oldest finished; a (pending) stays
    store.add(FakeHandle("d"))  # type: ignore[arg-type]
    assert [store.get(i) is not None for i in "abcd"] == [True, False, True, True]

    assert store.reserve()  # evicts c
    store.release()  # the submit failed: the room is given back
    assert len(store) == 2  # a and d, both pending
    assert store.reserve()  # the room given back
    assert not store.reserve()  # full again, nothing finished


@dataclass(frozen=True)
class FakeProgress:
    seq: int
    data: Any


@dataclass(frozen=True)
class FakeResult:
    value: Any


class ProgressHandle:
    """A handle whose ``events()`` yields progress then the result, or raises the task's error."""

    task_name = "web.report"

    def __init__(self, task_id: str, error: Exception | None = None) -> None:
        self.id = task_id
        self.error = error

    async def events(self) -> AsyncIterator[Any]:
        yield FakeProgress(1, {"done": 1, "total": 2})
        yield FakeProgress(2, {"done": 2, "total": 2})
        if self.error is not None:
            raise self.error
        yield FakeResult("report.pdf")

    def done(self) -> bool:
        return True

    async def result(self, timeout: float | None = None) -> str:
        if self.error is not None:
            raise self.error
        return "report.pdf"


async def test_the_event_stream_relays_the_progress_of_handle_events(tasks: Tasks) -> None:
    # Given handles whose events() report progress, then succeed or fail
    web_app = create_app(tasks.app)
    client = await serve(web_app)
    store = web_app[HANDLES]
    for handle in (ProgressHandle("ok"), ProgressHandle("bad", TaskError("OSError", "disk full"))):
        assert store.reserve()
        store.add(handle)  # type: ignore[arg-type]
    try:
        # When a client follows them
        ok = await read_events(await client.get("/tasks/ok/events"), until="outcome")
        bad = await read_events(await client.get("/tasks/bad/events"), until="outcome")

        # Then each progress update is an event, and the last one is the outcome
        progress = [
            ("progress", {"seq": 1, "data": {"done": 1, "total": 2}}),
            ("progress", {"seq": 2, "data": {"done": 2, "total": 2}}),
        ]
        assert ok == [
            *progress,
            (
                "outcome",
                {"id": "ok", "task": "web.report", "status": "succeeded", "result": "report.pdf"},
            ),
        ]
        assert bad[:2] == progress
        assert bad[2][1]["error"] == {"type": "OSError", "message": "disk full"}
    finally:
        await client.close()


async def test_progress_reported_by_a_running_task_reaches_the_event_stream(
    rabbit: RabbitNode, queue_name: str
) -> None:
    # Given a task that reports progress, then waits at its gate
    tasks = make_tasks(rabbit, queue_name)

    @tasks.app.task(name="web.steps")
    async def steps() -> str:
        await task_context().progress({"step": 1})
        await tasks.gate.wait()
        return "all done"

    client = await serve(create_app(tasks.app, worker=True))
    try:
        task_id = (await (await submit(client, "web.steps")).json())["id"]
        stream = await client.get(f"/tasks/{task_id}/events")

        # When its progress arrived and the task is released
        first = await read_events(stream, until="progress")
        tasks.gate.set()
        rest = await read_events(stream, until="outcome")

        # Then the stream carried the update, then the outcome
        assert first == [("progress", {"seq": 1, "data": {"step": 1}})]
        assert rest == [
            (
                "outcome",
                {"id": task_id, "task": "web.steps", "status": "succeeded", "result": "all done"},
            )
        ]
    finally:
        tasks.gate.set()
        await client.close()
        await delete_queues(rabbit.url, queue_name, f"{queue_name}.dlq")


async def test_health_answers_200_while_connected(client: TestClient[Any, Any]) -> None:
    # Given a running service connected to RabbitMQ, its health check answers 200
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_health_answers_503_without_a_connection(tasks: Tasks) -> None:
    # Given a service whose app is not connected (before start-up, or after its close)
    web_app = create_app(tasks.app)
    request = make_mocked_request("GET", "/health", app=web_app)
    # Then the health check fails, so the compose stack marks it unhealthy
    response = await health(request)
    assert response.status == 503
    assert response.text is not None and json.loads(response.text) == {"status": "unavailable"}
