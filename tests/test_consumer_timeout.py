"""RabbitMQ's consumer timeout must not kill long tasks silently.

Runs on a node of this module's own with ``consumer_timeout`` and the channel tick lowered (both
are broker-wide settings, so the shared test node is left alone).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from aioqueue import App, task_context
from tests.conftest import running_worker, wait_until
from tests.rabbit import RabbitNode


@pytest.fixture(scope="module")
def short_timeout_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-ct"), extra_conf="consumer_timeout = 1000\n")
    node.start()
    try:
        # channels read the tick interval when they open: set it before any client connects
        node.ctl("eval", "application:set_env(rabbit, channel_tick_interval, 200).")
        yield node
    finally:
        node.stop()


async def test_consumer_timeout_is_detected_and_the_task_still_completes_once(
    short_timeout_node: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a task that holds its message longer than the broker's consumer timeout
    app = App("ct", broker_url=short_timeout_node.url, default_queue=f"ct.{uuid.uuid4().hex[:8]}")
    runs: list[bool] = []
    gate = asyncio.Event()

    @app.task(name="ct.long")
    async def long() -> str:
        runs.append(task_context().redelivered)
        await gate.wait()
        return "finished"

    caplog.set_level(logging.INFO, logger="aioqueue.worker")
    async with app, running_worker(app) as worker:
        handle = await long.submit()
        # When RabbitMQ closes the channel for it
        await wait_until(
            lambda: worker.statistics().consumer_timeouts >= 1,
            timeout=60,
            what="the consumer timeout to be detected",
        )
        # Then it is logged loudly, naming the task
        assert any(
            r.levelno == logging.ERROR
            and "consumer_timeout" in r.getMessage()
            and "ct.long" in r.getMessage()
            for r in caplog.records
        )
        # and the redelivered message waits for the run in progress instead of a second run
        await wait_until(
            lambda: any("already running here" in r.getMessage() for r in caplog.records),
            timeout=60,
            what="the redelivery",
        )
        gate.set()
        assert await handle.result(timeout=60) == "finished"
        assert runs == [False]
        replies: Any = app._replies
        await wait_until(lambda: replies.pending == 0, what="no pending handle")
