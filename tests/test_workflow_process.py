"""Workflows through worker processes that die: a chord's callback runs exactly once."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from aioqueue import App, chord
from aioqueue.events import EventReader
from tests.conftest import ROOT, WorkerProcess, wait_until
from tests.rabbit import RabbitNode

APP = "tests.apps.workflows:app"


def client(rabbit: RabbitNode, queue_name: str) -> tuple[App, Any, Any]:
    """A caller's app with the worker's task names (its own stubs, for the signatures)."""
    app = App("tests-client", broker_url=rabbit.url, default_queue=queue_name)

    @app.task(name="wf.member")
    async def member(i: int, gated: bool) -> int: ...

    @app.task(name="wf.tally", queue=f"{queue_name}-callbacks")
    async def tally(values: list[int]) -> int: ...

    return app, member, tally


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def workflow_queues(rabbit: RabbitNode, workflow_id: str) -> list[str]:
    """The queues of one workflow still there (other tests' workflows may have left theirs)."""
    return [
        name for name in rabbit.queue_stats() if name.startswith(f"aioqueue.chord.{workflow_id}")
    ]


async def test_chord_callback_runs_once_through_worker_kills(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    # Given crash points armed: after member 1 published its result (before its ack), and
    # after the join published the callback (before it deleted the gate)
    (tmp_path / "crash-after-result-1").touch()
    (tmp_path / "crash-after-fire").touch()
    app, member, tally = client(rabbit, queue_name)
    async with app:
        members = [member.s(i, i >= 3) for i in range(6)]
        handle = await chord(members, tally.s()).submit()
        # When the first worker dies right after member 1's result
        first: WorkerProcess = spawn_worker(app_spec=APP)
        assert await first.wait_exit(timeout=180) == 9
        # and a second one is SIGKILLed while the gated members run
        second: WorkerProcess = spawn_worker(app_spec=APP)
        await wait_until(
            lambda: all(lines(tmp_path / f"started-{i}") for i in (3, 4, 5)),
            timeout=120,
            what="the gated members to start",
        )
        second.kill()
        # and a third dies right after its join published the callback
        (tmp_path / "release").touch()
        # (on the members' queue only: it must not be running the callback when it dies)
        third: WorkerProcess = spawn_worker("--queues", queue_name, app_spec=APP)
        assert await third.wait_exit(timeout=180) == 9
        # Then a fourth finishes the chord: the caller gets the callback's result
        fourth: WorkerProcess = spawn_worker(app_spec=APP)
        assert await handle.result(timeout=180) == sum(range(6))
        # (the second copy is dropped: the claim is gone, or the first copy runs here)
        await wait_until(
            lambda: any(
                seen in fourth.output() for seen in ("ran already: dropped", "already running")
            ),
            timeout=120,
            what="the second copy of the callback dropped",
        )
    # and the callback ran exactly once, although its message was published twice
    await wait_until(
        lambda: (
            rabbit.queue_stats()[queue_name]["messages"] == 0
            and not workflow_queues(rabbit, handle.id)
        ),
        timeout=120,
        what="the work queue empty and the workflow's queues deleted",
    )
    assert len(lines(tmp_path / "callback-runs")) == 1
    assert lines(tmp_path / "callback-runs")[0].endswith(" 15")
    # (the members really ran again after the kills)
    assert any(
        line.endswith("True") for i in (3, 4, 5) for line in lines(tmp_path / f"started-{i}")
    )


SUBMIT_AND_EXIT = """
import asyncio, sys
from aioqueue import App, chord
from aioqueue.events import EventReader
app = App("tests-leaver", broker_url=sys.argv[1], default_queue=sys.argv[2])
@app.task(name="wf.member")
async def member(i: int, gated: bool) -> int: ...
@app.task(name="wf.tally", queue=sys.argv[2] + "-callbacks")
async def tally(values: list[int]) -> int: ...
async def main():
    async with app:
        handle = await chord([member.s(i, False) for i in range(8)], tally.s()).submit()
        print(handle.id)
asyncio.run(main())
"""


async def test_the_chord_finishes_after_its_caller_exited(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    # Given a caller that submits a chord and exits at once
    caller = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUBMIT_AND_EXIT,
        rabbit.url,
        queue_name,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(caller.communicate(), 120)
    assert caller.returncode == 0
    workflow_id = out.decode().strip()
    assert workflow_id
    # When a worker starts afterwards
    spawn_worker(app_spec=APP)
    # Then the callback runs (once), and the workflow's queues are gone
    await wait_until(
        lambda: lines(tmp_path / "callback-runs"), timeout=120, what="the callback to run"
    )
    await wait_until(
        lambda: not workflow_queues(rabbit, workflow_id),
        timeout=120,
        what="the workflow's queues deleted",
    )
    assert [line.split()[1] for line in lines(tmp_path / "callback-runs")] == [str(sum(range(8)))]
    # and a second caller sees in the task events that the callback succeeded
    app, _member, _tally = client(rabbit, queue_name)
    async with app, EventReader(app, since="first") as reader:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "no task-succeeded event for the callback"
            event = await reader.get(timeout=max(0.1, deadline - time.monotonic()))
            if event is not None and event.get("id") == f"{workflow_id}.cb":
                if event.type == "task-succeeded":
                    break
