"""``aioqueue worker module:app [options]`` (or ``python -m aioqueue.worker``): run a worker
until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from ..app import App
from ..cli.common import app_from_args, run, setup_logging
from ..errors import BrokerConnectionError
from ..scheduler import Scheduler
from ..scheduler.cli import banner as scheduler_banner
from ..settings import mask_url
from .events import TaskLog
from .lifecycle import Worker
from .replay import REPLAY_GUARD_ENV, SharedReplayGuard
from .supervisor import Supervisor

if TYPE_CHECKING:  # aioqueue.metrics needs the metrics extra: imported only when asked for
    from aiohttp.web import AppRunner

    from ..metrics import MetricsServer, PrometheusObserver

__all__ = ["main"]

log = logging.getLogger("aioqueue.worker")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parser(prog: str = "python -m aioqueue.worker") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run aioqueue tasks from RabbitMQ until SIGTERM or SIGINT.",
    )
    p.add_argument("app", help="the App to serve, as MODULE:ATTRIBUTE (e.g. shop.tasks:app)")
    p.add_argument(
        "--queues",
        help="comma-separated queues (default: the default queue plus "
        "every queue a registered task names)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=100,
        help="most tasks running at once (default 100)",
    )
    p.add_argument(
        "--processes",
        type=_processes,
        default=1,
        help="worker processes under one supervisor, each with its own event loop and "
        "connection; 'auto' = the number of CPUs (default 1). --concurrency and --prefetch "
        "are per process; --metrics-port P serves process I on port P+I; --scheduler and "
        "--dashboard-port run in process 0 only",
    )
    p.add_argument("--process-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--prefetch",
        type=_positive_int,
        default=None,
        help="most unacked messages this worker process holds, in total: split across the "
        "queues, at least 1 each (so raised to the number of queues if below it, with a "
        "warning) (default: --concurrency)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running tasks get to finish on shutdown (default 30)",
    )
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
    p.add_argument(
        "--scheduler",
        action="store_true",
        help="also run the app's periodic-task scheduler in this process",
    )
    p.add_argument(
        "--no-events",
        action="store_true",
        help="publish no task events or heartbeats (default: on, unless the app's settings "
        "say events=False)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics over HTTP on this port (needs aioqueue-rabbit[metrics])",
    )
    p.add_argument(
        "--dashboard-port",
        type=_port,
        default=None,
        help="also serve the web dashboard on this port (needs aioqueue-rabbit[aiohttp]; "
        "see aioqueue dashboard --help for its safety rules)",
    )
    p.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="address the dashboard binds (default 127.0.0.1)",
    )
    p.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="address the metrics server binds (default 0.0.0.0: all interfaces)",
    )
    return p


def _processes(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def main(argv: list[str] | None = None, *, prog: str = "python -m aioqueue.worker") -> int:
    """Run a worker as the command line ``argv`` says; returns the exit code."""
    args = parser(prog).parse_args(argv)
    setup_logging(args.log_level)
    app = app_from_args(args)
    if app is None:
        return 2
    if args.processes > 1:  # checked here once, then N children (`aioqueue.worker.supervisor`)
        return _supervise(args, list(sys.argv[1:] if argv is None else argv), app)
    _as_child(args)
    scheduler = Scheduler(app) if args.scheduler else None
    if scheduler is not None:
        try:
            scheduler.check_schedules()
        except TypeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    metrics = None
    if args.metrics_port is not None:
        try:
            metrics = _start_metrics(app, args.metrics_port, args.metrics_host)
        except (ImportError, OSError) as exc:
            print(f"error: --metrics-port {args.metrics_port}: {exc}", file=sys.stderr)
            return 2
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    worker = Worker(
        app,
        queues=queues,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        shutdown_timeout=args.shutdown_timeout,
        observers=None if metrics is None else [TaskLog(), metrics[0]],
        events=False if args.no_events else None,
        replay_guard=_shared_replay_guard(app),
    )
    dashboard = None
    if args.dashboard_port is not None:
        dashboard = (args.dashboard_host, args.dashboard_port)
        refusal = _dashboard_refusal(args.dashboard_host)
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
    _tune_gc()
    try:
        return run(_serve(worker, scheduler, metrics, dashboard))
    finally:
        if metrics is not None:
            metrics[1].close()


GC_ENV = "AIOQUEUE_WORKER_GC"  # "default": leave Python's collector as it is
GC_THRESHOLD = (20_000, 20, 20)  # gen0 after 20,000 net allocations (Python's default: 700)


def _tune_gc() -> None:
    """Collect once, freeze what the worker was started with (modules, the app, its tasks) out
    of the collector's reach, and collect the young generation 28 times less often.

    A delivery allocates a few dozen short-lived objects; with Python's default threshold the
    collector ran every ~15 deliveries and took ~10 % of a busy worker's CPU (0.145 s of the
    fire benchmark's ~1.2 s; 0.018 s with this). Garbage in reference cycles waits longer to
    be freed: at most ~20,000 objects. ``AIOQUEUE_WORKER_GC=default`` keeps Python's settings.
    """
    if os.environ.get(GC_ENV, "").strip().lower() == "default":
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _supervise(args: argparse.Namespace, argv: list[str], app: App) -> int:
    refusal = _dashboard_refusal(args.dashboard_host) if args.dashboard_port else None
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if app.signing is None:
        return run(Supervisor(argv, args.processes).run())
    # with signing keys, the children share one replay guard (`aioqueue.worker.replay`)
    guard = SharedReplayGuard.create(app.settings.replay_guard_size)
    try:
        env = {REPLAY_GUARD_ENV: guard.spec}
        held = () if guard.held is None else (guard.held,)
        return run(Supervisor(argv, args.processes, env=env, pass_fds=held).run())
    finally:
        guard.unlink()


def _shared_replay_guard(app: App) -> SharedReplayGuard | None:
    """A child's share of its supervisor's replay guard (``$AIOQUEUE_REPLAY_GUARD``), if any."""
    spec = os.environ.get(REPLAY_GUARD_ENV)
    return None if spec is None or app.signing is None else SharedReplayGuard.attach(spec)


def _as_child(args: argparse.Namespace) -> None:
    """Process I > 0 of a supervisor: no scheduler or dashboard; metrics on port P+I."""
    if args.process_index == 0:
        return
    args.scheduler = False
    args.dashboard_port = None
    if args.metrics_port:
        args.metrics_port += args.process_index


def _dashboard_refusal(host: str) -> str | None:
    try:
        from ..dashboard.security import Credentials, check_bind
    except ImportError as exc:
        return f"--dashboard-port needs aioqueue-rabbit[aiohttp]: {exc}"
    return check_bind(host, Credentials.from_env())


def _start_metrics(app: App, port: int, host: str) -> tuple[PrometheusObserver, MetricsServer]:
    """Serve a new `PrometheusObserver`'s registry over HTTP (ImportError, OSError)."""
    from ..metrics import PrometheusObserver, serve_metrics

    observer = PrometheusObserver(tasks=app.tasks)
    app.on_submit.append(observer.submitted)  # tasks that submit tasks
    app.on_unreadable_reply.append(observer.unreadable_reply)  # replies to those submits
    return observer, serve_metrics(observer.registry, port, host)


async def _serve(
    worker: Worker,
    scheduler: Scheduler | None = None,
    metrics: tuple[PrometheusObserver, MetricsServer] | None = None,
    dashboard: tuple[str, int] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, worker, sig, scheduler)
    try:
        await worker.app.connect()
    except BrokerConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    scheduling: asyncio.Future[None] | None = None
    watching: asyncio.Future[None] | None = None
    site: AppRunner | None = None
    try:
        if dashboard is not None:
            from ..dashboard.cli import start, url_of

            site = await start(worker.app, *dashboard)
            print(f"aioqueue dashboard on {url_of(site)}", file=sys.stderr, flush=True)
        run_task = asyncio.ensure_future(worker.run())
        ready = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait({run_task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if worker.ready.is_set():
            print(banner(worker, metrics[1].url if metrics else None), file=sys.stderr, flush=True)
            if metrics is not None:  # the queue gauges
                watching = asyncio.ensure_future(
                    metrics[0].watch_queues(worker.app.broker, worker.queues)
                )
        ready.cancel()
        if scheduler is not None:  # --scheduler: fire schedules in this event loop too
            scheduling = asyncio.ensure_future(scheduler.run())
            print(scheduler_banner(scheduler), file=sys.stderr, flush=True)
        await run_task
    finally:
        if site is not None:
            await site.cleanup()
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        if scheduler is not None and scheduling is not None:
            scheduler.stop()
            await scheduling
        await worker.app.close()
    log.info("worker %s stopped", worker.identity)
    return 0


def _on_signal(worker: Worker, sig: signal.Signals, scheduler: Scheduler | None = None) -> None:
    again = (
        "again: returning running tasks now"
        if worker.ready.is_set() and worker._stop.is_set()
        else "finishing running tasks"
    )
    log.warning("received %s, %s", sig.name, again)
    worker.stop()
    if scheduler is not None:
        scheduler.stop()


def banner(worker: Worker, metrics_url: str | None = None) -> str:
    app = worker.app
    tasks = "\n".join(f"    {name}  (queue {t.options.queue})" for name, t in app.tasks.items())
    return (
        f"aioqueue worker {worker.identity} ready\n"
        f"  app:          {app.name}\n"
        f"  broker:       {mask_url(app.broker_url)}\n"
        f"  queues:       {', '.join(worker.queues)}\n"
        f"  concurrency:  {worker.concurrency} (threads for plain functions: {worker.threads})\n"
        f"  prefetch:     {_prefetch_line(worker)}\n"
        + (f"  metrics:      {metrics_url}\n" if metrics_url else "")
        + f"  signing:      {_signing_line(worker)}\n"
        + f"  tasks:\n{tasks or '    (none registered)'}"
    )


def _signing_line(worker: Worker) -> str:
    """Key ids only (never a secret), the window, and who shares the replay guard."""
    keys, settings = worker.app.signing, worker.app.settings
    if keys is None:
        return "off (unsigned messages run; docs/security.md)"
    shared = (
        "shared by this worker's processes" if worker.replay_guard is not None else "this process"
    )
    return (
        f"signs with {keys.signing_id!r}, accepts {', '.join(map(repr, keys.ids))}; "
        f"window {settings.signature_window:g}s; replay guard: {shared}"
    )


def _prefetch_line(worker: Worker) -> str:
    shares = worker.prefetch_shares
    line = f"{worker.prefetch} in total"
    if len(shares) > 1:
        line += f" ({' + '.join(map(str, shares))} over the queues above)"
    if worker.prefetch > worker.requested_prefetch:
        line += (
            f", raised from {worker.requested_prefetch}: each of the {len(shares)} queues "
            "needs at least 1"
        )
    return line
