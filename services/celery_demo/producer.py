"""A Celery producer, unchanged: ``python -m services.celery_demo.producer``."""

from __future__ import annotations

import time

from .tasks import add, app, charge


def main() -> int:
    result = add.delay(3, 4)
    print(f"[celery] add.delay(3, 4) -> {result.get(timeout=30)} (state {result.state})")

    started = time.monotonic()
    later = add.apply_async((20, 22), countdown=2)
    value = later.get(timeout=30)
    print(f"[celery] apply_async(countdown=2) -> {value} after {time.monotonic() - started:.1f}s")

    by_name = app.send_task("tasks.add", (1, 1))
    print(f"[celery] send_task('tasks.add', (1, 1)) -> {by_name.get(timeout=30)}")

    failed = charge.delay("bob", -5)
    try:
        failed.get(timeout=30)
    except ValueError as exc:
        print(f"[celery] charge.delay('bob', -5) raised ValueError: {exc} (state {failed.state})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
