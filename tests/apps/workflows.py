"""Workflow tasks for worker subprocesses, with crash points the test arms through files.

``$AIOQUEUE_TEST_DIR/crash-after-result-<i>``: the worker dies (``os._exit``, as SIGKILL would
leave things) right after member ``i`` published its result, before its ack.
``$AIOQUEUE_TEST_DIR/crash-after-fire``: the worker dies right after a join published the
chord's callback, before it deleted the gate. The callback has a queue of its own, so a worker
started with ``--queues <the members' queue>`` never runs it. Each marker is removed as it
fires (once).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aioqueue import App, task_context
from aioqueue.message.workflow import Workflow, result_properties
from aioqueue.topology import chord_queue_names
from aioqueue.worker.workflow import Workflows
from tests.apps.basic import _file_appears

QUEUE = os.environ.get("AIOQUEUE_TEST_QUEUE", "default")
app = App("tests-workflows", default_queue=QUEUE)
DIR = Path(os.environ.get("AIOQUEUE_TEST_DIR", "."))


@app.task(name="wf.member")
async def member(i: int, gated: bool) -> int:
    """Return ``i``; a gated member first records its start and waits for ``release``."""
    if gated:
        with (DIR / f"started-{i}").open("a") as f:
            f.write(f"{os.getpid()} {task_context().redelivered}\n")
        await _file_appears(DIR / "release")
    return i


@app.task(name="wf.tally", queue=f"{QUEUE}-callbacks")
async def tally(values: list[int]) -> int:
    """The chord's callback: one line per run, so the test counts its runs."""
    with (DIR / "callback-runs").open("a") as f:
        f.write(f"{os.getpid()} {sum(values)}\n")
    return sum(values)


def _armed(name: str) -> bool:
    marker = DIR / name
    if marker.exists():
        marker.unlink()
        return True
    return False


_member_done = Workflows._member_done
_fire = Workflows._fire


async def _member_done_or_die(
    self: Workflows, envelope: Any, workflow: Workflow, value: Any
) -> None:
    if (DIR / f"crash-after-result-{workflow.index}").exists():
        results = chord_queue_names(workflow.id)[0]
        body = f'{{"index":{workflow.index},"value":{value}}}'.encode()
        await self.app.broker.publish(results, body, result_properties(workflow.id, workflow.index))
        if _armed(f"crash-after-result-{workflow.index}"):
            os._exit(9)
    await _member_done(self, envelope, workflow, value)


async def _fire_or_die(
    self: Workflows, envelope: Any, workflow: Workflow, values: list[Any]
) -> None:
    await _fire(self, envelope, workflow, values)
    if _armed("crash-after-fire"):
        os._exit(9)


Workflows._member_done = _member_done_or_die  # type: ignore[method-assign]
Workflows._fire = _fire_or_die  # type: ignore[method-assign]
