"""The dashboard in a real browser (headless chromium): live updates, tracebacks, actions, auth.

Each test runs a worker and the dashboard in this event loop, against a vhost of its own (the
event stream is one per vhost), and saves screenshots of its pages under `ARTEFACTS`
(``.artefacts/dashboard/``, or ``$AIOQUEUE_ARTEFACTS/dashboard/``) only: a test run leaves the
tree clean. The README's docs/dashboard.png is regenerated only when asked, from the overview
of the first test::

    AIOQUEUE_UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_dashboard_browser.py \
        -k queued_to_succeeded

The worker runs one task at a time (concurrency 1) and holds two (prefetch 2): the second task
is in its hand, received but waiting for the slot, which the dashboard shows as queued.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aioqueue import App, RetryPolicy, TaskCancelledError
from aioqueue.settings import Settings
from tests.conftest import running_worker
from tests.rabbit import RabbitNode

pytest.importorskip("selenium")
from tests.dashboard_browser import ARTEFACTS, Browser, browser_available

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not browser_available(), reason="chromium/chromedriver not installed"),
]
REPO = Path(__file__).resolve().parent.parent
UPDATE_SCREENSHOT = os.environ.get("AIOQUEUE_UPDATE_SCREENSHOT") == "1"


@dataclass
class Setup:
    app: App
    url: str
    browser: Browser
    gate: asyncio.Event
    fixed: asyncio.Event
    stopped: asyncio.Event  # the forever task's coroutine was cancelled


@pytest.fixture
def vhost_url(rabbit: RabbitNode) -> Iterator[str]:
    vhost = f"dash-{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    try:
        yield f"{rabbit.url}{vhost}"
    finally:
        rabbit.delete_vhost(vhost)


def _app(
    url: str, queue: str, gate: asyncio.Event, fixed: asyncio.Event, stopped: asyncio.Event
) -> App:
    app = App(
        "dash",
        broker_url=url,
        default_queue=queue,
        settings=Settings(heartbeat_interval=0.5),
    )

    @app.task(name="dash.gated")
    async def gated(key: str) -> str:
        await gate.wait()
        return f"done {key}"

    @app.task(name="dash.broken", retry=RetryPolicy(max_attempts=1))
    async def broken(key: str) -> str:
        if not fixed.is_set():
            raise ValueError(f"broken input {key}")
        return f"fixed {key}"

    @app.task(name="dash.forever")
    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.set()
            raise

    return app


@pytest.fixture
async def setup(vhost_url: str, queue_name: str) -> AsyncIterator[Setup]:
    from aioqueue.dashboard.cli import start, url_of

    gate, fixed, stopped = asyncio.Event(), asyncio.Event(), asyncio.Event()
    app = _app(vhost_url, queue_name, gate, fixed, stopped)
    browser = await asyncio.to_thread(Browser)
    # one task runs at a time; a second one is in the worker's hand, waiting (queued)
    async with app, running_worker(app, concurrency=1, prefetch=2):
        runner = await start(app, "127.0.0.1", 0)
        try:
            yield Setup(app, url_of(runner), browser, gate, fixed, stopped)
        finally:
            gate.set()
            await browser.close()
            await runner.cleanup()


async def test_a_submitted_task_goes_from_queued_to_succeeded_without_a_reload(
    setup: Setup,
) -> None:
    b = setup.browser
    # Given the task list open, a mark on the page's window (gone if it reloads), and a task
    # holding the worker's only slot
    await b.get(setup.url + "#tasks")
    await b.wait(lambda: b.text("#live") == "live", "the live stream to connect")
    await b.script("window.__notReloaded = true")
    await b.script(_RECORD_STATES)
    hold = await setup.app.submit("dash.gated", "hold")
    await b.wait(lambda: b.text(_state_cell(hold.id)) == "running", "the first task running")
    # When a task is submitted behind it
    handle = await setup.app.submit("dash.gated", "a")
    row = _state_cell(handle.id)
    # Then it shows up queued (received by the worker, waiting for the slot)
    await b.wait(lambda: b.text(row) == "queued", "the row queued")
    await b.screenshot("task-queued")
    # and, released, it turns running then succeeded on the same page
    setup.gate.set()
    assert await handle.result(timeout=30) == "done a"
    await b.wait(lambda: b.text(row) == "succeeded", "the row to turn succeeded")
    assert await b.script("return window.__notReloaded === true")
    seen = await b.script("return window.__states[arguments[0]] || []", handle.id)
    assert seen[0] == "queued" and seen[-1] == "succeeded", seen
    assert seen.index("queued") < seen.index("succeeded")
    print(f"states seen live: {' -> '.join(seen)}")
    await b.screenshot("task-succeeded")
    # and the overview shows both in its counters and charts
    await b.get(setup.url + "#overview")
    await b.wait(lambda: b.text("#count-succeeded") == "2", "the overview's succeeded count")
    await b.wait(lambda: len(b.driver.find_elements("css selector", ".uplot")) == 3, "3 charts")
    shot = await b.screenshot("overview")
    if UPDATE_SCREENSHOT:  # opt-in: a test run leaves the tree as it found it
        shutil.copyfile(shot, REPO / "docs" / "dashboard.png")


def _state_cell(task_id: str) -> str:
    return f'tr[data-task-id="{task_id}"] td.state'


# every state each task row shows, in order, recorded in the page as the live updates land
_RECORD_STATES = """
window.__states = {};
new MutationObserver(() => {
  for (const cell of document.querySelectorAll("tr[data-task-id] td.state")) {
    const id = cell.parentElement.dataset.taskId, seen = (window.__states[id] ||= []);
    if (seen[seen.length - 1] !== cell.textContent) seen.push(cell.textContent);
  }
}).observe(document.getElementById("page"), { childList: true, subtree: true });
"""


async def test_a_failed_task_is_found_and_its_traceback_read(setup: Setup) -> None:
    b = setup.browser
    # Given a task that failed for good
    handle = await setup.app.submit("dash.broken", "x")
    with pytest.raises(Exception, match="broken input x"):
        await handle.result(timeout=30)
    # When it is looked for by name and state in the task list, and opened
    await b.get(setup.url + "#tasks/name=dash.broken")
    link = f'tr[data-task-id="{handle.id}"] a'
    await b.wait(lambda: b.text(link) == handle.id, "the failed task in the list")
    await b.click(link)
    # Then its page shows the error and the traceback
    await b.wait(lambda: "broken input x" in b.text("#traceback"), "the traceback")
    assert "ValueError: broken input x" in b.text("#task-error")
    assert "task-failed" in b.text("#timeline")
    await b.screenshot("task-traceback")


async def test_a_dead_letter_is_replayed_and_the_rest_purged_from_the_queues_page(
    setup: Setup,
) -> None:
    b = setup.browser
    # Given two tasks dead-lettered, then their bug fixed
    handle = await setup.app.submit("dash.broken", "r")
    other = await setup.app.submit("dash.broken", "p")
    for h in (handle, other):
        with pytest.raises(Exception, match="broken input"):
            await h.result(timeout=30)
    setup.fixed.set()
    queue = setup.app.default_queue
    # When one dead letter is replayed from the queue's page
    await b.get(f"{setup.url}#queues/{queue}")
    button = f'button.replay[data-id="{handle.id}"]'
    await b.wait(lambda: b.driver.find_elements("css selector", button), "the dead letter")
    await b.screenshot("dead-letters")
    await b.click(button)
    # Then it is gone from the dead letters and the task succeeds on its page
    await b.wait(lambda: "replayed 1" in b.text("#message"), "the replay's confirmation")
    await b.wait(lambda: not b.driver.find_elements("css selector", button), "the row gone")
    # And When the rest are purged (the confirm dialog accepted), Then none is left
    await b.script("window.confirm = () => true")
    await b.click("#purge")
    await b.wait(lambda: "purged 1" in b.text("#message"), "the purge's confirmation")
    await b.wait(
        lambda: not b.driver.find_elements("css selector", "tr[data-dead-id]"), "an empty list"
    )
    await b.get(f"{setup.url}#task/{handle.id}")
    await b.wait(lambda: b.text("#task-state") == "succeeded", "the replayed task to succeed")
    await b.screenshot("replayed")


async def test_queued_and_running_tasks_are_cancelled_from_their_pages(setup: Setup) -> None:
    b = setup.browser
    # Given one async task running (concurrency 1), one queued behind it in the worker's hand,
    # and one still in RabbitMQ's queue (prefetch 2: no worker took it, no events yet)
    running = await setup.app.submit("dash.forever")
    await b.get(f"{setup.url}#task/{running.id}")
    await b.wait(lambda: b.text("#task-state") == "running", "the first task running")
    queued = await setup.app.submit("dash.gated", "q")
    waiting = await setup.app.submit("dash.gated", "w")
    await b.get(f"{setup.url}#task/{queued.id}")
    await b.wait(lambda: b.text("#task-state") == "queued", "the second task queued")
    # When the queued one and the one not taken yet are cancelled from their pages
    await _cancel(b, f"{setup.url}#task/{queued.id}")
    await b.screenshot("cancel-queued")
    await _cancel(b, f"{setup.url}#task/{waiting.id}")
    # and the running one from its own
    await _cancel(b, f"{setup.url}#task/{running.id}")
    # Then its coroutine is cancelled, its caller gets TaskCancelledError, its page says so
    await asyncio.wait_for(setup.stopped.wait(), 30)
    with pytest.raises(TaskCancelledError, match="while it ran"):
        await running.result(timeout=30)
    await b.wait(lambda: b.text("#task-state") == "cancelled", "the running task cancelled")
    assert not await b.run(b.driver.find_elements, "css selector", "#cancel")  # nothing to do
    await b.screenshot("cancel-running")
    # and the other two never ran: cancelled for their callers and on their pages
    for handle in (queued, waiting):
        with pytest.raises(TaskCancelledError, match="before it ran"):
            await handle.result(timeout=30)
        await b.get(f"{setup.url}#task/{handle.id}")
        await b.wait(lambda: b.text("#task-state") == "cancelled", "a queued task cancelled")
        assert "task-started" not in await b.run(b.text, "#timeline")
    await b.screenshot("cancel-queued-done")
    assert not setup.gate.is_set()


async def _cancel(b: Browser, url: str) -> None:
    await b.get(url)
    await b.wait(lambda: b.driver.find_elements("css selector", "#cancel"), "the cancel button")
    await b.script("window.confirm = () => true")
    await b.click("#cancel")
    await b.wait(lambda: b.text("#message") == "cancel requested", "the cancel's confirmation")


def test_a_dashboard_beyond_localhost_refuses_unauthenticated_requests(
    rabbit: RabbitNode, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "aioqueue", "dashboard", "tests.apps.basic:app"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_DASHBOARD_")}
    # Given no credentials, a bind beyond localhost is refused at start
    refused = subprocess.run(
        [*command, "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "AIOQUEUE_DASHBOARD_TOKEN" in refused.stderr
    # Given a token, it serves; When a browser comes without it, Then it is refused (401)
    env["AIOQUEUE_DASHBOARD_TOKEN"] = "s3cret-token"
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [*command, "--host", "0.0.0.0", "--port", "0", "--broker-url", rabbit.url],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
    try:
        asyncio.run(_refused_in_browser(server, log))
    finally:
        server.terminate()
        server.wait(30)


async def _refused_in_browser(server: subprocess.Popen[bytes], log: Path) -> None:
    from tests.waiting import wait_until

    def served() -> str | None:
        assert server.poll() is None, log.read_text()
        text = log.read_text()
        return text.split(" on ", 1)[1].split()[0] if "aioqueue dashboard of" in text else None

    url = await wait_until(served, timeout=60, what="the dashboard to serve")
    url = url.replace("0.0.0.0", "127.0.0.1")
    browser = await asyncio.to_thread(Browser)
    try:
        await browser.get(url + "api/overview")
        await browser.wait(lambda: "authentication required" in browser.text("body"), "a 401")
        await browser.screenshot("refused")
    finally:
        await browser.close()
    print(f"screenshots in {ARTEFACTS}")
