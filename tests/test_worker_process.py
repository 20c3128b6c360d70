"""The worker as a real process: banner, signals, crashes, an unreachable broker."""

from __future__ import annotations

import gc
import signal
from pathlib import Path
from typing import Any

import pytest

from aioqueue import App
from aioqueue.worker.cli import GC_ENV, GC_THRESHOLD
from tests.conftest import WorkerProcess, wait_until
from tests.rabbit import RabbitNode


def client(rabbit: RabbitNode, queue_name: str) -> App:
    """A producer-only app that knows the subprocess's tasks by name."""
    return App("tests-client", broker_url=rabbit.url, default_queue=queue_name)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_banner_masks_the_password_and_lists_the_setup(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str
) -> None:
    url = rabbit.url
    assert ":guest@" in url  # the URL carries a password
    worker: WorkerProcess = spawn_worker("--broker-url", url, "--concurrency", "7")
    await worker.wait_ready()
    out = worker.output()
    assert "guest:****@" in out
    assert ":guest@" not in out
    for fragment in (queue_name, "tests.add", "tests.gated", "concurrency:  7", "prefetch:     7"):
        assert fragment in out
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0


async def test_sigterm_finishes_running_tasks_then_exits_zero(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    worker: WorkerProcess = spawn_worker()
    await worker.wait_ready()
    async with client(rabbit, queue_name) as app:
        handle = await app.submit("tests.gated", "g")
        await wait_until(lambda: lines(tmp_path / "started-g"), what="task started")
        # When SIGTERM arrives mid-task
        worker.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "stopping" in worker.output(), what="worker stopping")
        assert worker.proc.poll() is None
        # Then the task finishes and its result is delivered, and the worker exits 0
        (tmp_path / "release-g").touch()
        result = await handle.result(timeout=60)
        assert result["key"] == "g" and result["redelivered"] is False
        assert await worker.wait_exit() == 0
    assert rabbit.queue_stats()[queue_name]["messages"] == 0


async def test_sigterm_returns_unfinished_tasks_to_the_queue(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    worker: WorkerProcess = spawn_worker("--shutdown-timeout", "0.5")
    await worker.wait_ready()
    async with client(rabbit, queue_name) as app:
        handle = await app.submit("tests.gated", "r")
        await wait_until(lambda: lines(tmp_path / "started-r"), what="task started")
        # When the shutdown timeout passes with the task still running
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0
        assert "returning 1 unfinished task" in worker.output()
        await wait_until(
            lambda: rabbit.queue_stats()[queue_name]["messages_ready"] == 1,
            what="the task back in its queue",
        )
        # Then another worker runs it and the caller gets the result
        (tmp_path / "release-r").touch()
        second: WorkerProcess = spawn_worker()
        result = await handle.result(timeout=60)
        assert result["redelivered"] is True
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit() == 0


async def test_kill_9_mid_task_redelivers_and_the_caller_gets_one_result(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    first: WorkerProcess = spawn_worker()
    await first.wait_ready()
    async with client(rabbit, queue_name) as app:
        handle = await app.submit("tests.gated", "k")
        await wait_until(lambda: lines(tmp_path / "started-k"), what="task started")
        # When the worker is killed mid-task
        first.kill()
        second: WorkerProcess = spawn_worker()
        await wait_until(lambda: len(lines(tmp_path / "started-k")) == 2, what="task redelivered")
        (tmp_path / "release-k").touch()
        # Then the caller gets exactly one result, from the redelivered run
        result = await handle.result(timeout=60)
        assert result["pid"] == second.proc.pid and result["redelivered"] is True
        assert lines(tmp_path / "started-k")[1].endswith("True")
        replies = app._replies
        assert replies is not None and replies.pending == 0 and replies.dropped == 0
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit() == 0


async def test_unreachable_broker_exits_nonzero_with_a_clear_message(
    spawn_worker: Any,
) -> None:
    worker: WorkerProcess = spawn_worker(
        "--broker-url", "amqp://guest:s3cret@127.0.0.1:1/", "--connect-timeout", "1"
    )
    code = await worker.wait_exit(timeout=60)
    out = worker.output()
    assert code == 1
    assert "cannot reach the broker at amqp://guest:****@127.0.0.1:1/" in out
    assert "s3cret" not in out


@pytest.mark.parametrize(
    "spec",
    [
        "tests.apps.basic",
        "tests.apps.nosuch:app",
        "tests.apps.basic:nothing",
        "tests.apps.basic:DIR",
    ],
)
async def test_bad_app_spec_exits_2(spawn_worker: Any, spec: str) -> None:
    worker: WorkerProcess = spawn_worker(app_spec=spec)
    assert await worker.wait_exit() == 2
    assert "error:" in worker.output()


async def test_second_signal_returns_tasks_at_once(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    worker: WorkerProcess = spawn_worker("--shutdown-timeout", "600")
    await worker.wait_ready()
    async with client(rabbit, queue_name) as app:
        await app.submit("tests.gated", "s")
        await wait_until(lambda: lines(tmp_path / "started-s"), what="task started")
        worker.proc.send_signal(signal.SIGINT)
        await wait_until(lambda: "stopping" in worker.output(), what="worker stopping")
        worker.proc.send_signal(signal.SIGINT)
        assert await worker.wait_exit(timeout=60) == 0
        await wait_until(
            lambda: rabbit.queue_stats()[queue_name]["messages_ready"] == 1,
            what="the task back in its queue",
        )


async def test_banner_shows_the_prefetch_split_and_a_raised_prefetch(
    spawn_worker: Any, queue_name: str
) -> None:
    # Given --prefetch 1 on three queues
    queues = ",".join(f"{queue_name}.{i}" for i in range(3))
    worker: WorkerProcess = spawn_worker("--queues", queues, "--prefetch", "1")
    await worker.wait_ready()
    out = worker.output()
    # Then the worker warns, and its banner says what it holds in total and per queue
    assert "prefetch 1 is below the number of queues (3)" in out
    assert (
        "prefetch:     3 in total (1 + 1 + 1 over the queues above), raised from 1: "
        "each of the 3 queues needs at least 1"
    ) in out
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0


@pytest.mark.parametrize("setting", [None, "default"])
async def test_the_worker_tunes_its_garbage_collector_unless_told_not_to(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, setting: str | None
) -> None:
    # Given a worker process, with AIOQUEUE_WORKER_GC unset or "default"
    env = {} if setting is None else {GC_ENV: setting}
    worker: WorkerProcess = spawn_worker("--broker-url", rabbit.url, env=env)
    await worker.wait_ready()
    async with client(rabbit, queue_name) as app:
        # When a task reports the process's collector settings
        handle = await app.submit_with_options("tests.gc_state")
        gen0, gen1, gen2, frozen = await handle.result(timeout=30)
    # Then by default the start-up objects are frozen and the young generation is collected
    # less often; with "default", Python's own settings stand
    if setting is None:
        assert (gen0, gen1, gen2) == GC_THRESHOLD
        assert frozen > 10_000
    else:
        assert (gen0, gen1, gen2) == gc.get_threshold() == (700, 10, 10)
        assert frozen == 0
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0
