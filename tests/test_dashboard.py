"""The dashboard without a browser: its bounded state, its safety rules, its HTTP API fuzzed."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioqueue import App
from aioqueue.dashboard import DashboardState
from aioqueue.dashboard.security import Credentials, check_bind
from aioqueue.dashboard.state import MAX_TIMELINE
from aioqueue.events import Event
from tests.rabbit import RabbitNode

pytest.importorskip("aiohttp")


def ev(kind: str, at: float, **fields: Any) -> Event:
    return Event(kind, at, "host:1", fields)


# -- state -----------------------------------------------------------------------------------


def test_a_task_goes_through_its_states_with_its_timeline() -> None:
    state = DashboardState()
    state.apply(ev("task-received", 60.0, id="t1", name="a.b", queue="q", args="(1,)"))
    state.apply(ev("task-started", 61.0, id="t1", attempt=1))
    state.apply(ev("task-failed", 62.0, id="t1", error="E: x", traceback="tb", duration=1.0))
    state.apply(ev("task-retried", 62.0, id="t1", retry_in=2.0))
    state.apply(ev("task-started", 64.0, id="t1", attempt=2))
    state.apply(ev("task-succeeded", 65.0, id="t1", attempt=2, result="3", duration=0.5))
    task = state.tasks["t1"].detail()
    assert task["state"] == "succeeded"
    assert (task["attempt"], task["retries"], task["result"]) == (2, 1, "3")
    assert task["traceback"] == "tb"  # from the failed attempt
    assert [e["type"] for e in task["timeline"]][:3] == [
        "task-received",
        "task-started",
        "task-failed",
    ]
    [minute] = state.series()
    assert (minute["succeeded"], minute["failed"], minute["retried"]) == (1, 1, 1)
    assert minute["failure_rate"] == 0.5


@pytest.mark.parametrize("started", [False, True], ids=["queued", "running"])
def test_a_cancelled_task_stays_cancelled_after_its_dead_letter(started: bool) -> None:
    # Given a task received (queued), perhaps started
    state = DashboardState()
    state.apply(ev("task-received", 60.0, id="t1", name="a.b", queue="q"))
    assert state.tasks["t1"].state == "queued"
    if started:
        state.apply(ev("task-started", 61.0, id="t1", attempt=1))
    # When it is cancelled, then dead-lettered (reason "cancelled"), as a worker tells it
    state.apply(ev("task-cancelled", 62.0, id="t1", attempt=1))
    state.apply(ev("task-dead-lettered", 62.0, id="t1", reason="cancelled", queue="q"))
    # Then it shows cancelled, with the dead letter's reason
    task = state.tasks["t1"].detail()
    assert (task["state"], task["reason"]) == ("cancelled", "cancelled")
    assert [e["type"] for e in task["timeline"]][-2:] == ["task-cancelled", "task-dead-lettered"]


def test_the_state_stays_bounded_whatever_the_volume() -> None:
    state = DashboardState(max_tasks=100, window_minutes=10, max_workers=5)
    for i in range(5_000):
        state.apply(ev("task-received", i * 1.0, id=f"t{i}", name="n"))
        state.apply(ev("task-progress", i * 1.0, id="hot", progress=str(i)))
        state.apply(Event("worker-heartbeat", i * 1.0, f"w{i}", {"running": []}))
    assert len(state.tasks) == 100
    assert len(state.tasks["hot"].timeline) == MAX_TIMELINE
    assert len(state.minutes) == 10
    assert len(state.workers) == 5
    assert "t4999" in state.tasks and "t0" not in state.tasks


def test_a_worker_is_offline_after_its_offline_event_or_silence() -> None:
    state = DashboardState()
    state.apply(Event("worker-online", 100.0, "a:1", {"concurrency": 4, "interval": 1.0}))
    state.apply(Event("worker-heartbeat", 100.0, "b:2", {"interval": 1.0}))
    state.apply(Event("worker-offline", 101.0, "b:2", {}))
    views = {w["identity"]: w for w in state.worker_views(102.0)}
    assert views["a:1"]["online"] and not views["b:2"]["online"]
    assert not state.worker_views(110.0)[0]["online"]  # a:1 silent for 3+ intervals


values = st.integers() | st.floats() | st.text() | st.none() | st.lists(st.integers())
keys = st.sampled_from(["id", "name", "queue", "attempt", "duration", "running", "interval"])
any_event = st.builds(
    Event,
    st.sampled_from(["task-received", "task-started", "task-failed", "worker-heartbeat", "x"]),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.dictionaries(keys | st.text(max_size=5), values),
)


@given(st.lists(any_event, max_size=50))
def test_the_state_takes_any_event_without_failing(events: list[Event]) -> None:
    state = DashboardState(max_tasks=5, window_minutes=3)
    for event in events:
        state.apply(event)
    state.series()
    state.find_tasks(name="x", since=0.0)
    state.worker_views(0.0)
    json.dumps([r.detail() for r in state.tasks.values()], default=str)


# -- safety ----------------------------------------------------------------------------------


def test_binding_beyond_loopback_needs_credentials() -> None:
    none = Credentials()
    assert check_bind("127.0.0.1", none) is None
    assert check_bind("::1", none) is None
    assert check_bind("localhost", none) is None
    assert "AIOQUEUE_DASHBOARD_TOKEN" in (check_bind("0.0.0.0", none) or "")
    assert check_bind("0.0.0.0", Credentials(token="t")) is None
    basic = Credentials.from_env({"AIOQUEUE_DASHBOARD_USER": "u"})  # no password: not configured
    assert not basic.configured


# -- the HTTP API, fuzzed ----------------------------------------------------------------------

TOKEN = "fuzz-token"


@dataclass
class Served:
    port: int
    app: App
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def served(rabbit: RabbitNode) -> Iterator[Served]:
    """The dashboard of a RabbitMQ app, served from a thread of its own (its own loop)."""
    from aiohttp import web

    from aioqueue.dashboard.server import create_app

    app = App("fuzz", broker_url=rabbit.url, default_queue=f"fuzz-{uuid.uuid4().hex[:8]}")
    state = DashboardState()
    state.apply(ev("task-received", 1.0, id="known", name="fuzz.t", queue=app.default_queue))
    loop = asyncio.new_event_loop()
    started: list[web.AppRunner] = []

    async def start() -> int:
        await app.connect()
        web_app = create_app(app, state=state, credentials=Credentials(token=TOKEN), feed=False)
        runner = web.AppRunner(web_app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        started.append(runner)
        return int(runner.addresses[0][1])

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield Served(port, app, loop)

    async def stop() -> None:
        await started[0].cleanup()
        await app.close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


PATHS = [
    "/",
    "/static/dashboard.js",
    "/static/{x}",
    "/api/overview",
    "/api/tasks?{x}",
    "/api/tasks?limit={x}&since={x}",
    "/api/tasks/{x}",
    "/api/tasks/known",
    "/api/tasks/{x}/cancel",
    "/api/workers",
    "/api/queues",
    "/api/queues/{x}/dead",
    "/api/queues/{q}/dead",
    "/api/queues/{q}/replay",
    "/api/queues/{x}/replay",
    "/api/queues/{q}/purge",
    "/api/schedules",
]
numbers = st.sampled_from(["inf", "-inf", "nan", "1e400", "-1", "0", "1e9"]) | st.text(max_size=30)
segment = numbers.map(lambda t: urllib.parse.quote(t, safe="=&"))
scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = (
    scalars
    | st.lists(scalars | st.lists(scalars, max_size=3), max_size=4)
    | st.dictionaries(st.sampled_from(["ids", "x"]), scalars | st.lists(scalars, max_size=4))
)
bodies = st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]),
    path=st.sampled_from(PATHS), x=segment, body=bodies,
    auth=st.sampled_from(["none", "token", "wrong", "basic-garbage"]),
    same_origin=st.sampled_from(["own", "none", "http://[", "evil"]), action_header=st.booleans(),
)  # fmt: skip
def test_no_request_makes_an_endpoint_fail(
    served: Served, method: str, path: str, x: str, body: bytes, auth: str,
    same_origin: str, action_header: bool,
) -> None:  # fmt: skip
    headers = {"Content-Type": "application/json"}
    headers |= {
        "token": {"Authorization": f"Bearer {TOKEN}"},
        "wrong": {"Authorization": "Bearer nope"},
        "basic-garbage": {"Authorization": "Basic " + base64.b64encode(body[:20]).decode()},
        "none": {},
    }[auth]
    if same_origin != "none":
        own = f"http://127.0.0.1:{served.port}"
        headers["Origin"] = own if same_origin == "own" else same_origin
    if action_header:
        headers["X-Aioqueue-Dashboard"] = "1"
    target = path.format(x=x, q=served.app.default_queue)
    if path == "/api/queues/{q}/purge":  # purging is tested, not fuzzed (it empties the DLQ)
        method = "GET"
    status, _ = request(served.port, method, target, body, headers)
    assert status < 500, (method, target, status)
    if auth != "token":
        assert status in (401, 404, 405), (method, target, status)


def test_actions_need_the_dashboards_own_origin(served: Served) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Aioqueue-Dashboard": "1"}
    target = f"/api/queues/{served.app.default_queue}/replay"
    body = json.dumps({"ids": ["nope"]}).encode()
    assert request(served.port, "POST", target, body, auth)[0] == 403  # no Origin, no Referer
    evil = {**auth, "Origin": "http://evil.example"}
    assert request(served.port, "POST", target, body, evil)[0] == 403
    own = {**auth, "Origin": f"http://127.0.0.1:{served.port}"}
    no_header = {k: v for k, v in own.items() if k != "X-Aioqueue-Dashboard"}
    assert request(served.port, "POST", target, body, no_header)[0] == 403
    status, answer = request(served.port, "POST", target, body, own)
    assert (status, json.loads(answer)) == (200, {"replayed": 0})


# -- served by a worker ------------------------------------------------------------------------


async def test_a_worker_serves_the_dashboard_with_dashboard_port(spawn_worker: Any) -> None:
    from tests.waiting import wait_until

    # Given a worker started with --dashboard-port (0: any free port)
    worker = spawn_worker("--dashboard-port", "0", env={"AIOQUEUE_TEST_HEARTBEAT": "0.5"})
    await worker.wait_ready()
    url = await wait_until(
        lambda: next(
            (line.split(" on ", 1)[1].strip() for line in worker.output().splitlines()
             if line.startswith("aioqueue dashboard on ")),
            None,
        ),
        what="the dashboard's address in the worker's output",
    )  # fmt: skip
    port = int(url.rstrip("/").rsplit(":", 1)[1])

    # When its workers page is asked for, Then it lists this worker online, from its heartbeats
    def online() -> bool:
        status, body = request(port, "GET", "/api/workers")
        return status == 200 and any(w["online"] for w in json.loads(body)["workers"])

    await wait_until(online, what="the worker online on its own dashboard")
    assert request(port, "GET", "/")[0] == 200


def test_a_worker_refuses_a_dashboard_beyond_localhost_without_credentials(
    rabbit: RabbitNode,
) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_DASHBOARD_")}
    command = [sys.executable, "-m", "aioqueue", "worker", "tests.apps.basic:app"]
    result = subprocess.run(
        [*command, "--dashboard-port", "0", "--dashboard-host", "0.0.0.0"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "AIOQUEUE_DASHBOARD_TOKEN" in result.stderr


def test_the_vendored_uplot_is_what_the_vendoring_script_recorded() -> None:
    import hashlib
    from pathlib import Path

    static = Path(__file__).resolve().parent.parent / "aioqueue" / "dashboard" / "static"
    record = json.loads((static / "uplot.vendored.json").read_text())
    assert record["package"] == "uplot" and record["version"]
    for name, digest in record["files"].items():
        assert hashlib.sha256((static / name).read_bytes()).hexdigest() == digest, name
    assert "MIT" in (static / "uPlot.LICENSE").read_text()
