"""CPU time per round trip with tracing off, unsampled and on: ``python -m bench.tracing_cost``.

One process per measurement, on the in-memory broker (``memory://``, the worker in the same
event loop): a warm-up of 200 round trips, then ``--tasks`` submits and their results, timed
by CPU time (``time.process_time``: less disturbed by other processes than wall time). The
modes run interleaved, ``--rounds`` times each, and the medians (min) are printed:

- ``off``: no tracer provider (the default; with the otel extra installed);
- ``unsampled``: an SDK provider whose sampler (``ALWAYS_OFF``) records nothing;
- ``on``: an SDK provider recording every span, exported in batches to nowhere (`bench.otel`).

To compare ``off`` with a commit before tracing existed, run a round with ``PYTHONPATH``
pointing at that commit's ``aioqueue`` package (``git archive <commit> aioqueue``):
``python -m bench.tracing_cost --one off``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

MODES = ("off", "unsampled", "on")


def _configure(mode: str) -> None:
    if mode == "unsampled":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        trace.set_tracer_provider(TracerProvider(sampler=ALWAYS_OFF))
    elif mode == "on":
        from .otel import configure_tracing

        configure_tracing()


async def _measure(mode: str, tasks: int) -> float:
    """Microseconds of CPU per round trip."""
    from aioqueue import App
    from aioqueue.testing import running_worker

    app = App("tracing-cost", broker_url="memory://tracing-cost")

    @app.task(name="cost.noop")
    async def noop(i: int) -> int:
        return i

    async with app, running_worker(app):
        if (getattr(app, "tracing", None) is not None) != (mode != "off"):
            raise SystemExit(f"tracing is not {mode!r} in this process")
        for i in range(200):
            await (await noop.submit(i)).result()
        started = time.process_time()
        handles = [await noop.submit(i) for i in range(tasks)]
        for handle in handles:
            await handle.result()
        return (time.process_time() - started) / tasks * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_cost")
    p.add_argument("--tasks", type=int, default=5_000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--one", choices=MODES, help="one measurement in this process (printed)")
    args = p.parse_args(argv)
    if args.one:
        _configure(args.one)
        print(f"{asyncio.run(_measure(args.one, args.tasks)):.1f}")
        return 0
    found: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            command = [sys.executable, "-m", "bench.tracing_cost", "--one", mode]
            done = subprocess.run(
                [*command, "--tasks", str(args.tasks)], capture_output=True, text=True, check=True
            )
            found[mode].append(float(done.stdout.split()[-1]))
    print(f"CPU µs per round trip, {args.tasks:,} tasks, {args.rounds} rounds: median (min)")
    for mode, values in found.items():
        print(f"  {mode:>9}: {statistics.median(values):7.1f} ({min(values):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
