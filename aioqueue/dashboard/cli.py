"""``aioqueue dashboard module:app [--host 127.0.0.1] [--port 5555]``: serve the dashboard.

`start` is also what ``aioqueue worker --dashboard-port P`` calls to serve it in the worker's
event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from ..app import App
from ..cli.common import app_from_args, run, setup_logging
from ..errors import BrokerConnectionError
from .security import Credentials, check_bind
from .server import create_app
from .state import DashboardState

__all__ = ["main", "parser", "start"]


def parser(prog: str = "aioqueue dashboard") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve the aioqueue dashboard (tasks, workers, queues, schedules) over "
        "HTTP, live from the event stream. Bound beyond 127.0.0.1 it needs "
        "$AIOQUEUE_DASHBOARD_TOKEN or $AIOQUEUE_DASHBOARD_USER/$AIOQUEUE_DASHBOARD_PASSWORD.",
    )
    p.add_argument("app", help="the App, as MODULE:ATTRIBUTE (e.g. shop.tasks:app)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5555, help="port (default 5555; 0: any free one)")
    p.add_argument("--broker-url", help="overrides the app's broker URL and $AIOQUEUE_BROKER_URL")
    p.add_argument(
        "--max-tasks", type=int, default=10_000, help="recent tasks kept (default 10000)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=1_440,
        help="minutes of history for the charts, read back from the stream at start (default 1440)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)")
    return p


async def start(
    app: App, host: str, port: int, *, state: DashboardState | None = None
) -> web.AppRunner:
    """Serve the dashboard of ``app`` on ``host:port`` (ValueError: unsafe bind; OSError)."""
    credentials = Credentials.from_env()
    refusal = check_bind(host, credentials)
    if refusal is not None:
        raise ValueError(refusal)
    runner = web.AppRunner(
        create_app(app, state=state, credentials=credentials),
        handle_signals=False,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def url_of(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"


def main(argv: list[str] | None = None, *, prog: str = "aioqueue dashboard") -> int:
    args = parser(prog).parse_args(argv)
    refusal = check_bind(args.host, Credentials.from_env())
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    app = app_from_args(args)
    if app is None:
        return 2
    state = DashboardState(max_tasks=max(1, args.max_tasks), window_minutes=max(1, args.window))
    return run(_serve(app, args.host, args.port, state))


async def _serve(app: App, host: str, port: int, state: DashboardState) -> int:
    try:
        await app.connect()
    except BrokerConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            runner = await start(app, host, port, state=state)
        except OSError as exc:
            print(f"error: cannot serve on {host}:{port}: {exc}", file=sys.stderr)
            return 1
        print(f"aioqueue dashboard of {app.name} on {url_of(runner)}", file=sys.stderr, flush=True)
        await stop.wait()
        await runner.cleanup()
    finally:
        await app.close()
    return 0
