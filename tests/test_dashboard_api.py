"""The dashboard's pages through its JSON API (no browser), against the tests' RabbitMQ node.

Each test works in a vhost of its own (the event stream is one per vhost). What the browser
tests leave to these: a dashboard that starts after the events (or restarts) rebuilds its
view from the stream; the task list's filters; the task page's dead-letter copy; every action
is logged with who did it; every asset is served by the dashboard itself (offline).

The assets and schedules tests serve the dashboard without its event reader (``feed=False``):
with it, in a vhost where no worker ever published, about one run in three hung (> 60 s) —
an open problem of the reader's start or close on a fresh stream, not understood yet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from aioqueue import App, RetryPolicy
from aioqueue.settings import Settings
from tests.conftest import running_worker
from tests.rabbit import RabbitNode
from tests.waiting import wait_until

pytest.importorskip("aiohttp")
import aiohttp
from aiohttp import web

from aioqueue.dashboard import DashboardState
from aioqueue.dashboard.security import Credentials
from aioqueue.dashboard.server import create_app

STATIC = Path(__file__).resolve().parent.parent / "aioqueue" / "dashboard" / "static"
ALICE = {"Authorization": "Basic " + base64.b64encode(b"alice:wonder-land").decode()}


@pytest.fixture
def vhost_url(rabbit: RabbitNode) -> Iterator[str]:
    vhost = f"dashapi-{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    try:
        yield f"{rabbit.url}{vhost}"
    finally:
        rabbit.delete_vhost(vhost)


def _app(url: str, queue: str) -> App:
    app = App(
        "dashapi", broker_url=url, default_queue=queue, settings=Settings(heartbeat_interval=0.5)
    )

    @app.task(name="dashapi.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="dashapi.broken", retry=RetryPolicy(max_attempts=1))
    async def broken(key: str) -> str:
        raise ValueError(f"broken input {key}")

    return app


class Dashboard:
    """A dashboard served in this event loop, and an HTTP client of it (as alice)."""

    def __init__(self, runner: web.AppRunner, session: aiohttp.ClientSession) -> None:
        self.runner = runner
        self.session = session
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as response:
            return response.status, _body(await response.text())

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Origin": self.url, "X-Aioqueue-Dashboard": "1"}
        async with self.session.post(self.url + path, json=body or {}, headers=headers) as r:
            return r.status, _body(await r.text())


def _body(text: str) -> Any:
    """A JSON answer, or the text of a plain one (aiohttp's own 400 and 404 pages)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _serve(app: App, *, feed: bool = True) -> web.AppRunner:
    credentials = Credentials(user="alice", password="wonder-land")
    web_app = create_app(app, state=DashboardState(), credentials=credentials, feed=feed)
    runner = web.AppRunner(web_app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@contextlib.asynccontextmanager
async def serve(app: App, *, feed: bool = True) -> AsyncIterator[Dashboard]:
    """The dashboard of ``app`` (connected), stopped before the app closes. ``feed=False``:
    without the event reader (pages that do not need it; see the module doc)."""
    runner = await _serve(app, feed=feed)
    try:
        async with aiohttp.ClientSession(headers=ALICE) as session:
            yield Dashboard(runner, session)
    finally:
        await runner.cleanup()


async def _task(dash: Dashboard, task_id: str, state: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        status, body = await dash.get(f"/api/tasks/{task_id}")
        return body if status == 200 and body["state"] == state else None

    found_task: dict[str, Any] = await wait_until(found, what=f"task {task_id} {state}")
    return found_task


async def test_a_dashboard_started_later_and_restarted_rebuilds_its_view_from_the_stream(
    vhost_url: str, queue_name: str
) -> None:
    # Given tasks that ran (one succeeded, one failed and dead-lettered) before any dashboard
    app = _app(vhost_url, queue_name)
    async with app:
        async with running_worker(app) as worker:
            ok = await app.submit("dashapi.add", 2, 3)
            bad = await app.submit("dashapi.broken", "x")
            assert await ok.result(timeout=30) == 5
            with pytest.raises(Exception, match="broken input x"):
                await bad.result(timeout=30)
        for generation in ("first", "restarted"):
            # When a dashboard starts (then, the first one stopped, a new one)
            async with serve(app) as dash:
                # Then it rebuilds each task's state, timeline and details from the stream
                done = await _task(dash, ok.id, "succeeded")
                assert (done["name"], done["queue"], done["args"], done["result"]) == (
                    "dashapi.add", queue_name, "2, 3", "5",
                )  # fmt: skip
                assert [e["type"] for e in done["timeline"]] == [
                    "task-received", "task-started", "task-succeeded",
                ]  # fmt: skip
                failed = await _task(dash, bad.id, "dead-lettered")
                assert failed["error"] == "ValueError: broken input x"
                assert "raise ValueError" in failed["traceback"]
                # with its dead-letter copy, read from the queue
                assert failed["dead_letter"]["reason"] == "failed", (generation, failed)
                # and the worker, offline since it stopped, and the overview's counts
                _, workers = await dash.get("/api/workers")
                [seen] = [w for w in workers["workers"] if w["identity"] == worker.identity]
                assert not seen["online"] and seen["concurrency"] == worker.concurrency
                _, overview = await dash.get("/api/overview")
                assert overview["states"] == {"succeeded": 1, "dead-lettered": 1}, generation
                assert sum(m["succeeded"] for m in overview["series"]) == 1


async def test_the_task_list_filters_by_name_state_queue_and_time(
    vhost_url: str, queue_name: str
) -> None:
    # Given tasks of two names, one failed, in a dashboard that follows the stream
    app = _app(vhost_url, queue_name)
    async with app, running_worker(app):
        async with serve(app) as dash:
            before = time.time() - 1
            adds = [await app.submit("dashapi.add", i, i) for i in range(3)]
            bad = await app.submit("dashapi.broken", "f")
            for handle in adds:
                await handle.result(timeout=30)
            with pytest.raises(Exception, match="broken input f"):
                await bad.result(timeout=30)
            await _task(dash, bad.id, "dead-lettered")
            for handle in adds:
                await _task(dash, handle.id, "succeeded")

            async def ids(query: str) -> set[str]:
                status, body = await dash.get(f"/api/tasks?{query}")
                assert status == 200, body
                return {t["id"] for t in body["tasks"]}

            # When the list is filtered, Then it holds exactly the matching tasks
            every = {h.id for h in adds} | {bad.id}
            assert await ids("") == every
            assert await ids("name=add") == {h.id for h in adds}  # a substring of the name
            assert await ids("state=dead-lettered") == {bad.id}
            assert await ids("name=add&state=dead-lettered") == set()
            assert await ids(f"queue={queue_name}") == every
            assert await ids("queue=elsewhere") == set()
            assert await ids(f"since={before}") == every
            assert await ids(f"until={before}") == set()
            assert len(await ids("limit=2")) == 2
            assert (await dash.get("/api/tasks?since=soon"))[0] == 400
            # and a task is found by its id, an unknown id is a 404
            assert (await dash.get(f"/api/tasks/{bad.id}"))[1]["name"] == "dashapi.broken"
            assert (await dash.get("/api/tasks/no-such-id"))[0] == 404


async def test_every_action_is_logged_with_who_did_it(
    vhost_url: str, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a dead letter, and a dashboard whose user alice signs in with basic auth
    app = _app(vhost_url, queue_name)
    async with app, running_worker(app):
        bad = await app.submit("dashapi.broken", "a")
        other = await app.submit("dashapi.broken", "b")
        for handle in (bad, other):
            with pytest.raises(Exception, match="broken input"):
                await handle.result(timeout=30)
        async with serve(app) as dash:
            caplog.set_level(logging.INFO, logger="aioqueue.dashboard")
            # When she cancels a task, replays a dead letter and purges the rest
            assert await dash.post("/api/tasks/some-task-id/cancel") == (
                200, {"cancelled": "some-task-id"},
            )  # fmt: skip
            status, replayed = await dash.post(
                f"/api/queues/{queue_name}/replay", {"ids": [bad.id]}
            )
            assert (status, replayed) == (200, {"replayed": 1})
            await _task(dash, bad.id, "dead-lettered")  # it fails again: a second dead letter
            purged = await wait_until(
                lambda: _purged(dash, queue_name), what="the dead letters purged"
            )
            # Then each action is one log line naming alice, the action and its target
            lines = [r.getMessage() for r in caplog.records if r.name == "aioqueue.dashboard"]
            assert "dashboard: alice cancelled task some-task-id" in lines
            assert f"dashboard: alice replayed 1 dead letter(s) of {queue_name}" in lines
            assert f"dashboard: alice purged {purged} dead letter(s) of {queue_name}" in lines
            # and a request without her credentials does nothing, and is refused
            async with aiohttp.ClientSession() as anonymous:
                url = f"{dash.url}/api/tasks/x/cancel"
                async with anonymous.post(url, headers={"Origin": dash.url}) as response:
                    assert response.status == 401


async def _purged(dash: Dashboard, queue: str) -> int:
    """Purge the queue's dead letters once both are there (the replayed one failed again)."""
    _, dead = await dash.get(f"/api/queues/{queue}/dead")
    if len(dead["dead_letters"]) < 2:
        return 0
    status, body = await dash.post(f"/api/queues/{queue}/purge")
    assert status == 200, body
    purged: int = body["purged"]
    return purged


async def test_every_asset_is_served_by_the_dashboard_itself(
    vhost_url: str, queue_name: str
) -> None:
    # Given the dashboard's page
    app = _app(vhost_url, queue_name)
    async with app:
        async with serve(app, feed=False) as dash:
            async with dash.session.get(dash.url + "/") as response:
                assert response.status == 200
                page = await response.text()
            # Then everything it loads is one of its own /static/ files, served here
            assets = re.findall(r'(?:src|href)="([^"#]+)"', page)
            assert assets and all(a.startswith("/static/") for a in assets), assets
            for asset in assets:
                async with dash.session.get(dash.url + asset) as response:
                    assert response.status == 200, asset
                    assert len(await response.read()) > 100, asset
            # and no script, style or page of its own names another host (no CDN: works offline)
            for own in ("index.html", "dashboard.js", "dashboard.css"):
                text = (STATIC / own).read_text()
                assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), own
            uplot = (STATIC / "uPlot.iife.min.js").read_text()
            assert not re.search(r"(import|fetch|XMLHttpRequest)\s*\(", uplot)


async def test_the_schedules_page_shows_the_last_fired_slot_and_its_leader(
    vhost_url: str, queue_name: str
) -> None:
    from aioqueue.scheduler import FakeClock
    from tests.schedules import START, slot

    # Given a periodic task whose scheduler (the leader) fired its first slot
    app = App(f"dashsched-{uuid.uuid4().hex[:8]}", broker_url=vhost_url, default_queue=queue_name)
    app.schedule("tests.tick", every=60)
    clock = FakeClock(START)
    async with app, app.scheduler(clock=clock) as scheduler:
        await wait_until(lambda: clock.sleeping_until == slot(1), what="asleep until slot 1")
        clock.set(slot(1))
        await wait_until(lambda: clock.sleeping_until == slot(2), what="slot 1 fired")
        assert scheduler.statistics().fired == 1
        # When the schedules page is asked for
        async with serve(app, feed=False) as dash:
            status, body = await dash.get("/api/schedules")
        # Then it shows the schedule, its next slot, the slot fired and who fired it
        assert status == 200, body
        [row] = body["schedules"]
        assert (row["name"], row["task"], row["last"], row["leader"]) == (
            "tests.tick", "tests.tick", slot(1).isoformat(), scheduler.identity,
        )  # fmt: skip
        assert row["next"] and row["when"] == "every 0:01:00"
        assert body["lease_held"] is True


async def test_a_dashboard_whose_app_closed_under_it_stops_at_once(
    vhost_url: str, queue_name: str
) -> None:
    # Given a dashboard following the stream, and its app's connection closed under it
    app = _app(vhost_url, queue_name)
    async with app, running_worker(app):
        runner = await _serve(app)
        async with aiohttp.ClientSession(headers=ALICE) as session:
            dash = Dashboard(runner, session)

            async def online() -> bool:
                _, body = await dash.get("/api/workers")
                return any(w["online"] for w in body["workers"])

            await wait_until(online, what="the dashboard reading the stream")
    # When the dashboard stops, Then it stops at once (its reader neither waits for the
    # closed connection to come back, nor opens it again)
    started = time.monotonic()
    await asyncio.wait_for(runner.cleanup(), 60)
    assert time.monotonic() - started < 10
    assert app._broker is None


def test_the_dashboard_command_has_its_documented_options() -> None:
    import subprocess
    import sys

    # the console script and `python -m aioqueue dashboard` are the same command
    result = subprocess.run(
        [sys.executable, "-m", "aioqueue", "dashboard", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for option in ("--host", "--port", "--broker-url"):
        assert option in result.stdout
    assert "127.0.0.1" in result.stdout and "5555" in result.stdout


async def test_the_feed_pushes_changes_to_each_subscriber_boundedly() -> None:
    # Given a feed with a subscriber that never reads
    from aioqueue.dashboard.live import CLIENT_BACKLOG, Feed
    from aioqueue.events import Event

    app = App("feed", broker_url=f"memory://feed-{uuid.uuid4().hex[:8]}")
    feed = Feed(app, DashboardState())
    async with feed.subscribe() as client:
        # When far more flushes happen than its backlog holds
        for i in range(CLIENT_BACKLOG * 3):
            feed.apply(Event("task-received", 60.0 + i, "w:1", {"id": f"t{i}", "name": "n"}))
            feed.flush()
        # Then it holds at most its backlog, and is told to resync rather than grow
        assert client.qsize() <= CLIENT_BACKLOG
        messages = [client.get_nowait() for _ in range(client.qsize())]
        assert {"resync": True} in messages
