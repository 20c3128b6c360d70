"""`Pacer`: the one process of an app that lets rate-limited tasks through, at their rate.

Every worker of an app with rate-limited tasks runs a `Pacer`; they campaign for the lease
``aioqueue.ratelimit.<app>.lease`` (the scheduler's kind of lease, `aioqueue.rabbit.lease`: an
exclusive queue held by one connection, free the moment its process dies) and exactly one leads.
The leader consumes each holding queue ``aioqueue.ratelimit.<task>`` (where workers put the
task's unpaced messages, `Handoff.hold`) and, for each message in its turn (`SlotClock`), publishes
a copy marked ``aioqueue-paced`` to the work queue the message came from — confirmed — and only
then acks it. A pacer killed at any point loses nothing: the messages it held go back to the
holding queue, and a follower takes the lease over within about ``poll_interval``. A kill
between a confirmed copy and its ack runs that one task twice (at-least-once, as everywhere).

On the in-memory broker the lease is `MemoryLease`, and turns are taken in wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from ..app import App
from ..broker import Consumer, Delivery, settle
from ..errors import PublishError
from ..memory import MemoryBroker
from ..message import H_PACED, H_RATE_QUEUE, dead_letter_copy
from ..rabbit.lease import CONNECTION_ERRORS, Lease
from ..ratelimit import Rate, SlotClock, holding_queue_arguments, holding_queue_name
from ..scheduler.in_memory import MemoryLease
from ..scheduler.records import LeaseLost
from ..task import Task
from ..topology import work_queue_arguments

__all__ = ["Pacer", "limited_tasks"]

log = logging.getLogger("aioqueue.ratelimit")

MAX_PREFETCH = 500  # messages a pacer holds per task: about one second's worth


def limited_tasks(app: App) -> list[Task[Any, Any]]:
    """The app's tasks that have a ``rate_limit``."""
    return [t for t in app.tasks.values() if t.options.rate_limit is not None]


def pacer_prefetch(rate: Rate) -> int:
    """How many messages of one holding queue the pacer holds: about a second's worth."""
    return max(1, min(MAX_PREFETCH, math.ceil(rate.per_second)))


class Pacer:
    """Campaigns for the app's rate-limit lease and, while it holds it, paces every
    rate-limited task of the app. `run` until `stop`.

    Args:
        app: The (connected) app; its rate-limited tasks are paced.
        identity: This process's name (shown as the lease connection's name).
        poll_interval: Seconds between a follower's looks for a free lease: the takeover time.
    """

    def __init__(self, app: App, identity: str, *, poll_interval: float = 0.5) -> None:
        self.app = app
        self.identity = identity
        self.poll_interval = poll_interval
        self.leading = asyncio.Event()
        self.paced = 0  # messages moved to their work queue by this process
        self._stop = asyncio.Event()
        self._turns: dict[str, set[asyncio.Task[None]]] = {}  # holding queue -> waiting

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Lead whenever the lease is free, until `stop`."""
        while not self._stop.is_set():
            lease = self._open()
            try:
                await lease.connect(self.app.settings.connect_timeout)
                if await self._unless_stopped(lease.acquire()):
                    await self._lead(lease)
            except (LeaseLost, *CONNECTION_ERRORS) as exc:
                log.warning("pacer %s: lease lost (%s); campaigning again", self.identity, exc)
                await self._unless_stopped(asyncio.sleep(self.poll_interval))
            finally:
                self.leading.clear()
                with contextlib.suppress(Exception):
                    await lease.release()

    def _open(self) -> Lease | MemoryLease:
        broker = self.app.broker
        if isinstance(broker, MemoryBroker):
            return MemoryLease(broker, self.app.name, identity=self.identity, role="ratelimit")
        return Lease(
            self.app.broker_url,
            self.app.name,
            identity=self.identity,
            poll_interval=self.poll_interval,
            queue_type=self.app.queue_type,
            role="ratelimit",
        )

    async def _unless_stopped(self, work: Any) -> bool:
        """Run ``work`` until it ends or `stop`; whether it ended."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return False
        task.result()  # its error, if any
        return True

    async def _lead(self, lease: Lease | MemoryLease) -> None:
        tasks = limited_tasks(self.app)
        log.info("pacer %s leads the rate limits of app %r", self.identity, self.app.name)
        consumers: list[Consumer] = []
        try:
            for task in tasks:
                consumers.append(await self._pace(task))
            self.leading.set()
            await self._unless_stopped(lease.wait_lost())
        finally:
            for consumer in consumers:
                with contextlib.suppress(Exception):
                    await consumer.cancel()
            for waiting in self._turns.values():  # not yet published: back to the queue
                for turn in list(waiting):
                    turn.cancel()
            for consumer in consumers:
                with contextlib.suppress(Exception):
                    await consumer.close()
            self._turns.clear()

    async def _pace(self, task: Task[Any, Any]) -> Consumer:
        """Consume ``task``'s holding queue, each message in its turn."""
        rate = task.options.rate_limit
        assert rate is not None
        broker = self.app.broker
        holding = holding_queue_name(task.name)
        await broker.declare_queue(holding, holding_queue_arguments(task.options.queue_type))
        clock = SlotClock(rate)
        waiting = self._turns.setdefault(holding, set())
        loop = asyncio.get_running_loop()

        async def on_delivery(delivery: Delivery) -> None:
            slot = clock.reserve(loop.time())  # in delivery order
            turn = loop.create_task(self._move(delivery, task, slot))
            waiting.add(turn)
            turn.add_done_callback(waiting.discard)

        def on_lost(queue: str, exc: BaseException | None) -> None:
            # the channel is gone and its deliveries are back in the queue: publishing them
            # now would move them twice
            for turn in list(waiting):
                turn.cancel()

        return await broker.subscribe(
            holding, on_delivery, prefetch=pacer_prefetch(rate), on_lost=on_lost
        )

    async def _move(self, delivery: Delivery, task: Task[Any, Any], slot: float) -> None:
        """Wait for ``slot``, publish the paced copy to its work queue, then ack."""
        try:
            await asyncio.sleep(max(0.0, slot - asyncio.get_running_loop().time()))
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await settle(delivery, ack=False, requeue=True)
            raise
        headers = delivery.properties.headers or {}
        target = headers.get(H_RATE_QUEUE)
        if not isinstance(target, str) or not target:
            target = task.options.queue
        broker = self.app.broker
        try:
            if not broker.is_declared(target):
                kind = self.app.queue_type_of(target)
                await broker.declare_queue(target, work_queue_arguments(kind))
            copy = dead_letter_copy(delivery.properties, {H_PACED: 1})
            await asyncio.shield(broker.publish(target, delivery.body, copy))
        except (PublishError, *CONNECTION_ERRORS) as exc:
            log.error("pacer: could not move a message of %s to %r (%s)", task.name, target, exc)
            await settle(delivery, ack=False, requeue=True)
            return
        await settle(delivery, ack=True)
        self.paced += 1
