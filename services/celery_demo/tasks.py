"""The Celery side: a project's ``tasks.py`` as it stands today, unchanged.

Its producers keep calling ``add.delay(3, 4)`` and ``res.get()``; which worker runs the task
(``celery -A tasks worker`` or an aioqueue worker) is no concern of theirs. The queue is
``celery``, Celery's default (``$CELERY_DEMO_QUEUE`` overrides it for the tests).
"""

from __future__ import annotations

import os

from celery import Celery

QUEUE = os.environ.get("CELERY_DEMO_QUEUE", "celery")

app = Celery(
    "tasks",
    broker=os.environ.get("AIOQUEUE_BROKER_URL", "amqp://guest:guest@localhost//"),
    backend="rpc://",
)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task(name="tasks.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tasks.charge")
def charge(customer: str, cents: int) -> str:
    if cents <= 0:
        raise ValueError(f"cannot charge {cents} cents")
    return f"charged {customer} {cents / 100:.2f}"
