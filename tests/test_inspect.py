"""``aioqueue inspect``: workers and their running tasks from heartbeats on the event stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aioqueue import App
from aioqueue.cli.inspect import worker_states
from aioqueue.events import Event
from tests.conftest import WorkerProcess
from tests.rabbit import RabbitNode
from tests.waiting import wait_until

HEARTBEAT = "0.5"
INSPECT = [sys.executable, "-m", "aioqueue", "inspect", "tests.apps.basic:app"]


@pytest.fixture
def vhost_url(rabbit: RabbitNode) -> Iterator[str]:
    vhost = f"inspect-{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    try:
        yield f"{rabbit.url}{vhost}"
    finally:
        rabbit.delete_vhost(vhost)


def inspect(url: str, queue: str) -> dict[str, Any]:
    result = subprocess.run(
        [*INSPECT, "--broker-url", url, "--json", "--window", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **os.environ,
            "AIOQUEUE_TEST_QUEUE": queue,
            "AIOQUEUE_TEST_HEARTBEAT": HEARTBEAT,
        },
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


async def test_inspect_shows_a_running_task_then_the_worker_offline(
    spawn_worker: Any, vhost_url: str, queue_name: str, tmp_path: Path
) -> None:
    # Given a worker process (heartbeat every 0.5 s) running a task that waits for the test
    worker: WorkerProcess = spawn_worker(
        "--broker-url", vhost_url, env={"AIOQUEUE_TEST_HEARTBEAT": HEARTBEAT}
    )
    await worker.wait_ready()
    app = App("tests", broker_url=vhost_url, default_queue=queue_name)
    async with app:
        handle = await app.submit("tests.gated", "i")
        await wait_until((tmp_path / "started-i").exists, what="task started")

        # When aioqueue inspect asks (once a heartbeat names the task)
        def running() -> list[dict[str, Any]]:
            workers = inspect(vhost_url, queue_name)["workers"]
            online = [w for w in workers if w["online"]]
            return online[0]["running"] if online and online[0]["running"] else []

        tasks = await wait_until(running, timeout=30, what="a heartbeat naming the task")
        # Then it lists the worker online with that task
        assert [(t["id"], t["name"], t["attempt"]) for t in tasks] == [
            (handle.id, "tests.gated", 1)
        ]
        assert isinstance(tasks[0]["started"], float)
        (tmp_path / "release-i").touch()
        await handle.result(timeout=30)
    # When the worker stops on SIGTERM
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0
    # Then inspect lists it offline, as it said
    workers = inspect(vhost_url, queue_name)["workers"]
    assert len(workers) == 1
    assert workers[0]["online"] is False
    assert workers[0]["why"] == "worker-offline"


def beat(kind: str, at: float, worker: str = "h:1", **fields: Any) -> Event:
    return Event(kind, at, worker, {"interval": 5.0, **fields})


@pytest.mark.parametrize(
    ("events", "online", "why"),
    [
        ([beat("worker-online", 100)], True, ""),
        ([beat("worker-online", 100), beat("worker-heartbeat", 105)], True, ""),
        ([beat("worker-heartbeat", 100), beat("worker-offline", 101)], False, "worker-offline"),
        ([beat("worker-heartbeat", 80)], False, "no heartbeat for 30.0s"),
        # out of order: the latest by time wins
        ([beat("worker-offline", 101), beat("worker-heartbeat", 100)], False, "worker-offline"),
    ],
)
def test_worker_states(events: list[Event], online: bool, why: str) -> None:
    (state,) = worker_states(events, now=110.0, interval=5.0)
    assert (state.online, state.why) == (online, why)


def test_worker_states_ignore_task_events_and_list_running_tasks() -> None:
    task = {"id": "t1", "name": "n", "attempt": 2, "started": 99.0, "extra": "x"}
    events = [
        Event("task-started", 100, "h:1", {"id": "t1"}),
        beat("worker-heartbeat", 100, running=[task, "junk"], queues=["q", 3]),
        beat("worker-heartbeat", 109, worker="h:2"),
    ]
    states = worker_states(events, now=110.0, interval=5.0)
    assert [s.worker for s in states] == ["h:1", "h:2"]
    assert states[0].running == [{"id": "t1", "name": "n", "started": 99.0, "attempt": 2}]
    assert states[0].queues == ["q"]
