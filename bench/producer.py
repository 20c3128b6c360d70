"""The producer process: ``python -m bench.producer '<json spec>'`` runs one measurement.

A fresh process per measurement, so one run's allocations and caches do not flatter the next
(and RSS figures mean this workload alone). The spec (see `bench.procs.run_producer`) names the
system, the workload, the broker URL, the queue and the sizes; the result is one JSON object on
stdout. The aioqueue side reads its queue and URL from the environment, as `bench.tasks` does.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TYPE_CHECKING, Any

import orjson

from . import workloads
from .cpu import CpuSplit
from .loop import run
from .raw import RawClient
from .workloads import Client, Sizes

if TYPE_CHECKING:  # imported where used: the other systems' producers do not load it
    from .lean import LeanClient


class AioqueueBench:
    """`Client` on aioqueue's public API: ``submit`` then ``result``.

    With ``workers`` worker processes on the queue, ``executed`` asks that many times at once
    and adds up the latest count each worker reported: a lower bound of what all of them ran
    (each count only grows), which reaches the total once every worker answered after its last
    task (the broker hands the queries out round-robin, so repeated polls reach every worker).
    """

    def __init__(self, workers: int = 1) -> None:
        from . import tasks  # reads $AIOQUEUE_BENCH_QUEUE(_TYPE) and $AIOQUEUE_BROKER_URL

        self.tasks = tasks
        self.workers = workers
        self._counts: dict[int, int] = {}

    async def call(self, i: int) -> int:
        handle = await self.tasks.noop.submit(i)
        return await handle.result()

    async def send(self) -> None:
        await self.tasks.fire.submit()

    async def limited(self) -> float:
        handle = await self.tasks.limited.submit()
        started: float = await handle.result()
        return started

    async def executed(self) -> int:
        for pid, count in await asyncio.gather(*(self._ask() for _ in range(self.workers))):
            self._counts[pid] = max(count, self._counts.get(pid, 0))
        return sum(self._counts.values())

    async def _ask(self) -> list[int]:
        handle = await self.tasks.executed.submit()
        answer: list[int] = await handle.result()
        return answer


class RawBench:
    """`Client` on the naive aio-pika baseline (or on `bench.lean`'s client, its twin)."""

    def __init__(self, raw: RawClient | LeanClient) -> None:
        self.raw = raw

    async def call(self, i: int) -> int:
        value: int = await self.raw.call("noop", i)
        return value

    async def send(self) -> None:
        await self.raw.send("fire")

    async def executed(self) -> int:
        value: int = await self.raw.call("executed")
        return value

    async def limited(self) -> float:
        raise NotImplementedError("the raw baseline has no rate limits")


async def measure(client: Client, spec: dict[str, Any]) -> dict[str, Any]:
    sizes = Sizes(**spec["sizes"])
    workload = spec["workload"]
    if workload == "backlog":  # no worker: nothing to warm up against
        return await workloads.backlog(
            client, sizes.backlog, mark=sizes.backlog_mark, every=sizes.backlog_every
        )
    await workloads.warm_up(client, sizes.warmup)
    if workload in ("rpc", "fire"):
        split = _cpu_split(spec).start()
        if workload == "rpc":
            result = await workloads.rpc(client, sizes.rpc)
        else:
            result = await workloads.fire(client, sizes.fire)
        return {**result, "cpu_us": split.per_task(result["tasks"])}
    if workload == "latency":
        return await workloads.latency(client, sizes.latency)
    if workload == "ratelimit":
        return await workloads.ratelimit(client, sizes.ratelimit)
    if workload == "soak":
        return await workloads.soak(
            client,
            sizes.soak,
            window=sizes.soak_window,
            mark=sizes.soak_mark,
            every=sizes.soak_every,
            rpc_every=sizes.soak_rpc_every,
            worker_pid=spec["worker_pid"],
        )
    raise ValueError(f"unknown workload {workload!r}")


def _cpu_split(spec: dict[str, Any]) -> CpuSplit:
    """The processes of this measurement whose CPU per task is reported (`bench.cpu`)."""
    workers = spec.get("worker_pids") or [spec.get("worker_pid", 0)]
    return CpuSplit(
        {"broker": spec.get("broker_pids", []), "worker": workers, "producer": [os.getpid()]}
    )


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    """Connect the system's producer, measure, and name the queues it created (for cleanup)."""
    if spec["system"] == "lean":
        from .lean import LeanClient

        lean = await LeanClient.connect(spec["url"], spec["queue"])
        try:
            result = await measure(RawBench(lean), spec)
        finally:
            await lean.close()
        return {**result, "queues": [spec["queue"], lean.reply_queue]}
    if spec["system"] == "raw":
        raw = await RawClient.connect(
            spec["url"], spec["queue"], quorum=spec.get("queue_type") == "quorum"
        )
        try:
            result = await measure(RawBench(raw), spec)
        finally:
            await raw.close()
        return {**result, "queues": [spec["queue"]]}
    from aioqueue.ratelimit import holding_queue_name
    from aioqueue.scheduler.records import leader_queue_name
    from aioqueue.topology import reply_queue_name

    bench = AioqueueBench(spec.get("workers", 1))
    app = bench.tasks.app
    async with app:
        result = await measure(bench, spec)
    queues = [spec["queue"], reply_queue_name(app.client_id)]
    if spec["workload"] == "ratelimit":
        holding = holding_queue_name(bench.tasks.limited.name)
        queues += [holding, leader_queue_name(app.name, "ratelimit")]
    return {**result, "queues": queues}


if __name__ == "__main__":
    outcome = run(main(orjson.loads(sys.argv[1])))
    sys.stdout.buffer.write(orjson.dumps(outcome) + b"\n")
