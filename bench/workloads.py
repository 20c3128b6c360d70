"""The measurements, run inside the producer process against either system through `Client`.

Every workload starts its clock after the client is connected and warmed up (the worker was
ready before the producer started), and checks what it measured: each RPC reply carries its
own argument back, and "fire" counts executions in the worker rather than trusting publishes.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = [
    "Client",
    "Sizes",
    "backlog",
    "fire",
    "latency",
    "ratelimit",
    "rpc",
    "rss_mb",
    "soak",
    "warm_up",
]


class Client(Protocol):
    """One producer's view of a system under test (aioqueue or the raw aio-pika baseline)."""

    async def call(self, i: int) -> int:
        """Submit ``noop(i)`` and wait for its reply (``i``)."""

    async def send(self) -> None:
        """Submit a ``fire`` task (no reply); returns once the broker confirmed it."""

    async def executed(self) -> int:
        """Ask the worker, through the queue, how many ``fire`` tasks it has run."""

    async def limited(self) -> float:
        """Submit the rate-limited task and wait for its reply: when it started (wall time)."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How many tasks each workload uses; `quick` shrinks them ten-fold for a smoke run."""

    warmup: int = 200
    rpc: int = 5_000
    fire: int = 20_000
    latency: int = 2_000
    soak: int = 200_000
    soak_window: int = 1_000
    soak_mark: int = 20_000
    soak_every: int = 10_000
    soak_rpc_every: int = 4  # every 4th soak task is a round trip, the rest fire-and-forget
    backlog: int = 100_000
    backlog_mark: int = 10_000
    backlog_every: int = 10_000
    ratelimit: int = 600  # tasks of bench.limited (50/s) through two worker processes

    @classmethod
    def quick(cls) -> Sizes:
        keep = ("soak_rpc_every", "ratelimit")  # a rate limit's run is short anyway
        counts = {k: max(1, v // 10) for k, v in asdict(cls()).items() if k not in keep}
        return cls(**counts)


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process (default: this one) in MiB, from ``/proc``."""
    status = f"/proc/{pid or os.getpid()}/status"
    with open(status) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in {status}")


async def warm_up(client: Client, n: int) -> None:
    """Sequential round trips, so connections, queues and caches are hot before timing."""
    for i in range(n):
        await client.call(i)


async def rpc(client: Client, n: int) -> dict[str, Any]:
    """Throughput of ``n`` concurrent submit→result round trips (tasks/s)."""
    start = time.perf_counter()
    values = await asyncio.gather(*(client.call(i) for i in range(n)))
    seconds = time.perf_counter() - start
    if values != list(range(n)):
        raise RuntimeError("rpc: some replies did not match their task")
    return {"tasks": n, "seconds": seconds, "rate": n / seconds}


async def fire(client: Client, n: int) -> dict[str, Any]:
    """Throughput of ``n`` fire-and-forget tasks, until the worker has *executed* them all.

    All ``n`` are submitted concurrently (each awaits its confirm); then the worker's execution
    counter is asked through the same queue until it shows all ``n`` (each query waits behind
    the remaining backlog, so this polls at most a few times).
    """
    before = await client.executed()
    start = time.perf_counter()
    await asyncio.gather(*(client.send() for _ in range(n)))
    published = time.perf_counter() - start
    polls = 1
    while await client.executed() < before + n:
        polls += 1
    seconds = time.perf_counter() - start
    return {
        "tasks": n,
        "seconds": seconds,
        "rate": n / seconds,
        "publish_seconds": published,
        "polls": polls,
    }


async def latency(client: Client, n: int) -> dict[str, Any]:
    """Round-trip time of ``n`` sequential submit→result calls: p50, p99, mean, max (ms)."""
    samples: list[float] = []
    begin = time.perf_counter()
    for i in range(n):
        start = time.perf_counter()
        await client.call(i)
        samples.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "round_trips": n,
        "seconds": time.perf_counter() - begin,
        "p50_ms": statistics.median(samples),
        "p99_ms": cuts[98],
        "mean_ms": statistics.fmean(samples),
        "max_ms": max(samples),
    }


async def soak(
    client: Client,
    n: int,
    *,
    window: int,
    mark: int,
    every: int,
    rpc_every: int,
    worker_pid: int,
) -> dict[str, Any]:
    """``n`` tasks through one worker, ``window`` lanes at a time; RSS of both sides over time.

    Every ``rpc_every``-th task is a round trip (checked), the others fire-and-forget: both the
    reply path and the plain execute-and-ack path run for the whole soak, and the round trips
    (queued behind the fire tasks) keep the queue's backlog bounded. Worker and producer RSS are
    sampled after warm-up, every ``every`` tasks and once the worker has executed everything;
    the verdict is the worker's growth between ``mark`` tasks (steady state) and the end.
    """
    start = time.perf_counter()
    samples: list[dict[str, float]] = []

    def sample(done: int) -> None:
        samples.append(
            {
                "tasks": done,
                "seconds": time.perf_counter() - start,
                "worker_rss_mb": rss_mb(worker_pid),
                "producer_rss_mb": rss_mb(),
            }
        )

    fired_before = await client.executed()
    issued = done = fired = 0

    async def lane() -> None:
        nonlocal issued, done, fired
        while issued < n:
            i = issued
            issued += 1
            if i % rpc_every == 0:
                if await client.call(i) != i:
                    raise RuntimeError("soak: a reply did not match its task")
            else:
                fired += 1
                await client.send()
            done += 1
            if done % every == 0 and done < n:
                sample(done)

    sample(0)
    await asyncio.gather(*(lane() for _ in range(min(window, n))))
    while await client.executed() < fired_before + fired:
        pass
    sample(n)
    seconds = time.perf_counter() - start
    at_mark = _at(samples, mark)
    end = samples[-1]
    return {
        "tasks": n,
        "round_trips": n - fired,
        "seconds": seconds,
        "rate": n / seconds,
        "mark": mark,
        "worker_growth_mb": end["worker_rss_mb"] - at_mark["worker_rss_mb"],
        "producer_growth_mb": end["producer_rss_mb"] - at_mark["producer_rss_mb"],
        "samples": samples,
    }


async def backlog(client: Client, n: int, *, mark: int, every: int) -> dict[str, Any]:
    """``n`` sequential confirmed submits of a no-reply task with no worker running.

    The producer's RSS is sampled every ``every`` submits; the verdict is its growth between
    ``mark`` and the end (it should hold nothing per submitted task).
    """
    start = time.perf_counter()
    samples = [{"tasks": 0, "seconds": 0.0, "producer_rss_mb": rss_mb()}]
    for done in range(1, n + 1):
        await client.send()
        if done % every == 0 or done == n:
            samples.append(
                {"tasks": done, "seconds": time.perf_counter() - start, "producer_rss_mb": rss_mb()}
            )
    seconds = time.perf_counter() - start
    return {
        "tasks": n,
        "seconds": seconds,
        "rate": n / seconds,
        "mark": mark,
        "producer_growth_mb": samples[-1]["producer_rss_mb"]
        - _at(samples, mark)["producer_rss_mb"],
        "samples": samples,
    }


RATE = 50.0  # bench.limited's rate_limit, runs per second


async def ratelimit(client: Client, n: int, rate: float = RATE) -> dict[str, Any]:
    """``n`` concurrent submits of a task limited to ``rate`` runs a second, run by two
    worker processes: how long all take (ideally ``(n - 1) / rate``: the first runs at once)
    and the most starts in any one-second window (ideally ``rate``, at most one more), with
    ``most_at``: where the first such window begins, in seconds after the first start."""
    start = time.perf_counter()
    started = sorted(await asyncio.gather(*(client.limited() for _ in range(n))))
    seconds = time.perf_counter() - start
    ideal = (n - 1) / rate
    most = 0
    most_at = 0.0
    first = 0
    for last, t in enumerate(started):
        while t - started[first] >= 1.0:
            first += 1
        if last - first + 1 > most:
            most, most_at = last - first + 1, started[first] - started[0]
    return {
        "tasks": n,
        "rate_limit": rate,
        "seconds": seconds,
        "rate": n / seconds,
        "ideal_seconds": ideal,
        "starts_span": started[-1] - started[0],
        "off_ideal": seconds / ideal - 1,
        "most_in_a_second": most,
        "most_at": most_at,
    }


def _at(samples: list[dict[str, float]], tasks: int) -> dict[str, float]:
    """The first sample taken at or after ``tasks`` tasks."""
    return next((s for s in samples if s["tasks"] >= tasks), samples[-1])
