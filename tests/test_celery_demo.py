"""The Celery demo end to end: a Celery producer *process* against an aioqueue worker process,
both started by ``python -m services.celery_demo`` (what ``make celery-demo`` runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.rabbit import RabbitNode

pytestmark = pytest.mark.timeout(180)


def test_the_celery_demo_runs_celery_calls_on_an_aioqueue_worker(
    rabbit: RabbitNode, queue_name: str
) -> None:
    env = {**os.environ, "AIOQUEUE_BROKER_URL": rabbit.url, "CELERY_DEMO_QUEUE": queue_name}
    done = subprocess.run(
        [sys.executable, "-m", "services.celery_demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "[celery] add.delay(3, 4) -> 7 (state SUCCESS)" in out
    assert "[celery] apply_async(countdown=2) -> 42 after" in out
    assert "[celery] send_task('tasks.add', (1, 1)) -> 2" in out
    assert "raised ValueError: cannot charge -5 cents (state FAILURE)" in out
    assert "worker stopped (exit code 0)" in out
