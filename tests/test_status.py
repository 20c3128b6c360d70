"""``python -m aioqueue status`` and ``purge`` as subprocesses against the tests' broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest

from aioqueue import App
from aioqueue.cli.status import QueueSample, format_status, net_rate
from tests.apps.status import build
from tests.conftest import ROOT, wait_until
from tests.rabbit import RabbitNode


@dataclass
class Setup:
    rabbit: RabbitNode
    name: str  # the app's name
    queue: str  # its default queue; its second queue is <queue>.slow

    @property
    def queues(self) -> list[str]:
        """Every queue a test may create, to delete afterwards."""
        slow = f"{self.queue}.slow"
        infra = f"aioqueue.scheduler.{self.name}"
        scheduler = [f"{infra}.leader", f"{infra}.state.status.hourly"]
        return [self.queue, f"{self.queue}.dlq", slow, f"{slow}.dlq", *scheduler]

    def app(self) -> App:
        return build(self.name, self.queue, self.rabbit.url)


@pytest.fixture
async def env(rabbit: RabbitNode, queue_name: str) -> AsyncIterator[Setup]:
    setup = Setup(rabbit, f"status-{uuid.uuid4().hex[:8]}", queue_name)
    yield setup
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        for name in setup.queues:
            await channel.queue_delete(name)


async def aioqueue_cli(env: Setup, *args: str, stdin: str = "") -> tuple[int, str]:
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aioqueue", *args, "--broker-url", env.rabbit.url],
        cwd=ROOT,
        env={**os.environ, "AIOQUEUE_TEST_APP": env.name, "AIOQUEUE_TEST_QUEUE": env.queue},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def row(out: str, queue: str) -> list[str]:
    """The cells of ``queue``'s row in the status table."""
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] == queue:
            return cells[1:]
    raise AssertionError(f"no row for {queue} in:\n{out}")


async def fill(env: Setup, count: int) -> None:
    async with App("filler", broker_url=env.rabbit.url, default_queue=env.queue) as app:
        for i in range(count):
            await app.submit_with_options("status.add", args=(i, i), ignore_result=True)


async def test_status_shows_ready_messages_consumers_and_missing_queues(env: Setup) -> None:
    # Given 5 messages in the default queue and one consumer holding one of them
    await fill(env, 5)
    connection = await aio_pika.connect(env.rabbit.url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(env.queue)

        async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            """Never acks: the message stays in this consumer's hands."""

        await queue.consume(hold)
        await wait_until(
            lambda: env.rabbit.queue_stats()[env.queue]["messages_unacknowledged"] == 1,
            what="one message in the consumer's hands",
        )

        # When the status is asked for
        code, out = await aioqueue_cli(env, "status", "tests.apps.status:app", "--interval", "0.2")

        # Then each queue of the app and its dead-letter queue have a row
        assert code == 0, out
        assert row(out, env.queue) == ["4", "1", "+0.0"]  # ready, consumers, net rate
        assert row(out, f"{env.queue}.dlq")[:3] == ["-", "-", "-"]  # never declared
        assert "(not declared)" in out
        assert row(out, f"{env.queue}.slow")[:3] == ["-", "-", "-"]
        assert "net msg/s: change of 'ready' over 0.2s" in out

        # And as a health check it fails, naming the work queue that nobody consumes
        code, out = await aioqueue_cli(
            env, "status", "tests.apps.status:app", "--interval", "0", "--min-consumers", "1"
        )
        assert code == 3, out
        assert f"UNHEALTHY: {env.queue}.slow has 0 consumer(s)" in out
        assert f"UNHEALTHY: {env.queue} has" not in out


async def test_status_tells_whether_a_scheduler_leads(env: Setup) -> None:
    args = ("status", "tests.apps.status:app", "--interval", "0", "--require-scheduler")
    # Given no scheduler ever ran for the app: unhealthy
    code, out = await aioqueue_cli(env, *args)
    assert code == 3 and "scheduler: none has run" in out, out

    # When one runs and leads: healthy
    app = env.app()
    async with app.scheduler() as scheduler:
        await wait_until(lambda: scheduler.is_leader, what="the scheduler to lead")
        code, out = await aioqueue_cli(env, *args)
        assert code == 0 and "scheduler: a leader is firing the schedules" in out, out

    # And once it stopped, no leader again
    code, out = await aioqueue_cli(env, *args)
    assert code == 3 and "scheduler: no leader at the moment" in out, out


async def test_purge_asks_for_the_queue_name(env: Setup) -> None:
    await fill(env, 3)
    purge = ("purge", "tests.apps.status:app", "--queue", env.queue)

    # A wrong answer deletes nothing
    code, out = await aioqueue_cli(env, *purge, stdin="yes\n")
    assert code == 1 and "Type the queue name to confirm" in out and "cancelled" in out
    assert env.rabbit.queue_stats()[env.queue]["messages"] == 3

    # Typing the queue's name purges it
    code, out = await aioqueue_cli(env, *purge, stdin=f"{env.queue}\n")
    assert code == 0 and f"purged 3 message(s) from {env.queue}" in out, out
    assert env.rabbit.queue_stats()[env.queue]["messages"] == 0

    # --yes does not ask; a queue that does not exist is an error
    await fill(env, 2)
    code, out = await aioqueue_cli(env, *purge, "--yes")
    assert code == 0 and "purged 2" in out and "confirm" not in out, out
    missing = f"{env.queue}.nothing"
    code, out = await aioqueue_cli(env, "purge", "tests.apps.status:app", "--queue", missing)
    assert code == 1 and f"{missing} does not exist" in out


def sample(name: str, ready: int | None, consumers: int | None = 0) -> QueueSample:
    return QueueSample(name, ready, consumers)


@pytest.mark.parametrize(
    ("before", "after", "interval", "rate"),
    [
        (10, 30, 2.0, 10.0),  # filling up: 10 msg/s more published than consumed
        (30, 10, 1.0, -20.0),  # draining
        (5, 5, 1.0, 0.0),  # steady (idle, or consumed as fast as published)
        (5, None, 1.0, None),  # deleted between the samples
        (None, 5, 1.0, None),  # created between the samples
        (5, 7, 0.0, None),  # no interval: no rate
    ],
)
def test_net_rate(
    before: int | None, after: int | None, interval: float, rate: float | None
) -> None:
    assert net_rate(sample("q", before), sample("q", after), interval) == rate


def test_status_table_layout() -> None:
    first = [sample("orders", 10, 2), sample("orders.dlq", 1), sample("missing", None)]
    second = {"orders": sample("orders", 4, 3), "orders.dlq": sample("orders.dlq", 1)}
    table = format_status(first, second, 2.0).splitlines()
    assert table[0].split() == ["queue", "ready", "consumers", "net", "msg/s"]
    assert table[1].split() == ["orders", "4", "3", "-3.0"]  # the latest sample, and the rate
    assert table[2].split() == ["orders.dlq", "1", "0", "+0.0"]
    assert table[3].split() == ["missing", "-", "-", "-", "(not", "declared)"]
    assert "over 2s" in table[5]
    unsampled = format_status(first, None, 0)
    assert unsampled.splitlines()[1].split() == ["orders", "10", "2", "-"]
    assert "not sampled" in unsampled
