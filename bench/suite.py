"""The plan: which process runs when, interleaving the two systems, cleaning up after each.

One measurement = a fresh queue, a fresh worker process (none for ``backlog``), a fresh producer
process that connects, warms up and measures, then the worker is stopped (SIGTERM) and the
queues are deleted. rpc, fire and latency run both systems in every run, alternating which goes
first; soak and backlog run aioqueue once.

The cluster run (`Suite.run_cluster`) measures rpc and fire on quorum queues of a 3-node cluster
with 1, 2 and 3 aioqueue workers (worker k on node k, the producer on node 1), and the raw
baseline once per run with one worker on node 1.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .admin import delete_queues
from .machine import BrokerPids, CpuWatch, wait_until_quiet
from .procs import BenchError, System, profiled, run_producer, start_worker
from .profile import Hot, hot_functions
from .report import STOLEN_PCT, Measurements
from .workloads import Sizes

__all__ = ["CLUSTERED", "COMPARED", "ONCE", "Suite", "cluster_key"]

COMPARED = ("rpc", "fire", "latency")  # both systems, median of the runs
CLUSTERED = ("rpc", "fire")  # the cluster run's workloads
ONCE = ("soak", "backlog", "ratelimit")  # aioqueue alone, once
PRODUCER_TIMEOUT = {
    "rpc": 300,
    "fire": 300,
    "latency": 300,
    "soak": 1200,
    "backlog": 1200,
    "ratelimit": 300,
}
WORKER_PROCESSES = {"ratelimit": 2}  # one otherwise: the limit is measured across two
RAW_FIRE_PREFETCH = 1000  # raw's fire at its strongest (issue 20), and every other system's
# worker's in fire too (aioqueue's with --concurrency 100); rpc and latency: 100
BUSY_CORES = 0.25  # other processes using more CPU than this meanwhile: an anomaly
PROFILE_FACTOR = 4  # the profiled rpc run is this many times longer, for enough samples


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cluster_key(system: System, workers: int) -> str:
    """The cluster run's name for a system with that many workers: ``aioqueue-2``, ``raw-1``."""
    return f"{system}-{workers}"


def headline(workload: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return "error"
    if workload == "latency":
        return f"p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms"
    if workload in ("soak", "backlog"):
        growth = result.get("worker_growth_mb", result["producer_growth_mb"])
        return f"{result['rate']:,.0f} tasks/s, RSS growth {growth:+.1f} MB"
    return f"{result['rate']:,.0f} tasks/s in {result['seconds']:.2f} s"


class Suite:
    """Runs measurements against one broker and keeps their results and anomalies."""

    def __init__(
        self,
        url: str,
        sizes: Sizes,
        logs: Path,
        *,
        broker_pid: BrokerPids,
        quiet_wait: float = 0.0,
        queue_type: str = "classic",
        prefix: str = "",
    ) -> None:
        self.url = url
        self.queue_type = queue_type
        self.prefix = prefix  # of measurement names (log files, anomalies)
        self.broker_pid = broker_pid
        self.quiet_wait = quiet_wait
        self.sizes = sizes
        self.logs = logs
        self.measured: Measurements = {}
        self.anomalies: list[str] = []

    def run(
        self,
        workloads: list[str],
        runs: int,
        *,
        events: bool = False,
        signing: bool = False,
        otel: bool = False,
        lean: bool = False,
    ) -> None:
        """The compared workloads interleaved run by run, then the once-only ones.

        ``events``: also the aioqueue worker with task events off (``aioqueue-no-events``),
        interleaved with the others, for the cost of task events. ``signing``: also aioqueue
        with signing keys on both sides (``aioqueue-signed``), for the cost of signed messages.
        ``otel``: also aioqueue with a tracer provider configured (``aioqueue-otel``), for the
        cost of tracing.
        """
        compared = [w for w in COMPARED if w in workloads]
        systems: list[System] = ["raw", "aioqueue"]
        if lean:
            systems.append("lean")
        if events:
            systems.append("aioqueue-no-events")
        if signing:
            systems.append("aioqueue-signed")
        if otel:
            systems.append("aioqueue-otel")
        for run in range(runs):
            for workload in compared:
                for system in systems if run % 2 == 0 else systems[::-1]:
                    self.record(workload, system, run, runs)
        for workload in ONCE:
            if workload in workloads:
                self.record(workload, "aioqueue", 0, 1)

    def run_cluster(self, worker_urls: list[str], runs: int) -> None:
        """rpc and fire on the cluster, run by run: aioqueue with 1..n workers (worker k on
        ``worker_urls[k - 1]``), raw with one worker on the first node; the order alternates."""
        setups: list[tuple[System, int]] = [("raw", 1)]
        setups += [("aioqueue", n) for n in range(1, len(worker_urls) + 1)]
        for run in range(runs):
            for workload in CLUSTERED:
                for system, n in setups if run % 2 == 0 else setups[::-1]:
                    self.record(workload, system, run, runs, workers=worker_urls[:n])

    def record(
        self,
        workload: str,
        system: System,
        run: int,
        runs: int,
        *,
        workers: list[str] | None = None,
    ) -> None:
        """One measurement, kept under the system's name (with ``workers``: the worker URLs,
        under `cluster_key`)."""
        key = system if workers is None else cluster_key(system, len(workers))
        result = self.measure(workload, system, run, workers=workers)
        self.measured.setdefault(workload, {}).setdefault(key, []).append(result)
        tag = f"{self.prefix}{workload} {run + 1}/{runs}"
        progress(f"[{tag}] {key:>10}: {headline(workload, result)}")

    def _spec(
        self, workload: str, system: System, name: str, sizes: Sizes, workers: int = 1
    ) -> dict[str, Any]:
        """What `bench.producer` is to do, on a queue of its own."""
        return {
            "system": system,
            "workload": workload,
            "url": self.url,
            "queue": f"bench.{name}.{secrets.token_hex(3)}",
            "queue_type": self.queue_type,
            "workers": workers,
            "sizes": asdict(sizes),
        }

    def measure(
        self, workload: str, system: System, run: int, *, workers: list[str] | None = None
    ) -> dict[str, Any]:
        """One measurement in fresh processes on a fresh queue; errors become a result.

        ``workers``: one worker process per URL (default: one on the suite's URL).
        """
        urls = workers or [self.url] * WORKER_PROCESSES.get(workload, 1)
        key = system if workers is None else cluster_key(system, len(urls))
        name = f"{self.prefix}{workload}-{key}-{run}"
        spec = self._spec(workload, system, name, self.sizes, len(urls))
        queue = spec["queue"]
        queues = [queue, f"{queue}.dlq"]
        if self.quiet_wait > 0:
            waited = wait_until_quiet(self.broker_pid, limit=self.quiet_wait, threshold=BUSY_CORES)
            if waited >= self.quiet_wait:
                progress(f"[{name}] the machine stayed busy for {waited:.0f} s; measuring anyway")
        try:
            with CpuWatch(self.broker_pid) as watch:
                result = self._take(spec, name, urls)
            queues += result.pop("queues", [])
            result["machine"] = machine = watch.summary()
            if machine["steal_pct"] > STOLEN_PCT:
                self.anomalies.append(
                    f"{name}: the hypervisor stole {machine['steal_pct']:.1f} % of the CPU time "
                    "meanwhile (figures skewed)"
                )
            if machine["other_cores"] > BUSY_CORES:
                self.anomalies.append(
                    f"{name}: other processes used {machine['other_cores']:.2f} cores on "
                    "average meanwhile (figures skewed)"
                )
        except BenchError as exc:
            self.anomalies.append(f"{name}: {exc}")
            result = {"error": str(exc)}
        left = delete_queues(self.url, queues)
        expected = (
            {queue: self.sizes.backlog} if workload == "backlog" and "error" not in result else {}
        )
        self._check_left(name, left, expected)
        return result

    def _take(self, spec: dict[str, Any], name: str, urls: list[str]) -> dict[str, Any]:
        """Run the producer (with a ready worker per URL unless the workload is backlog)."""
        timeout = PRODUCER_TIMEOUT[spec["workload"]]
        if spec["workload"] == "backlog":  # no worker on purpose
            return run_producer(spec, timeout=timeout)
        system, queue = spec["system"], spec["queue"]
        with contextlib.ExitStack() as stack:
            started = [
                stack.enter_context(
                    start_worker(
                        system,
                        url,
                        queue,
                        self.logs / (f"{name}.log" if len(urls) == 1 else f"{name}-w{k}.log"),
                        self.queue_type,
                        # every system's worker alike (aioqueue's: --prefetch)
                        raw_prefetch=RAW_FIRE_PREFETCH if spec["workload"] == "fire" else 100,
                    )
                )
                for k, url in enumerate(urls, 1)
            ]
            pids = {
                "worker_pid": started[0].pid,
                "worker_pids": [w.pid for w in started],
                "broker_pids": _pids(self.broker_pid),
            }
            result = run_producer({**spec, **pids}, timeout=timeout)
        for k, w in enumerate(started, 1):
            who = name if len(started) == 1 else f"{name} worker {k}"
            self._check_worker(who, w.proc.returncode, w.complaints())
        return result

    def profile(self, out: Path, top: int = 15, *, workload: str = "rpc") -> dict[str, Any]:
        """An extra, unscored aioqueue run of ``workload`` (rpc or fire) with py-spy on the
        worker and on the producer: the hottest functions of each (the producer's stacks go
        next to ``out``)."""
        longer = getattr(self.sizes, workload) * PROFILE_FACTOR
        sizes = Sizes(**{**asdict(self.sizes), workload: longer})
        spec = self._spec(workload, "aioqueue", "profile", sizes)
        queue = spec["queue"]
        producer_out = out.with_name(f"{out.stem}-producer{out.suffix}")
        with start_worker("aioqueue", self.url, queue, self.logs / "profile.log") as worker:
            with profiled(worker.pid, out):
                result = run_producer(
                    spec, timeout=PRODUCER_TIMEOUT[workload], profile=producer_out
                )
        delete_queues(self.url, [queue, f"{queue}.dlq", *result.pop("queues", [])])
        samples, hot = hot_functions(out, top)
        producer_samples, producer_hot = hot_functions(producer_out, top)
        progress(
            f"[profile] aioqueue worker: {samples} samples, {workload} {headline(workload, result)}"
        )
        return {
            "workload": workload,
            "samples": samples,
            workload: result,
            "file": str(out),
            "top": _as_dicts(hot),
            "producer": {
                "workload": workload,
                "samples": producer_samples,
                "file": str(producer_out),
                "top": _as_dicts(producer_hot),
            },
        }

    def _check_worker(self, name: str, status: int | None, complaints: list[str]) -> None:
        if status != 0:
            self.anomalies.append(f"{name}: the worker exited with status {status} on SIGTERM")
        if complaints:
            shown = "\n    ".join(complaints[:5])
            self.anomalies.append(
                f"{name}: the worker logged {len(complaints)} line(s):\n    {shown}"
            )

    def _check_left(self, name: str, left: dict[str, int], expected: dict[str, int]) -> None:
        """Every queue must hold what the workload left on purpose (backlog), nothing else."""
        for queue, count in left.items():
            if count != expected.get(queue, 0):
                self.anomalies.append(f"{name}: {count} message(s) left in {queue}")


def _pids(broker: BrokerPids) -> list[int]:
    return [broker] if isinstance(broker, int) else list(broker or ())


def _as_dicts(hot: list[Hot]) -> list[dict[str, Any]]:
    return [asdict(h) for h in hot]
