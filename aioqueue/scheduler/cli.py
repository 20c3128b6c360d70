"""``aioqueue scheduler module:app [options]`` (or ``python -m aioqueue.scheduler``): fire an
app's schedules until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from ..cli.common import app_from_args, run, setup_logging
from ..errors import BrokerConnectionError
from ..settings import mask_url
from ._scheduler import Scheduler, log
from .schedule import next_run

__all__ = ["banner", "main", "parser"]


def parser(prog: str = "python -m aioqueue.scheduler") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fire an app's periodic tasks until SIGTERM or SIGINT. Run as many as you "
        "like: one of them leads and fires, the others take over when it stops.",
    )
    p.add_argument("app", help="the App to schedule, as MODULE:ATTRIBUTE (e.g. shop.tasks:app)")
    p.add_argument(
        "--broker-url",
        help="one AMQP URL, or the comma-separated URLs of a cluster's nodes; overrides the "
        "app's broker URL and $AIOQUEUE_BROKER_URL",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="seconds to keep retrying an unreachable broker at start (default 30)",
    )
    return p


def main(argv: list[str] | None = None, *, prog: str = "python -m aioqueue.scheduler") -> int:
    """Run the scheduler as the command line ``argv`` says; returns the exit code."""
    args = parser(prog).parse_args(argv)
    setup_logging(args.log_level)
    app = app_from_args(args)
    if app is None:
        return 2
    try:
        scheduler = Scheduler(app)
        scheduler.check_schedules()
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run(serve(scheduler))


async def serve(scheduler: Scheduler) -> int:
    """Run ``scheduler`` until SIGTERM/SIGINT; the process exit code."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, scheduler, sig)
    running = asyncio.ensure_future(scheduler.run())
    ready = asyncio.ensure_future(scheduler.ready.wait())
    await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if scheduler.ready.is_set():
        print(banner(scheduler), file=sys.stderr, flush=True)
    try:
        await running
    except BrokerConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("scheduler %s stopped", scheduler.identity)
    return 0


def _on_signal(scheduler: Scheduler, sig: signal.Signals) -> None:
    log.warning("received %s, stopping the scheduler", sig.name)
    scheduler.stop()


def banner(scheduler: Scheduler) -> str:
    """What a starting scheduler prints: who it is and what it will fire."""
    app = scheduler.app
    now = scheduler.clock.now()
    lines = [
        f"    {s.name}: {s.describe()} -> task {s.task}; next {next_run(s, now).isoformat()}"
        for s in app.schedules.values()
    ]
    schedules = "\n".join(lines) or "    (none defined)"
    return (
        f"aioqueue scheduler {scheduler.identity} ready\n"
        f"  app:        {app.name}\n"
        f"  broker:     {mask_url(app.broker_url)}\n"
        f"  schedules:\n{schedules}"
    )
