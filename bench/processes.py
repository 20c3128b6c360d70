"""``python -m bench.processes [--runs 3] [--tasks 1000] [--broker-url URL]``: what
``aioqueue worker --processes N`` buys.

Two workloads, each with 1 and then 2 worker processes, interleaved run by run (medians):

- ``cpu``: ``bench.burn``, a plain function doing a fixed amount of pure Python, calibrated
  here to ~5 ms of CPU (it holds the GIL: threads of one process cannot run two at once,
  processes can). Figure: tasks/s until every result is back. Target (issue 20): 2 processes
  ≥ 1.6 x 1 process.
  Each process runs them with ``--concurrency 2``, as docs/deploying.md advises for CPU-bound
  tasks (dozens of threads would only contend for the GIL), and ``--prefetch 16`` so that the
  next task is in hand when a thread comes free. All are submitted at once.
- ``fire``: ``bench.fire`` as in the main suite (20,000 confirmed submits, timed until executed).
  Reported, not targeted: the broker shares the same cores.

Prints a Markdown table on stdout and writes ``bench/results/processes.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from .cli import broker
from .cpu import CpuSplit, children
from .loop import loop_name
from .machine import stolen_and_total
from .procs import ROOT, BenchError, bench_env, tail
from .report import STOLEN_PCT

RESULTS = ROOT / "bench" / "results"
TARGET = 1.6
CPU_CONCURRENCY = 2  # per process, for the cpu workload (docs/deploying.md)
CPU_PREFETCH = 16  # tasks in hand per process: the next one is there when a thread is free


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.processes", description=__doc__)
    p.add_argument("--runs", type=int, default=3, help="runs of each (median; 3)")
    p.add_argument("--tasks", type=int, default=1000, help="cpu tasks per run (1,000)")
    p.add_argument("--fire", type=int, default=20000, help="fire tasks per run (20,000)")
    p.add_argument("--broker-url", help="use this broker instead of starting a private node")
    p.add_argument("--json", type=Path, default=RESULTS / "processes.json")
    return p.parse_args(argv)


async def _start_worker(url: str, queue: str, processes: int, log: Path, concurrency: int) -> Any:
    out = log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        *(".venv/bin/python", "-m", "aioqueue.worker", "bench.tasks:app"),
        *("--processes", str(processes), "--concurrency", str(concurrency)),
        *(("--prefetch", str(CPU_PREFETCH)) if concurrency == CPU_CONCURRENCY else ()),
        *("--log-level", "WARNING", "--broker-url", url),
        cwd=ROOT,
        env=bench_env(url, queue),
        stdout=out,
        stderr=asyncio.subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while (await asyncio.to_thread(log.read_text, errors="replace")).count(" ready\n") < processes:
        if proc.returncode is not None or time.monotonic() > deadline:
            proc.kill()
            raise BenchError(f"worker with {processes} process(es) not ready:\n{tail(log)}")
        await asyncio.sleep(0.05)  # sleep-ok: polling another process's log for its banner
    return proc, out


async def _stop(proc: Any, out: Any) -> None:
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
        out.close()


def calibrate(ms: float = 5.0) -> int:
    """How many rounds of `bench.tasks.spin` take ``ms`` of CPU in this process (the fastest
    of several tries, so a busy moment does not inflate it)."""
    from .tasks import spin

    rounds = 1000
    best = min(_cpu_seconds(spin, rounds) for _ in range(7))
    return max(1, round(rounds * ms / 1000 / best))


def _cpu_seconds(work: Any, rounds: int) -> float:
    started = time.process_time()
    work(rounds)
    return time.process_time() - started


async def _cpu(app: Any, tasks: int, spins: int) -> float:
    started = time.perf_counter()
    # all at once: submitted one by one, each waiting for its confirm while the workers hold
    # both cores, the submitting, not the workers, set the pace
    handles = await asyncio.gather(*(app.submit("bench.burn", spins) for _ in range(tasks)))
    for handle in handles:
        await handle.result(timeout=300)
    return tasks / (time.perf_counter() - started)


async def _fire(app: Any, tasks: int) -> float:
    started = time.perf_counter()
    # by name from an app that did not register it: without ignore_result each would ask for
    # a reply (and this would measure round trips, not fire)
    fire = functools.partial(app.submit_with_options, "bench.fire", ignore_result=True)
    await asyncio.gather(*(fire() for _ in range(tasks)))
    counts: dict[int, int] = {}
    deadline = time.monotonic() + 300
    while sum(counts.values()) < tasks:  # each process's latest count, by pid
        if time.monotonic() > deadline:
            raise BenchError(f"fire: {sum(counts.values())} of {tasks} executed")
        pid, count = await (await app.submit("bench.executed")).result(timeout=300)
        counts[pid] = count
    return tasks / (time.perf_counter() - started)


async def _one(
    url: str, processes: int, workload: str, args: argparse.Namespace, spins: int, broker: int
) -> tuple[float, dict[str, float]]:
    """The rate of one run, and the cores each part used meanwhile (workers: the supervisor
    and its processes; the broker; this process, the producer)."""
    from aioqueue import App

    queue = f"bench.procs.{uuid.uuid4().hex[:8]}"
    log = RESULTS / "logs" / f"processes-{workload}-{processes}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # CPU-bound plain functions as docs/deploying.md runs them: a few threads per process
    # (more only contend for the GIL); the fire tasks with the worker's default
    concurrency = CPU_CONCURRENCY if workload == "cpu" else 100
    proc, out = await _start_worker(url, queue, processes, log, concurrency)
    try:
        async with App("bench-procs", broker_url=url, default_queue=queue) as app:
            workers = [proc.pid, *children(proc.pid)]
            split = CpuSplit({"workers": workers, "broker": [broker], "producer": [os.getpid()]})
            started = time.perf_counter()
            split.start()
            if workload == "cpu":
                rate = await _cpu(app, args.tasks, spins)
            else:
                rate = await _fire(app, args.fire)
            wall = time.perf_counter() - started
            cores = {role: spent / wall for role, spent in split.seconds().items()}
            await app.broker.delete_queue(queue)
        return rate, cores
    finally:
        await _stop(proc, out)


async def measure(url: str, args: argparse.Namespace, broker: int = 0) -> dict[str, Any]:
    figures: dict[str, dict[int, list[float]]] = {"cpu": {1: [], 2: []}, "fire": {1: [], 2: []}}
    used: list[dict[str, Any]] = []  # the cores each part used, run by run
    spins = calibrate()
    print(f"cpu task: bench.burn({spins:,}), ~5 ms of CPU here", flush=True)
    for run in range(args.runs):
        for workload, by_count in figures.items():
            for processes in (1, 2) if run % 2 == 0 else (2, 1):  # interleaved
                before = stolen_and_total()
                rate, cores = await _one(url, processes, workload, args, spins, broker)
                used.append({"run": run + 1, "workload": workload, "processes": processes, **cores})
                after = stolen_and_total()
                stolen = 100 * (after[0] - before[0]) / max(after[1] - before[1], 1e-9)
                by_count[processes].append(rate)
                mark = f" † the hypervisor stole {stolen:.1f} % of the CPU time" * (
                    stolen > STOLEN_PCT
                )
                shares = ", ".join(f"{role} {n:.2f}" for role, n in cores.items())
                print(
                    f"run {run + 1} {workload} x{processes}: {rate:,.0f}/s (cores: {shares}){mark}",
                    flush=True,
                )
    medians = {w: {n: statistics.median(v) for n, v in c.items()} for w, c in figures.items()}
    return {
        "runs": figures,
        "median": medians,
        "cores": used,
        "loop": loop_name(),
        "burn_spins": spins,
    }


def table(result: dict[str, Any]) -> str:
    m = result["median"]
    rows = ["| workload | 1 process | 2 processes | ratio | target |", "|---|---|---|---|---|"]
    for workload, target in (("cpu", f"≥ {TARGET}x"), ("fire", "reported")):
        one, two = m[workload][1], m[workload][2]
        rows.append(f"| {workload} | {one:,.0f}/s | {two:,.0f}/s | {two / one:.2f}x | {target} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aioqueue.cli.common import run

    with broker(args.broker_url) as (url, pid):
        result = run(measure(url, args, pid or 0))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    args.json.write_bytes(orjson.dumps(result, option=options))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
