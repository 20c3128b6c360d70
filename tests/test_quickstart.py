"""The README's quick start, done as a reader would: its files where it says, its commands run.

The files go into a new project folder, the worker command and the program run there as
subprocesses against the tests' broker (in a virtual host of this test's own: the quick start
uses the queues "default" and "slow"), and the program prints what the README says it prints.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, WorkerProcess
from tests.rabbit import RabbitNode
from tests.test_console import AIOQUEUE

SECTION = "## Quick start"


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    return readme[start : readme.index("\n## ", start + len(SECTION))]


def files() -> dict[str, str]:
    """Each python block of the quick start, by the file name the text gives it."""
    return dict(re.findall(r"^`([\w/]+\.py)`:\n\n```python\n(.*?)```", quick_start(), re.M | re.S))


def commands() -> list[list[str]]:
    """The shell commands of the quick start, without their comments."""
    (block,) = re.findall(r"```bash\n(.*?)```", quick_start(), re.S)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.fixture
def vhost_url(rabbit: RabbitNode) -> Iterator[str]:
    vhost = f"quickstart-{uuid.uuid4().hex[:8]}"
    rabbit.add_vhost(vhost)
    try:
        yield f"{rabbit.url}{vhost}"
    finally:
        rabbit.delete_vhost(vhost)


def test_the_quick_start_names_its_files_and_calls_main() -> None:
    written = files()
    assert set(written) == {"shop/tasks.py", "main.py"}
    assert 'if __name__ == "__main__":\n    asyncio.run(main())' in written["main.py"]
    assert [c[:2] for c in commands()] == [["aioqueue", "worker"], ["python", "main.py"]]


async def test_the_quick_start_runs_as_written(tmp_path: Path, vhost_url: str) -> None:
    # Given the quick start's files, where it says to put them
    for name, code in files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code)
    env = {"AIOQUEUE_BROKER_URL": vhost_url}
    worker_command, program_command = commands()
    # When its worker command runs in that folder
    worker = WorkerProcess(
        worker_command[2],
        *worker_command[3:],
        env=env,
        log=tmp_path / "worker.log",
        command=[str(AIOQUEUE), "worker"],
        cwd=tmp_path,
    )
    try:
        await worker.wait_ready()
        # and then its program
        program = await asyncio.create_subprocess_exec(
            sys.executable,
            *program_command[1:],
            cwd=tmp_path,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out = (await asyncio.wait_for(program.communicate(), 180))[0].decode()
        # Then the program prints the results the README shows
        assert program.returncode == 0, out + worker.output()
        assert out.splitlines() == [
            "5",
            str([2 * i for i in range(100)]),
            "FileNotFoundError [Errno 2] No such file or directory: 'a.png'",
        ], out
        worker.proc.send_signal(signal.SIGINT)  # the README's Ctrl-C
        assert await worker.wait_exit() == 0
    finally:
        worker.kill()
