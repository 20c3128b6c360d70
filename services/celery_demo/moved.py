"""The aioqueue side: the same tasks, moved. Registered under their Celery names, on the queue
Celery routes them to, so the Celery producers above need no change.

Run a worker for them: ``python -m aioqueue.worker services.celery_demo.moved:app``.
"""

from __future__ import annotations

import asyncio
import os

from aioqueue import App

QUEUE = os.environ.get("CELERY_DEMO_QUEUE", "celery")

app = App("moved-from-celery", default_queue=QUEUE)


@app.task(name="tasks.add", queue=QUEUE)
async def add(x: int, y: int) -> int:
    await asyncio.sleep(0)  # an async def now: no thread, no prefork pool
    return x + y


@app.task(name="tasks.charge", queue=QUEUE)
def charge(customer: str, cents: int) -> str:  # a plain def runs in a worker thread
    if cents <= 0:
        raise ValueError(f"cannot charge {cents} cents")
    return f"charged {customer} {cents / 100:.2f}"
