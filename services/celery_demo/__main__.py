"""``python -m services.celery_demo``: an aioqueue worker runs what a Celery producer sends.

Starts ``python -m aioqueue.worker services.celery_demo.moved:app``, runs the unchanged Celery
producer (``services/celery_demo/producer.py``) as a process of its own, then stops the worker.
Needs a RabbitMQ at ``$AIOQUEUE_BROKER_URL``; ``make celery-demo`` starts one when none answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from .moved import app


def start_worker() -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "aioqueue.worker", "services.celery_demo.moved:app"]
    print(f"starting an aioqueue worker: {' '.join(command[1:])}")
    worker = subprocess.Popen([*command, "--log-level", "WARNING"], stderr=subprocess.PIPE)
    assert worker.stderr is not None
    banner: list[str] = []
    for raw in worker.stderr:
        line = raw.decode(errors="replace").rstrip()
        banner.append(line)
        print(f"  worker | {line}")
        if "  tasks:" in banner and len(banner) - banner.index("  tasks:") > len(app.tasks):
            break
    else:
        raise SystemExit(f"worker did not start:\n{os.linesep.join(banner)}")
    return worker


def main() -> int:
    worker = start_worker()
    try:
        print("running the Celery producer: python -m services.celery_demo.producer")
        code = subprocess.call([sys.executable, "-m", "services.celery_demo.producer"])
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.stderr is not None
        for raw in worker.stderr:
            print(f"  worker | {raw.decode(errors='replace').rstrip()}")
        print(f"worker stopped (exit code {worker.wait(60)})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
