"""A plain Celery 5 app for the tests: run by a real ``celery -A tests.apps.celery_tasks worker``.

Nothing of aioqueue is imported: this is the unchanged Celery side that an aioqueue caller
submits to (``app.celery_task("tasks.add", queue=...)``). The broker is
``$AIOQUEUE_BROKER_URL`` (the tests' own node), the queue ``$AIOQUEUE_CELERY_QUEUE`` (so each
test isolates itself) and its type ``$AIOQUEUE_CELERY_QUEUE_TYPE`` (classic by default).
"""

from __future__ import annotations

import datetime
import os
import time
from decimal import Decimal
from typing import Any

from celery import Celery, Task

app = Celery(
    "tasks",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "amqp://guest:guest@localhost/"),
    backend="rpc://",
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    result_persistent=True,
    task_default_queue=os.environ.get("AIOQUEUE_CELERY_QUEUE", "celery"),
    # "quorum" to check that both sides declare a quorum queue alike (Celery 5.5+)
    task_default_queue_type=os.environ.get("AIOQUEUE_CELERY_QUEUE_TYPE", "classic"),
    broker_connection_retry_on_startup=True,
    enable_utc=True,
)


@app.task(name="tasks.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tasks.fail")
def fail() -> None:
    raise ValueError("boom")


@app.task(name="tasks.retry_once", bind=True)
def retry_once(self: Task, value: str) -> dict[str, Any]:
    """Ask for one retry (Celery publishes a RETRY state to the caller), then succeed."""
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return {"value": value, "retries": self.request.retries}


@app.task(name="tasks.slow", time_limit=1.5)
def slow() -> str:
    """Outlives its hard time limit: the pool kills it (TimeLimitExceeded)."""
    time.sleep(120)  # sleep-ok: the behaviour under test (killed by its time limit)
    return "never"


@app.task(name="tasks.typed")
def typed() -> dict[str, Any]:
    """Values kombu's JSON writes as ``{"__type__": ..., "__value__": ...}``."""
    return {
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "amount": Decimal("1.10"),
        "plain": 7,
    }


@app.task(name="tasks.whoami", bind=True)
def whoami(self: Task) -> dict[str, Any]:
    """What the Celery worker saw: the task id, when it ran, and the eta it honoured."""
    eta = self.request.eta
    return {
        "id": self.request.id,
        "ran_at": time.time(),
        "eta": eta.isoformat() if isinstance(eta, datetime.datetime) else eta,
        "reply_to": self.request.reply_to,
        "correlation_id": self.request.correlation_id,
    }
