"""``aioqueue worker --processes N``: N worker processes under one supervisor (issue 20)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from aioqueue import App
from aioqueue.worker.cli import parser
from aioqueue.worker.supervisor import child_argv
from tests.conftest import WorkerProcess, wait_until
from tests.rabbit import RabbitNode


def client(rabbit: RabbitNode, queue_name: str) -> App:
    return App("tests-client", broker_url=rabbit.url, default_queue=queue_name)


def started_pid(tmp_path: Path, key: str) -> int | None:
    path = tmp_path / f"started-{key}"
    lines = path.read_text().splitlines() if path.exists() else []
    return int(lines[-1].split()[0]) if lines else None


async def two_ready(worker: WorkerProcess) -> None:
    await wait_until(
        lambda: worker.output().count(" ready\n") >= 2 or worker.proc.poll() is not None,
        timeout=60,
        what="both worker processes' banners",
    )
    assert worker.proc.poll() is None, worker.output()
    assert "2 worker processes" in worker.output()


async def test_two_processes_run_tasks_side_by_side_and_drain_on_sigterm(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    # Given a supervisor of two processes, each running one task at a time
    worker: WorkerProcess = spawn_worker("--processes", "2", "--concurrency", "1")
    await two_ready(worker)
    async with client(rabbit, queue_name) as app:
        # When two tasks that wait for the test are submitted
        a = await app.submit("tests.gated", "a")
        b = await app.submit("tests.gated", "b")
        pids = await wait_until(
            lambda: (
                (started_pid(tmp_path, "a"), started_pid(tmp_path, "b"))
                if started_pid(tmp_path, "a") and started_pid(tmp_path, "b")
                else None
            ),
            what="both tasks started",
        )
        # Then they run at once, in two processes other than the supervisor
        assert pids[0] != pids[1]
        assert worker.proc.pid not in pids
        # When SIGTERM reaches the supervisor mid-task
        worker.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "draining" in worker.output(), what="the supervisor draining")
        assert worker.proc.poll() is None
        # Then both tasks finish and deliver their results, and everything exits 0
        (tmp_path / "release-a").touch()
        (tmp_path / "release-b").touch()
        assert (await a.result(timeout=60))["key"] == "a"
        assert (await b.result(timeout=60))["key"] == "b"
        assert await worker.wait_exit() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_killed_process_is_restarted_and_its_task_runs_elsewhere(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    worker: WorkerProcess = spawn_worker("--processes", "2", "--concurrency", "1")
    await two_ready(worker)
    async with client(rabbit, queue_name) as app:
        handle = await app.submit("tests.gated", "k")
        victim = await wait_until(lambda: started_pid(tmp_path, "k"), what="the task started")
        # When the process running it is killed, as the OOM killer would
        os.kill(victim, signal.SIGKILL)
        # Then the supervisor says so and starts a new process after its back-off
        await wait_until(
            lambda: (
                "killed by SIGKILL" in worker.output() and "restarting in 1 s" in worker.output()
            ),
            what="the exit reported",
        )
        await wait_until(
            lambda: worker.output().count(" ready\n") >= 3, timeout=60, what="the new process"
        )
        # and the task, redelivered, runs in another process and its result arrives
        rerun = await wait_until(
            lambda: started_pid(tmp_path, "k") != victim and started_pid(tmp_path, "k"),
            what="the task started again",
        )
        assert rerun != victim
        (tmp_path / "release-k").touch()
        result = await handle.result(timeout=60)
        assert result["redelivered"] is True and result["pid"] != victim
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0


def alive(pid: int) -> bool:
    """Running (a zombie not yet reaped by whoever adopted it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_killed_supervisor_leaves_no_worker_behind(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    worker: WorkerProcess = spawn_worker("--processes", "2", "--concurrency", "1")
    await two_ready(worker)
    async with client(rabbit, queue_name) as app:
        handles = [await app.submit("tests.gated", key) for key in ("x", "y")]
        pids = await wait_until(
            lambda: (
                [started_pid(tmp_path, k) for k in ("x", "y")]
                if all(started_pid(tmp_path, k) for k in ("x", "y"))
                else None
            ),
            what="both tasks started",
        )
        for key in ("x", "y"):
            (tmp_path / f"release-{key}").touch()
        for handle in handles:
            await handle.result(timeout=60)
    # When the supervisor is killed outright
    worker.proc.kill()
    # Then the kernel's SIGTERM drains and ends both processes
    await wait_until(lambda: not any(alive(pid) for pid in pids), timeout=60, what="no child")


async def test_a_bad_app_is_reported_once_and_exits_2(spawn_worker: Any) -> None:
    worker: WorkerProcess = spawn_worker("--processes", "2", app_spec="tests.apps.nowhere:app")
    assert await worker.wait_exit() == 2
    assert "supervisor" not in worker.output()


def test_processes_option() -> None:
    p = parser()
    assert p.parse_args(["m:app"]).processes == 1
    assert p.parse_args(["m:app", "--processes", "auto"]).processes == (os.cpu_count() or 1)
    for bad in ("0", "-1", "many"):
        with pytest.raises(SystemExit):
            p.parse_args(["m:app", "--processes", bad])
    # a child's command line is the supervisor's, made single-process, last option winning
    child = p.parse_args(child_argv(["m:app", "--processes=3", "--metrics-port", "9100"], 2))
    assert (child.processes, child.process_index, child.metrics_port) == (1, 2, 9100)
