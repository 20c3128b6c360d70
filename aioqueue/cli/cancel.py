"""``aioqueue cancel MODULE:APP TASK_ID... [--broker-url URL]``: cancel tasks by id.

It calls ``App.cancel`` (the one function behind ``handle.cancel()`` and the dashboard) and
returns once the cancellation is published (confirmed): it does not wait for a worker.
An unknown or finished id changes nothing.
"""

from __future__ import annotations

import argparse
import sys

from ..app import App
from ..errors import AioqueueError
from .common import app_from_args, run, setup_logging

__all__ = ["main", "parser"]


def parser(prog: str = "aioqueue cancel") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Cancel tasks by id: a queued or delayed task never runs, a running "
        "async task is cancelled, a running thread task sees task_context().cancelled.",
    )
    p.add_argument("app", help="the App, as MODULE:ATTRIBUTE (e.g. shop.tasks:app)")
    p.add_argument("ids", nargs="+", metavar="TASK_ID", help="the ids of the tasks to cancel")
    p.add_argument("--broker-url", help="the broker (default: the app's, or $AIOQUEUE_BROKER_URL)")
    p.add_argument(
        "--connect-timeout", type=float, default=None, help="seconds to keep trying to connect"
    )
    return p


async def _cancel(app: App, ids: list[str]) -> int:
    async with app:
        await app.cancel(*ids)
    for task_id in ids:
        print(f"cancelled {task_id}")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "aioqueue cancel") -> int:
    """Run ``aioqueue cancel``; returns the exit code."""
    args = parser(prog).parse_args(argv)
    setup_logging("WARNING")
    app = app_from_args(args)
    if app is None:
        return 2
    try:
        return run(_cancel(app, list(args.ids)))
    except (AioqueueError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
