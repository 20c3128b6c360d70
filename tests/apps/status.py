"""An app for ``python -m aioqueue status`` tests: two work queues and an hourly schedule.

``$AIOQUEUE_TEST_APP`` names the app (its scheduler lease is its own) and
``$AIOQUEUE_TEST_QUEUE`` is its default queue; the second queue is ``<default>.slow``.
"""

from __future__ import annotations

import os

from aioqueue import App


def build(name: str, queue: str, broker_url: str | None = None) -> App:
    """The app, also built by the tests themselves (e.g. to run its scheduler in-process)."""
    app = App(name, broker_url=broker_url, default_queue=queue)

    @app.task(name="status.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="status.report", queue=f"{queue}.slow")
    def report(customer: str) -> str:
        return customer

    @app.periodic(every=3600, name="status.hourly", ignore_result=True)
    async def hourly() -> None:
        return None

    return app


app = build(
    os.environ.get("AIOQUEUE_TEST_APP", "tests-status"),
    os.environ.get("AIOQUEUE_TEST_QUEUE", "default"),
)
