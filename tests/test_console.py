"""The ``aioqueue`` console script: one command whose subcommands are the existing programs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, WorkerProcess
from tests.rabbit import RabbitNode
from tests.test_worker_process import client

# the script pip installed beside this interpreter (the project's .venv/bin/aioqueue)
AIOQUEUE = Path(sys.executable).parent / "aioqueue"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_console_script_is_installed() -> None:
    assert AIOQUEUE.exists(), f"{AIOQUEUE} is missing: run `make install` (pip install -e .)"


@pytest.mark.parametrize(
    ("command", "usage", "fragment"),
    [
        ([str(AIOQUEUE)], "usage: aioqueue ", "worker"),
        ([str(AIOQUEUE), "worker"], "usage: aioqueue worker ", "--prefetch"),
        ([str(AIOQUEUE), "scheduler"], "usage: aioqueue scheduler ", "--connect-timeout"),
        ([str(AIOQUEUE), "status"], "usage: aioqueue status ", "--min-consumers"),
        ([str(AIOQUEUE), "dlq"], "usage: aioqueue dlq ", "replay"),
        ([str(AIOQUEUE), "inspect"], "usage: aioqueue inspect ", "--json"),
        ([str(AIOQUEUE), "dashboard"], "usage: aioqueue dashboard ", "--port"),
        (
            [sys.executable, "-m", "aioqueue", "worker"],
            "usage: python -m aioqueue worker ",
            "--queues",
        ),
        (
            [sys.executable, "-m", "aioqueue.worker"],
            "usage: python -m aioqueue.worker ",
            "--queues",
        ),
        (
            [sys.executable, "-m", "aioqueue.scheduler"],
            "usage: python -m aioqueue.scheduler ",
            "app",
        ),
    ],
)
def test_each_subcommand_shows_its_own_help(command: list[str], usage: str, fragment: str) -> None:
    # When a user asks a command for help
    result = run(*command, "--help")
    # Then it answers with its own usage and options, and exits 0
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage), result.stdout
    assert fragment in result.stdout


def test_the_top_level_help_lists_every_subcommand() -> None:
    out = run(str(AIOQUEUE), "--help").stdout
    for name in ("worker", "scheduler", "status", "purge", "dlq", "inspect", "dashboard"):
        assert f"    {name}" in out, out


def test_an_unknown_subcommand_is_a_usage_error() -> None:
    result = run(str(AIOQUEUE), "wrker", "tests.apps.basic:app")
    assert result.returncode == 2
    assert "invalid choice: 'wrker'" in result.stderr


async def test_aioqueue_worker_serves_a_task_and_status_sees_it(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str
) -> None:
    # Given `aioqueue worker tests.apps.basic:app`, the installed console script
    worker: WorkerProcess = spawn_worker(command=[str(AIOQUEUE), "worker"])
    await worker.wait_ready()
    assert f"queues:       {queue_name}" in worker.output()
    # When a task is submitted
    async with client(rabbit, queue_name) as app:
        handle = await app.submit("tests.add", 2, 3)
        # Then the worker runs it
        assert await handle.result(timeout=60) == 5
    # and `aioqueue status` sees the worker consuming the queue
    env = {"AIOQUEUE_BROKER_URL": rabbit.url, "AIOQUEUE_TEST_QUEUE": queue_name}
    status = run(
        str(AIOQUEUE), "status", "tests.apps.basic:app", "--interval", "0", "--min-consumers", "1",
        env=env,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert queue_name in status.stdout
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0
