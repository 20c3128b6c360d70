"""``python -m aioqueue dlq ...`` against the tests' broker and a real worker process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aioqueue import App, TaskError
from tests.conftest import ROOT, wait_until
from tests.rabbit import RabbitNode


async def admin(rabbit: RabbitNode, queue: str, *args: str, stdin: str = "") -> tuple[int, str]:
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "aioqueue",
            "dlq",
            args[0],
            "tests.apps.basic:app",
            "--queue",
            queue,
            "--broker-url",
            rabbit.url,
            *args[1:],
        ],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


async def test_dlq_list_show_replay_purge(
    spawn_worker: Any, rabbit: RabbitNode, queue_name: str, tmp_path: Path
) -> None:
    worker = spawn_worker()
    await worker.wait_ready()
    dlq = f"{queue_name}.dlq"
    async with App("client", broker_url=rabbit.url, default_queue=queue_name) as app:
        # Given two failed tasks in the dead-letter queue
        first = await app.submit("tests.needs_fix", "a")
        second = await app.submit("tests.needs_fix", "b")
        for handle in (first, second):
            with pytest.raises(TaskError):
                await handle.result(timeout=60)
        await wait_until(lambda: rabbit.queue_stats()[dlq]["messages"] == 2, what="2 dead")

        # list shows them with their reason and error
        code, out = await admin(rabbit, queue_name, "list")
        assert code == 0, out
        assert first.id in out and second.id in out
        assert "failed" in out and "RuntimeError: a is broken" in out

        # show gives one in full, with the traceback
        code, out = await admin(rabbit, queue_name, "show", first.id)
        assert code == 0, out
        assert "traceback:" in out and 'raise RuntimeError(f"{key} is broken")' in out
        assert second.id not in out

        # replay re-runs it (now fixed) and removes it from the DLQ; the other one stays
        (tmp_path / "fixed-a").touch()
        code, out = await admin(rabbit, queue_name, "replay", first.id)
        assert code == 0 and "replayed 1" in out, out
        await wait_until(lambda: (tmp_path / "done-a").exists(), what="the replayed run")
        await wait_until(lambda: rabbit.queue_stats()[dlq]["messages"] == 1, what="1 dead")

        # purge asks first; "no" deletes nothing
        code, out = await admin(rabbit, queue_name, "purge", stdin="no\n")
        assert code == 1 and "cancelled" in out
        assert rabbit.queue_stats()[dlq]["messages"] == 1
        code, out = await admin(rabbit, queue_name, "purge", stdin="yes\n")
        assert code == 0 and "purged 1" in out, out
        assert rabbit.queue_stats()[dlq]["messages"] == 0

        code, out = await admin(rabbit, queue_name, "show", "no-such-id")
        assert code == 1 and "not found" in out
