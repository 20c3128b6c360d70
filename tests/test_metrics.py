"""Prometheus metrics: counters per task, the queue gauges, and ``--metrics-port``."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aioqueue import App, RetryPolicy, TaskError, TaskTimeoutError, task_context
from aioqueue.metrics import PrometheusObserver
from aioqueue.testing import reset
from aioqueue.worker.events import TaskLog
from tests.conftest import WorkerProcess, running_worker, wait_until
from tests.rabbit import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(observer: PrometheusObserver) -> Samples:
    """Every sample of the observer's registry, parsed back from the exposition format."""
    text = generate_latest(observer.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def by_task(samples: Samples, name: str) -> dict[str, float]:
    """``{task label: value}`` of one metric without other labels."""
    return {dict(labels)["task"]: v for (n, labels), v in samples.items() if n == name and v != 0.0}


def dead_letters(samples: Samples) -> dict[tuple[str, str, str], float]:
    """``{(task, queue, reason): count}``."""
    return {
        (dict(labels)["task"], dict(labels)["queue"], dict(labels)["reason"]): v
        for (name, labels), v in samples.items()
        if name == "aioqueue_tasks_dead_lettered_total"
    }


async def test_worker_counts_every_outcome_per_task(make_app: Any, queue_name: str) -> None:
    # Given a worker with the default log observer and a Prometheus observer
    app: App = make_app()

    @app.task(name="m.ok")
    async def ok(x: int) -> int:
        return x

    @app.task(name="m.boom")
    async def boom() -> None:
        raise ValueError("boom")

    @app.task(name="m.flaky", retry=RetryPolicy(max_attempts=2, backoff=0.05))
    async def flaky() -> int:
        if task_context().attempt == 1:
            raise ConnectionError("first attempt fails")
        return 2

    @app.task(name="m.slow", timeout=0.2)
    async def slow() -> None:
        await asyncio.Event().wait()

    observer = PrometheusObserver(tasks=app.tasks)
    app.on_submit.append(observer.submitted)

    async with app, running_worker(app, observers=[TaskLog(), observer]) as worker:
        # When tasks succeed, fail, succeed after a retry, and time out
        assert [await (await ok.submit(i)).result(timeout=30) for i in range(3)] == [0, 1, 2]
        with pytest.raises(TaskError):
            await (await boom.submit()).result(timeout=30)
        assert await (await flaky.submit()).result(timeout=30) == 2
        with pytest.raises(TaskTimeoutError):
            await (await slow.submit()).result(timeout=30)
        # (a caller may get its reply a moment before the worker reports the attempt finished)
        await wait_until(
            lambda: (
                sum(by_task(scrape(observer), "aioqueue_task_duration_seconds_count").values()) == 7
            ),
            what="7 finished attempts",
        )

        # Then each counter holds exactly what happened, per task
        samples = scrape(observer)
        assert by_task(samples, "aioqueue_tasks_submitted_total") == {
            "m.ok": 3,
            "m.boom": 1,
            "m.flaky": 1,  # a retry is not a submit
            "m.slow": 1,
        }
        assert by_task(samples, "aioqueue_tasks_started_total") == {
            "m.ok": 3,
            "m.boom": 1,
            "m.flaky": 2,
            "m.slow": 1,
        }
        assert by_task(samples, "aioqueue_tasks_succeeded_total") == {"m.ok": 3, "m.flaky": 1}
        assert by_task(samples, "aioqueue_tasks_failed_total") == {"m.boom": 1, "m.slow": 1}
        assert by_task(samples, "aioqueue_tasks_retried_total") == {"m.flaky": 1}
        assert by_task(samples, "aioqueue_task_duration_seconds_count") == {
            "m.ok": 3,
            "m.boom": 1,
            "m.flaky": 2,
            "m.slow": 1,
        }
        slow_seconds = value(samples, "aioqueue_task_duration_seconds_sum", task="m.slow")
        assert slow_seconds is not None and slow_seconds >= 0.2
        for task in app.tasks:  # series start at 0, and nothing is left in flight
            assert value(samples, "aioqueue_tasks_failed_total", task=task) is not None
            assert value(samples, "aioqueue_tasks_in_flight", task=task) == 0.0
        assert dead_letters(samples) == {
            ("m.boom", queue_name, "failed"): 1,
            ("m.slow", queue_name, "timeout"): 1,
        }

        # When the queue gauges are sampled while the worker consumes
        dlq = f"{queue_name}.dlq"
        watch = asyncio.ensure_future(
            observer.watch_queues(app.broker, worker.queues, interval=0.1)
        )
        try:
            # Then they show the worker on the queue and the two dead letters in its DLQ
            await wait_until(
                lambda: value(scrape(observer), "aioqueue_queue_messages", queue=dlq) == 2,
                what="the DLQ gauge",
            )
            samples = scrape(observer)
            assert value(samples, "aioqueue_queue_consumers", queue=queue_name) == 1
            assert value(samples, "aioqueue_queue_messages", queue=queue_name) == 0
            assert value(samples, "aioqueue_queue_consumers", queue=dlq) == 0
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)


async def test_a_missing_queue_has_no_gauge_and_publishing_goes_on(
    make_app: Any, queue_name: str
) -> None:
    # Given a connected app whose queue nobody declared yet
    app: App = make_app()
    observer = PrometheusObserver()
    async with app:
        # When it is sampled
        await observer.refresh_queues(app.broker, [queue_name])
        # Then there is no series for it, and nothing was created
        assert not [n for n, _ in scrape(observer) if n.startswith("aioqueue_queue_")]

        # When a submit declares the work queue (the publishing channel is unharmed)
        await app.submit_with_options("m.nobody", ignore_result=True)
        await observer.refresh_queues(app.broker, [queue_name])
        # Then the queue has its gauges and its still-missing DLQ none
        samples = scrape(observer)
        assert value(samples, "aioqueue_queue_messages", queue=queue_name) == 1
        assert value(samples, "aioqueue_queue_consumers", queue=queue_name) == 0
        assert value(samples, "aioqueue_queue_messages", queue=f"{queue_name}.dlq") is None


async def test_queue_gauges_need_rabbitmq(queue_name: str) -> None:
    url = f"memory://{queue_name}"
    observer = PrometheusObserver()
    try:
        async with App("tests", broker_url=url, default_queue=queue_name) as app:
            await observer.refresh_queues(app.broker, [queue_name])
    finally:
        reset(url)
    assert not [n for n, _ in scrape(observer) if n.startswith("aioqueue_queue_")]


@pytest.mark.parametrize(
    ("outcome", "counter"),
    [
        ("succeeded", "aioqueue_tasks_succeeded_total"),
        ("retried", "aioqueue_tasks_retried_total"),
        ("failed", "aioqueue_tasks_failed_total"),
        ("timeout", "aioqueue_tasks_failed_total"),
    ],
)
def test_each_outcome_has_its_counter(outcome: Any, counter: str) -> None:
    observer = PrometheusObserver()
    observer.started("t", "id", 1)
    observer.finished("t", "id", 1, outcome, 0.5)
    samples = scrape(observer)
    assert value(samples, counter, task="t") == 1
    assert value(samples, "aioqueue_tasks_in_flight", task="t") == 0
    assert value(samples, "aioqueue_task_duration_seconds_bucket", task="t", le="0.5") == 1
    assert value(samples, "aioqueue_task_duration_seconds_bucket", task="t", le="0.25") == 0


def test_names_from_undecodable_or_unknown_messages_do_not_become_labels() -> None:
    observer = PrometheusObserver()
    observer.dead_lettered("q", "made.up.by.anyone", "id1", "not_found")
    observer.dead_lettered("q", "", "id2", "decode")
    observer.dead_lettered("q", "real.task", "id3", "expired")
    assert dead_letters(scrape(observer)) == {
        ("unknown", "q", "not_found"): 1,
        ("unknown", "q", "decode"): 1,
        ("real.task", "q", "expired"): 1,
    }


def test_observers_have_registries_of_their_own() -> None:
    first, second = PrometheusObserver(), PrometheusObserver()
    first.submitted("t")
    assert value(scrape(first), "aioqueue_tasks_submitted_total", task="t") == 1
    assert value(scrape(second), "aioqueue_tasks_submitted_total", task="t") is None


def test_without_the_extra_the_error_says_what_to_install() -> None:
    code = "import sys; sys.modules['prometheus_client'] = None; import aioqueue.metrics"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "pip install aioqueue-rabbit[metrics]" in result.stderr


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


async def test_worker_process_serves_metrics(
    spawn_worker: Callable[..., WorkerProcess], make_app: Any, queue_name: str
) -> None:
    # Given a worker process started with --metrics-port
    port = free_port()
    worker = spawn_worker("--metrics-port", str(port))
    await worker.wait_ready()
    url = f"http://localhost:{port}/metrics"
    assert f"metrics:      {url}" in worker.output()

    # When a task runs there
    app: App = make_app()
    async with app:
        handle = await app.submit("tests.add", 2, 3)
        assert await handle.result(timeout=30) == 5

    # Then its metrics endpoint counts it, and samples the worker's queue
    local = f"http://127.0.0.1:{port}/metrics"
    for line in (
        'aioqueue_tasks_succeeded_total{task="tests.add"} 1.0',
        f'aioqueue_queue_consumers{{queue="{queue_name}"}} 1.0',
    ):
        await wait_until(
            lambda line=line: _contains(local, line), timeout=30, what=f"{line!r} at {local}"
        )

    # And it still stops cleanly
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0, worker.output()


async def _contains(url: str, line: str) -> bool:
    return line in await asyncio.to_thread(_get, url)
