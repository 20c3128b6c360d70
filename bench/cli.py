"""``python -m bench [--runs 3] [--only rpc,fire,...] [--quick] [--broker-url URL] ...``.

Starts a private RabbitMQ node (unless ``--broker-url``), runs the suite, prints the Markdown
table to stdout (progress goes to stderr) and writes everything to ``bench/results/latest.json``.
Exits 1 if a measurement could not be taken; missed targets are reported, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from . import report
from .admin import server_version
from .loop import loop_name
from .machine import listener_pid
from .procs import ROOT, BenchError
from .suite import BUSY_CORES, COMPARED, ONCE, Suite, progress
from .workloads import Sizes

RESULTS = ROOT / "bench" / "results"
WORKLOADS = (*COMPARED, *ONCE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="aioqueue against a naive aio-pika baseline."
    )
    p.add_argument("--runs", type=int, default=3, help="runs of rpc/fire/latency (median; 3)")
    p.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads (default: all of {','.join(WORKLOADS)})",
    )
    p.add_argument("--quick", action="store_true", help="ten times fewer tasks: a smoke run")
    p.add_argument("--broker-url", help="use this broker instead of starting a private node")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile the aioqueue worker and producer during an extra rpc run (needs py-spy)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to go quiet "
        "(default 0: do not wait)",
    )
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="result file")
    args = p.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(args.only) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workload(s): {', '.join(unknown)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


@contextlib.contextmanager
def broker(url: str | None) -> Iterator[tuple[str, int | None]]:
    """(URL, pid) of a private RabbitMQ node for the duration (tests/rabbit.py), or the given
    URL with the pid of its broker when it runs on this machine (else None)."""
    if url:
        parts = urlsplit(url)
        pid = None
        if parts.hostname in ("localhost", "127.0.0.1", "::1"):
            pid = listener_pid(parts.port or (5671 if parts.scheme == "amqps" else 5672))
        if pid is None:
            progress("the broker's process is not on this machine: its CPU counts as 'other'")
        else:
            progress(f"the broker listens as pid {pid}: its CPU counts as the suite's")
        yield url, pid
        return
    from tests.rabbit import RabbitNode

    base = Path(tempfile.mkdtemp(prefix="aioqueue-bench-"))
    node = RabbitNode(base, name=f"aioqueue-bench-{os.getpid()}")
    progress(f"starting a private RabbitMQ node in {base} ...")
    node.start()
    try:
        yield node.url, node.pid
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


def environment(url: str, args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    packages = ("aioqueue", "aio-pika", "aiormq", "uvloop", "orjson", "anyio")
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loop": loop_name(),
        "packages": {name: version(name) for name in packages},
        "broker": server_version(url),
        "runs": args.runs,
        "quick": args.quick,
        "quiet_wait": args.quiet_wait,
        "workloads": args.only,
        "sizes": asdict(sizes),
    }


def render(suite: Suite, profile: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    broker_info = meta["broker"]
    parts = [
        f"## aioqueue benchmark ({'quick, ' if meta['quick'] else ''}{meta['runs']} run(s))",
        "",
        f"{meta['cpus']} CPUs, Python {meta['python']} on {meta['loop']}, "
        f"{broker_info['product']} {broker_info['version']}, "
        f"aio-pika {meta['packages']['aio-pika']}, aiormq {meta['packages']['aiormq']}",
        "",
        report.markdown(report.rows(suite.measured, suite.sizes)),
    ]
    runs = report.per_run(suite.measured, BUSY_CORES)
    if runs:
        parts += ["", f"Per run (* = other processes used > {BUSY_CORES} cores meanwhile):", runs]
    if profile:
        parts += ["", _profile_table(profile)]
    if suite.anomalies:
        parts += ["", "Anomalies:", *(f"- {a}" for a in suite.anomalies)]
    parts += ["", f"Total wall time: {meta['wall_seconds'] / 60:.1f} min"]
    return "\n".join(parts)


def _profile_table(profile: dict[str, Any]) -> str:
    lines = _hot_table("worker", profile)
    if profile.get("producer"):
        lines += ["", *_hot_table("producer", profile["producer"])]
    lines += [
        "",
        "`Runner.run`'s own time is uvloop's C code (polling, transports, callbacks); a Python "
        "function's self time includes the C calls it makes (e.g. `StreamWriter.write`: the "
        "socket send).",
    ]
    return "\n".join(lines)


def _hot_table(process: str, profile: dict[str, Any]) -> list[str]:
    lines = [
        f"Hottest functions of the aioqueue {process} during rpc (py-spy, "
        f"{profile['samples']} samples; self = in the function's own code):",
        "",
        "| # | function | self % | total % |",
        "|---:|---|---:|---:|",
    ]
    for i, hot in enumerate(profile["top"], 1):
        lines.append(
            f"| {i} | `{hot['function']}` | {hot['self_pct']:.1f} | {hot['total_pct']:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    sizes = Sizes.quick() if args.quick else Sizes()
    logs = RESULTS / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    profile: dict[str, Any] | None = None
    with broker(args.broker_url) as (url, broker_pid):
        meta = environment(url, args, sizes)
        suite = Suite(url, sizes, logs, broker_pid=broker_pid, quiet_wait=args.quiet_wait)
        suite.run(args.only, args.runs)
        if args.profile:
            try:
                profile = suite.profile(RESULTS / "profile-rpc-aioqueue.txt")
            except BenchError as exc:
                suite.anomalies.append(f"profile: {exc}")
    meta["wall_seconds"] = time.monotonic() - started
    print(render(suite, profile, meta), flush=True)
    table = [asdict(row) for row in report.rows(suite.measured, sizes)]
    document = {
        "meta": meta,
        "table": table,
        "measurements": suite.measured,
        "profile": profile,
        "anomalies": suite.anomalies,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    progress(f"results written to {args.json}")
    errors = any("error" in r for s in suite.measured.values() for rs in s.values() for r in rs)
    return 1 if errors else 0
