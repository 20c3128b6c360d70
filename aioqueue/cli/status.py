"""``python -m aioqueue status|purge module:app``: how the queues stand, and emptying one.

``status`` prints a table of the app's queues — the default queue, every queue a task names, and
the dead-letter queue of each — read with passive declares over AMQP (no management plugin,
nothing created): messages ready, consumers (each worker process consumes each of its queues
once, so consumers ≈ workers alive) and the net rate, the change of the ready count between
two samples ``--interval`` seconds apart (published minus consumed, not throughput). With
schedules, it also tells whether a scheduler leads. ``--min-consumers`` and
``--require-scheduler`` turn it into a health check (exit code 3 when not met).

``purge`` deletes the ready messages of one queue, after the person types the queue's name.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

from ..app import App
from ..errors import AioqueueError
from ..rabbit import RabbitBroker
from ..rabbit.admin import purge_queue, queue_depths
from ..ratelimit import holding_queue_name
from ..scheduler.records import leader_queue_name
from ..settings import mask_url
from ..topology import dlq_name

__all__ = ["QueueSample", "add_parsers", "format_status", "net_rate", "run_command", "sample"]

UNHEALTHY = 3  # exit code of a failed --min-consumers / --require-scheduler check


@dataclass(frozen=True, slots=True)
class QueueSample:
    """One queue as a passive declare saw it; ``ready`` and ``consumers`` None if it is absent."""

    name: str
    ready: int | None
    consumers: int | None

    @property
    def exists(self) -> bool:
        return self.ready is not None


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` and ``purge`` to the ``python -m aioqueue`` parser."""
    status = sub.add_parser("status", help="queue depths, consumers (≈ workers) and rates")
    status.add_argument("app", help="MODULE:APP")
    status.add_argument("--broker-url", help="overrides the app's broker URL")
    status.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        help="seconds between the two samples of the net rate (default 1; 0: no rate)",
    )
    status.add_argument(
        "--min-consumers",
        type=int,
        default=0,
        help=f"exit {UNHEALTHY} if a work queue has fewer consumers (a health check)",
    )
    status.add_argument(
        "--require-scheduler",
        action="store_true",
        help=f"exit {UNHEALTHY} if the app has schedules and no scheduler leads",
    )
    purge = sub.add_parser("purge", help="delete the ready messages of a queue")
    purge.add_argument("app", help="MODULE:APP")
    purge.add_argument("--queue", required=True, help="the queue to empty")
    purge.add_argument("--broker-url", help="overrides the app's broker URL")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


async def run_command(app: App, args: argparse.Namespace, stdin: TextIO) -> int:
    """Run ``status`` or ``purge`` (as parsed by `add_parsers`); returns the exit code."""
    async with app:
        broker = app.broker
        if not isinstance(broker, RabbitBroker):
            raise AioqueueError("these commands need RabbitMQ, not an in-memory broker")
        if args.command == "purge":
            return await _purge(broker, args.queue, args.yes, stdin)
        return await _status(app, broker, args)


# -- status ------------------------------------------------------------------------------------


async def _status(app: App, broker: RabbitBroker, args: argparse.Namespace) -> int:
    names = [name for queue in app.queues() for name in (queue, dlq_name(queue))]
    # rate-limited tasks waiting for their turn (consumers: 1 while a pacer leads)
    names += [holding_queue_name(t.name) for t in app.tasks.values() if t.options.rate_limit]
    leader = leader_queue_name(app.name) if app.schedules else None
    probe = [*names, leader] if leader else names
    first = await sample(broker, probe)
    second = None
    if args.interval > 0:
        await asyncio.sleep(args.interval)
        second = await sample(broker, names)
    print(f"app {app.name!r} at {mask_url(app.broker_url)}")
    print(format_status([first[n] for n in names], second, args.interval))
    scheduler = first[leader] if leader else None
    if scheduler is not None:
        print(_scheduler_line(scheduler))
    return _health(app, second or first, scheduler, args)


def _health(
    app: App,
    samples: dict[str, QueueSample],
    scheduler: QueueSample | None,
    args: argparse.Namespace,
) -> int:
    healthy = True
    for queue in app.queues():
        consumers = samples[queue].consumers or 0
        if consumers < args.min_consumers:
            print(
                f"UNHEALTHY: {queue} has {consumers} consumer(s), fewer than {args.min_consumers}"
            )
            healthy = False
    if args.require_scheduler and scheduler is not None and not scheduler.consumers:
        print("UNHEALTHY: the app has schedules and no scheduler leads")
        healthy = False
    return 0 if healthy else UNHEALTHY


async def sample(broker: RabbitBroker, names: Iterable[str]) -> dict[str, QueueSample]:
    """Each queue's ready messages and consumers (None for a missing queue); creates none."""
    depths = await queue_depths(broker, names)
    return {
        name: QueueSample(name, *(depth if depth is not None else (None, None)))
        for name, depth in depths.items()
    }


def net_rate(before: QueueSample, after: QueueSample | None, interval: float) -> float | None:
    """Messages per second by which the ready count changed; None if unknown."""
    if after is None or interval <= 0 or before.ready is None or after.ready is None:
        return None
    return (after.ready - before.ready) / interval


def format_status(
    first: list[QueueSample], second: dict[str, QueueSample] | None, interval: float
) -> str:
    """The status table: one row per queue, then a legend."""
    width = max([len("queue"), *(len(s.name) for s in first)])
    lines = [f"{'queue':<{width}}  {'ready':>9}  {'consumers':>9}  {'net msg/s':>10}"]
    for before in first:
        after = second.get(before.name) if second else None
        now = after if after is not None else before
        if not now.exists:
            lines.append(f"{now.name:<{width}}  {'-':>9}  {'-':>9}  {'-':>10}  (not declared)")
            continue
        rate = net_rate(before, after, interval)
        shown = "-" if rate is None else f"{rate:+.1f}"
        lines.append(f"{now.name:<{width}}  {now.ready:>9}  {now.consumers:>9}  {shown:>10}")
    over = f"over {interval:g}s" if second is not None else "not sampled (--interval 0)"
    lines.append(
        f"ready: messages waiting for a worker. consumers: worker processes consuming the queue.\n"
        f"net msg/s: change of 'ready' {over} (published minus consumed), not throughput."
    )
    return "\n".join(lines)


def _scheduler_line(leader: QueueSample) -> str:
    if not leader.exists:
        return "scheduler: none has run in the last hour (no leader)"
    if leader.consumers:
        return "scheduler: a leader is firing the schedules"
    return "scheduler: no leader at the moment"


# -- purge -------------------------------------------------------------------------------------


async def _purge(broker: RabbitBroker, name: str, yes: bool, stdin: TextIO) -> int:
    depth = (await queue_depths(broker, [name]))[name]
    if depth is None:
        print(f"{name} does not exist: nothing to purge")
        return 1
    if not yes:
        print(
            f"Delete the {depth[0]} ready message(s) of {name}? Type the queue name to confirm: ",
            end="",
            flush=True,
        )
        if stdin.readline().strip() != name:
            print("cancelled; nothing deleted")
            return 1
    purged = await purge_queue(broker, name)
    if purged is None:
        print(f"{name} does not exist: nothing to purge")
        return 1
    print(f"purged {purged} message(s) from {name}")
    return 0
