"""``python -m bench [--runs 3] [--only rpc,fire,...] [--quick] [--broker-url URL] ...``.

Starts a private RabbitMQ node (unless ``--broker-url``), runs the suite, prints the Markdown
table to stdout (progress goes to stderr) and writes everything to ``bench/results/latest.json``.
``--cluster`` runs only the cluster run (a private 3-node cluster, quorum queues; results in
``bench/results/cluster.json``), ``--with-cluster`` the suite and then the cluster run.
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
from .cluster import NODES, cluster
from .cpu import cpu_markdown
from .loop import loop_name
from .machine import listener_pid
from .procs import ROOT, BenchError
from .suite import BUSY_CORES, CLUSTERED, COMPARED, ONCE, Suite, progress
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
        nargs="?",
        const="rpc",
        choices=("rpc", "fire", "latency"),
        help="also profile the aioqueue worker and producer during an extra run of this workload "
        "(rpc if not given; needs py-spy)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to go quiet "
        "(default 0: do not wait)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="only the cluster run: rpc and fire on quorum queues of a private 3-node cluster "
        "with 1, 2, 3 aioqueue workers and one raw worker",
    )
    p.add_argument(
        "--with-cluster",
        action="store_true",
        help="the single-node suite, then the cluster run (ratios to the single-node figures)",
    )
    p.add_argument(
        "--cluster-runs",
        type=int,
        metavar="N",
        help="runs of the cluster run (median; default: --runs)",
    )
    p.add_argument(
        "--events",
        action="store_true",
        help="also run rpc/fire/latency with the aioqueue worker's task events off "
        "(aioqueue-no-events), for the cost of task events",
    )
    p.add_argument(
        "--lean",
        action="store_true",
        help="also run rpc/fire/latency with bench/lean.py, the thinnest client with the same "
        "wire guarantees: where this broker's limit is on this machine",
    )
    p.add_argument(
        "--signing",
        action="store_true",
        help="also run rpc/fire/latency with signing keys on producer and worker "
        "(aioqueue-signed), for the cost of signed messages",
    )
    p.add_argument(
        "--otel",
        action="store_true",
        help="also run rpc/fire/latency with a tracer provider configured in the aioqueue "
        "worker and producer (aioqueue-otel), for the cost of tracing (the default runs have "
        "the otel extra installed and no provider: tracing off)",
    )
    p.add_argument(
        "--json",
        type=Path,
        help="result file (default bench/results/latest.json, with --cluster .../cluster.json)",
    )
    args = p.parse_args(argv)
    if args.json is None:
        args.json = RESULTS / ("cluster.json" if args.cluster else "latest.json")
    if args.cluster and args.with_cluster:
        p.error("--cluster runs only the cluster run; --with-cluster adds it to the suite")
    if args.cluster_runs is None:
        args.cluster_runs = args.runs
    if args.cluster_runs < 1:
        p.error("--cluster-runs must be at least 1")
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


def environment(url: str | None, args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    """What ran where; without ``url`` (no broker came up) the broker's version is unknown."""

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
        "broker": server_version(url) if url else dict.fromkeys(("product", "version"), "?"),
        "runs": args.runs,
        "quick": args.quick,
        "quiet_wait": args.quiet_wait,
        "workloads": args.only,
        "sizes": asdict(sizes),
    }


def render(
    suite: Suite | None,
    profile: dict[str, Any] | None,
    meta: dict[str, Any],
    clustered: dict[str, Any] | None = None,
) -> str:
    broker_info = meta["broker"]
    parts = [
        f"## aioqueue benchmark ({'quick, ' if meta['quick'] else ''}{meta['runs']} run(s))",
        "",
        f"{meta['cpus']} CPUs, Python {meta['python']} on {meta['loop']}, "
        f"{broker_info['product']} {broker_info['version']}, "
        f"aio-pika {meta['packages']['aio-pika']}, aiormq {meta['packages']['aiormq']}",
    ]
    anomalies: list[str] = []
    if suite is not None:
        parts += ["", report.markdown(report.rows(suite.measured, suite.sizes))]
        for paired in (
            report.lean_markdown,
            report.events_markdown,
            report.signing_markdown,
            report.otel_markdown,
        ):
            table = paired(suite.measured)
            if table:
                parts += ["", table]
        split = cpu_markdown(suite.measured, meta["cpus"] or 1)
        if split:
            parts += ["", split]
        runs = report.per_run(suite.measured, BUSY_CORES)
        if runs:
            parts += ["", f"Per run ({_MARKS}):"]
            parts += [runs]
        anomalies += suite.anomalies
    if profile:
        parts += ["", _profile_table(profile)]
    if clustered is not None:
        parts += ["", _cluster_section(clustered, meta)]
        anomalies += clustered["anomalies"]
    if anomalies:
        parts += ["", "Anomalies:", *(f"- {a}" for a in anomalies)]
    parts += ["", f"Total wall time: {meta['wall_seconds'] / 60:.1f} min"]
    return "\n".join(parts)


_MARKS = (
    f"* = other processes used > {BUSY_CORES} cores meanwhile, † = the hypervisor stole "
    f"> {report.STOLEN_PCT:g} % of the CPU time (steal, /proc/stat)"
)


def _cluster_section(clustered: dict[str, Any], meta: dict[str, Any]) -> str:
    info = clustered["meta"]
    sizes = Sizes(**meta["sizes"])
    table = [report.ClusterRow(**row) for row in clustered["table"]]
    parts = [report.cluster_markdown(table, sizes, meta["cpus"])]
    if clustered["measurements"]:
        parts += [
            "",
            f"Cluster per run ({info['runs']} run(s), {_MARKS}):",
            report.per_run(clustered["measurements"], BUSY_CORES),
        ]
        split = cpu_markdown(clustered["measurements"], meta["cpus"] or 1)
        if split:
            parts += ["", "Cluster (all three nodes on this machine): " + split]
    parts += ["", f"Cluster run wall time: {info['wall_seconds'] / 60:.1f} min"]
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
        f"Hottest functions of the aioqueue {process} during {profile['workload']} (py-spy, "
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


def run_cluster(
    args: argparse.Namespace, sizes: Sizes, logs: Path, single: Suite | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The cluster run: (its part of the result document, the environment if it was the first
    to learn the broker's version). A cluster that does not start is an anomaly, not a crash."""
    started = time.monotonic()
    info: dict[str, Any] = {
        "nodes": NODES,
        "queue_type": "quorum",
        "runs": args.cluster_runs,
        "workloads": list(CLUSTERED),
        "producer_node": 1,
    }
    meta: dict[str, Any] | None = None
    suite: Suite | None = None
    anomalies: list[str] = []
    try:
        with cluster() as (urls, pids):
            info["urls"] = urls
            info["broker_pids"] = list(pids)
            if len(pids) < len(urls):
                progress("not every node's process is visible: its CPU counts as 'other'")
            info["broker"] = server_version(urls[0])
            if single is None:  # --cluster: no single-node workloads
                meta = environment(urls[0], args, sizes) | {
                    "runs": args.cluster_runs,
                    "workloads": [],
                }
            suite = Suite(
                urls[0],
                sizes,
                logs,
                broker_pid=pids or None,
                quiet_wait=args.quiet_wait,
                queue_type="quorum",
                prefix="cluster-",
            )
            suite.run_cluster(urls, args.cluster_runs)
    except BenchError as exc:
        anomalies.append(f"cluster: {exc}")
    measured = suite.measured if suite is not None else {}
    table = report.cluster_rows(measured, single.measured if single else None, NODES)
    info["wall_seconds"] = time.monotonic() - started
    return {
        "meta": info,
        "table": [asdict(row) for row in table],
        "measurements": measured,
        "anomalies": [*(suite.anomalies if suite else []), *anomalies],
    }, meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    sizes = Sizes.quick() if args.quick else Sizes()
    logs = RESULTS / "logs"
    cluster_logs = logs / "cluster"
    shutil.rmtree(cluster_logs if args.cluster else logs, ignore_errors=True)
    cluster_logs.mkdir(parents=True)
    profile: dict[str, Any] | None = None
    suite: Suite | None = None
    meta: dict[str, Any] | None = None
    if not args.cluster:
        with broker(args.broker_url) as (url, broker_pid):
            meta = environment(url, args, sizes)
            suite = Suite(url, sizes, logs, broker_pid=broker_pid, quiet_wait=args.quiet_wait)
            suite.run(
                args.only,
                args.runs,
                events=args.events,
                signing=args.signing,
                otel=args.otel,
                lean=args.lean,
            )
            if args.profile:
                try:
                    profile = suite.profile(
                        RESULTS / f"profile-{args.profile}-aioqueue.txt", workload=args.profile
                    )
                except BenchError as exc:
                    suite.anomalies.append(f"profile: {exc}")
    clustered: dict[str, Any] | None = None
    if args.cluster or args.with_cluster:
        clustered, cluster_meta = run_cluster(args, sizes, cluster_logs, suite)
        meta = meta or cluster_meta
    if meta is None:  # --cluster, and the cluster never came up
        meta = environment(None, args, sizes)
    meta["wall_seconds"] = time.monotonic() - started
    print(render(suite, profile, meta, clustered), flush=True)
    document: dict[str, Any] = {"meta": meta}
    if suite is not None:
        document |= {
            "table": [asdict(row) for row in report.rows(suite.measured, sizes)],
            "measurements": suite.measured,
            "profile": profile,
            "anomalies": suite.anomalies,
        }
    if clustered is not None:
        document["cluster"] = clustered
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    progress(f"results written to {args.json}")
    measured = [suite.measured] if suite else []
    if clustered is not None:
        measured.append(clustered["measurements"])
    errors = any(
        "error" in r for m in measured for s in m.values() for rs in s.values() for r in rs
    )
    cluster_failed = clustered is not None and not clustered["measurements"]
    return 1 if errors or cluster_failed else 0
