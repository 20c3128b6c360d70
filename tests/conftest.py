"""Shared fixtures: the tests' own RabbitMQ node, unique queues, apps and in-process workers.

The node is private (own name, ports and data directory, see ``tests/rabbit.py`` and
``services/rabbitmq/broker.sh``): tests never touch a broker already running on the machine and
may restart theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import aioqueue.testing as aioqueue_testing
from aioqueue import App
from aioqueue.worker import Worker
from tests.rabbit import RabbitNode
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"))
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def queue_name() -> str:
    """A queue of this test's own."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_app(rabbit: RabbitNode, queue_name: str) -> Callable[..., App]:
    def make(**kwargs: Any) -> App:
        kwargs.setdefault("broker_url", rabbit.url)
        kwargs.setdefault("default_queue", queue_name)
        return App("tests", **kwargs)

    return make


@pytest.fixture(params=["rabbitmq", "memory"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Behavioural tests run on RabbitMQ and on the in-memory broker, so they cannot drift."""
    return str(request.param)


@pytest.fixture
def make_any_app(
    broker_kind: str, rabbit: RabbitNode, queue_name: str
) -> Iterator[Callable[..., App]]:
    url = rabbit.url if broker_kind == "rabbitmq" else f"memory://{queue_name}"

    def make(**kwargs: Any) -> App:
        kwargs.setdefault("broker_url", url)
        kwargs.setdefault("default_queue", queue_name)
        return App("tests", **kwargs)

    yield make
    aioqueue_testing.reset(url)


@asynccontextmanager
async def running_worker(app: App, **kwargs: Any) -> AsyncIterator[Worker]:
    """Run a worker on ``app`` (already connected) in this event loop until the block ends."""
    worker = Worker(app, **kwargs)
    task = asyncio.ensure_future(worker.run())
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the start-up error
    assert worker.ready.is_set(), "worker did not become ready within 30 s"
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


class WorkerProcess:
    """A real ``python -m aioqueue.worker`` subprocess with its output captured to a file.

    ``command`` replaces ``python -m <module>`` (e.g. the console script: ``aioqueue worker``);
    it runs in ``cwd``, this repository by default.
    """

    module = "aioqueue.worker"

    def __init__(
        self,
        app_spec: str,
        *args: str,
        env: dict[str, str],
        log: Path,
        command: Sequence[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.log_path = log
        self._log = log.open("wb")
        program = list(command) if command else [sys.executable, "-m", self.module]
        self.proc = subprocess.Popen(
            [*program, app_spec, *args],
            cwd=cwd,
            env={"PYTHONFAULTHANDLER": "1", **os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 60) -> None:
        await wait_until(
            lambda: "ready" in self.output() or self.proc.poll() is not None,
            timeout=timeout,
            what="worker banner",
        )
        assert self.proc.poll() is None, f"worker exited early:\n{self.output()}"

    async def wait_exit(self, timeout: float = 60) -> int:
        try:
            await wait_until(
                lambda: self.proc.poll() is not None, timeout=timeout, what="worker exit"
            )
        except AssertionError as exc:
            # Where is it stuck? faulthandler (PYTHONFAULTHANDLER, set at spawn) writes every
            # thread's stack to the log on SIGABRT; the log's end goes into the failure.
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            tail = "\n".join(self.output().splitlines()[-60:])
            raise AssertionError(f"{exc}; the process's log ends with:\n{tail}") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def spawn_worker(
    rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    procs: list[WorkerProcess] = []

    def spawn(
        *args: str,
        app_spec: str = "tests.apps.basic:app",
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> WorkerProcess:
        full_env = {
            "AIOQUEUE_BROKER_URL": rabbit.url,
            "AIOQUEUE_TEST_QUEUE": queue_name,
            "AIOQUEUE_TEST_DIR": str(tmp_path),
            **(env or {}),
        }
        proc = WorkerProcess(
            app_spec,
            *args,
            env=full_env,
            log=tmp_path / f"worker-{len(procs)}.log",
            command=command,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.kill()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say where the browser tests left their screenshots."""
    shots = Path(os.environ.get("AIOQUEUE_ARTEFACTS", ROOT / ".artefacts")) / "dashboard"
    if shots.is_dir() and any(shots.glob("*.png")):
        terminalreporter.write_line(f"dashboard screenshots: {shots}")
