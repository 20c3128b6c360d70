"""The benchmark's OS processes: workers, producers, and an optional py-spy profiler.

Every process runs from the repository root with the bench environment: the broker URL in
``$AIOQUEUE_BROKER_URL``, the measurement's queue in ``$AIOQUEUE_BENCH_QUEUE`` and its type
(``classic`` or ``quorum``, for both systems) in ``$AIOQUEUE_BENCH_QUEUE_TYPE``. This module
does not import aioqueue: the orchestrating process keeps working while aioqueue is mid-edit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import orjson

__all__ = [
    "QUEUE_ENV",
    "QUEUE_TYPE_ENV",
    "BenchError",
    "System",
    "Worker",
    "profiled",
    "run_producer",
    "start_worker",
]

ROOT = Path(__file__).resolve().parent.parent
QUEUE_ENV = "AIOQUEUE_BENCH_QUEUE"  # the measurement's queue, for bench/tasks.py
QUEUE_TYPE_ENV = "AIOQUEUE_BENCH_QUEUE_TYPE"  # "classic" (default) or "quorum", both systems
OTEL_ENV = "AIOQUEUE_BENCH_OTEL"  # "1": bench/tasks.py configures a tracer provider
RAW_PREFETCH_ENV = "AIOQUEUE_BENCH_RAW_PREFETCH"  # raw's and lean's prefetch (bench/raw.py)
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0

# "aioqueue-no-events": the aioqueue worker with --no-events (python -m bench --events);
# "aioqueue-signed": producer and worker with signing keys (python -m bench --signing);
# "aioqueue-otel": worker and producer with a tracer provider configured (python -m bench --otel)
System = Literal[
    "raw", "lean", "aioqueue", "aioqueue-no-events", "aioqueue-signed", "aioqueue-otel"
]
# the benchmark's signing keys (not a secret: they sign only its own messages)
SIGNING_KEYS = f"bench2:{'b2' * 32},bench1:{'b1' * 32}"


class BenchError(RuntimeError):
    """A measurement could not be taken (a process failed, hung, or answered nonsense)."""


def bench_env(
    url: str, queue: str, queue_type: str = "classic", system: str = "aioqueue"
) -> dict[str, str]:
    env = {**os.environ, "AIOQUEUE_BROKER_URL": url, QUEUE_ENV: queue, QUEUE_TYPE_ENV: queue_type}
    env.pop("AIOQUEUE_SIGNING_KEYS", None)
    if system == "aioqueue-signed":  # bench/tasks.py's App reads them from the environment
        env["AIOQUEUE_SIGNING_KEYS"] = SIGNING_KEYS
    env.pop(OTEL_ENV, None)
    if system == "aioqueue-otel":
        env[OTEL_ENV] = "1"
    return env


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Worker:
    """A worker process of either system, its output in ``log``."""

    def __init__(
        self,
        system: System,
        url: str,
        queue: str,
        log: Path,
        queue_type: str = "classic",
        raw_prefetch: int = 100,
    ) -> None:
        if system == "lean":
            command = ["-m", "bench.lean", url, queue]
        elif system != "raw":
            command = [
                *("-m", "aioqueue.worker", "bench.tasks:app"),
                *("--concurrency", "100", "--prefetch", str(raw_prefetch)),
                *("--log-level", "WARNING", "--broker-url", url),
                *(["--no-events"] if system == "aioqueue-no-events" else []),
            ]
        else:
            command = ["-m", "bench.raw", url, queue]
        self.system = system
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *command],
                cwd=ROOT,
                env={
                    **bench_env(url, queue, queue_type, system),
                    RAW_PREFETCH_ENV: str(raw_prefetch),
                },
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        """Block until the worker printed its "ready" banner (it consumes from then on)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while "ready" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise BenchError(f"{self.system} worker exited early:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"{self.system} worker not ready after {READY_TIMEOUT:g}s")
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL after `STOP_TIMEOUT`); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def complaints(self) -> list[str]:
        """Warnings, errors and tracebacks the worker logged (it runs at WARNING level).

        The aioqueue worker's own notice of the SIGTERM that stopped it is no complaint.
        """
        words = ("WARNING", "ERROR", "CRITICAL", "Traceback")
        lines = self.log.read_text(errors="replace").splitlines()
        return [
            line
            for line in lines
            if any(word in line for word in words) and "received SIGTERM" not in line
        ]


@contextlib.contextmanager
def start_worker(
    system: System,
    url: str,
    queue: str,
    log: Path,
    queue_type: str = "classic",
    raw_prefetch: int = 100,
) -> Iterator[Worker]:
    """A ready worker for the block; stopped (SIGTERM) when it ends."""
    worker = Worker(system, url, queue, log, queue_type, raw_prefetch)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def run_producer(
    spec: dict[str, Any], *, timeout: float, profile: Path | None = None
) -> dict[str, Any]:
    """Run ``python -m bench.producer`` for one measurement and return its JSON result.

    With ``profile``, the producer runs under ``py-spy record`` (collapsed stacks there).
    """
    command = [sys.executable, "-m", "bench.producer", orjson.dumps(spec).decode()]
    if profile is not None:
        command = [*_py_spy_record(profile), "--", *command]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=bench_env(
                spec["url"], spec["queue"], spec.get("queue_type", "classic"), spec["system"]
            ),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        what = f"{spec['system']} {spec['workload']}"
        raise BenchError(f"{what}: no result within {timeout:g}s") from None
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip().splitlines()[-15:]
        raise BenchError(
            f"{spec['system']} {spec['workload']}: producer exited {done.returncode}:\n"
            + "\n".join(stderr)
        )
    # the result is the last JSON line (py-spy, when profiling, writes lines of its own)
    lines = [line for line in done.stdout.splitlines() if line.startswith(b"{")]
    if not lines:
        raise BenchError(f"{spec['system']} {spec['workload']}: the producer printed no result")
    result: dict[str, Any] = orjson.loads(lines[-1])
    return result


def py_spy() -> str | None:
    """The py-spy executable (on PATH or next to this Python), if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _py_spy_record(out: Path, *, rate: int = 250) -> list[str]:
    exe = py_spy()
    if exe is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return [
        *(exe, "record", "--rate", str(rate), "--format", "raw"),
        *("--function", "--nonblocking", "--output", str(out)),
    ]


@contextlib.contextmanager
def profiled(pid: int, out: Path, *, rate: int = 250) -> Iterator[None]:
    """Sample ``pid`` with ``py-spy record`` (collapsed stacks by function) during the block."""
    command = [*_py_spy_record(out, rate=rate), "--pid", str(pid)]
    with out.with_suffix(".log").open("wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    time.sleep(0.5)  # let it attach before the work starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
