"""`Pacer`: the one process of an app that lets rate-limited tasks through, at their rate.

Every worker of an app with rate-limited tasks runs a `Pacer`; they campaign for the lease
``aioqueue.ratelimit.<app>.lease`` (the scheduler's kind of lease, `aioqueue.rabbit.lease`: an
exclusive queue held by one connection, free the moment its process dies) and exactly one leads.
The leader consumes each holding queue ``aioqueue.ratelimit.<task>`` (where producers that
know the limit publish the task's messages, and workers put the unpaced ones they receive,
`Handoff.hold`) and, for each message in its turn (`SlotClock`), publishes a copy marked
``aioqueue-paced`` to the work queue the message names (``aioqueue-rate-queue``) — confirmed
— and only then acks it. A pacer killed at any point loses nothing: the messages it held go
back to the holding queue, and a follower takes the lease over within about
``poll_interval``. A kill between a confirmed copy and its ack runs that one task twice
(at-least-once, as everywhere).

On the in-memory broker the lease is `MemoryLease`, and turns are taken in wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import replace
from typing import Any

from ..app import App
from ..broker import Consumer, Delivery, settle
from ..errors import PublishError, SignatureError
from ..memory import MemoryBroker
from ..message import H_PACED, H_RATE_QUEUE, H_TASK, ErrorInfo, dead_letter_copy
from ..message.celery import is_celery
from ..message.signing import is_signed, sign, verify
from ..rabbit.lease import CONNECTION_ERRORS, Lease
from ..ratelimit import Rate, SlotClock, holding_queue_arguments, holding_queue_name
from ..scheduler.in_memory import MemoryLease
from ..scheduler.records import LeaseLost
from ..task import Task
from ..topology import INFRA_PREFIX, work_queue_arguments
from .handoff import Handoff, settle_after
from .signature import ReplayGuard

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
        self._handoff = Handoff(app, identity)
        # with signing keys: what this pacer signed anew, so a copy of it is not paced twice
        self._guard = ReplayGuard(app.settings.replay_guard_size) if app.signing else None

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
                    if not self._stop.is_set():
                        log.warning("pacer %s lost the lease; campaigning again", self.identity)
            except (LeaseLost, *CONNECTION_ERRORS) as exc:
                log.warning("pacer %s: lease lost (%s); campaigning again", self.identity, exc)
                await self._unless_stopped(asyncio.sleep(self.poll_interval))
            except Exception:  # e.g. the broker unreachable past the connect timeout
                # the worker goes on running tasks; pacing must come back when it can
                log.exception("pacer %s failed; campaigning again", self.identity)
                await self._unless_stopped(asyncio.sleep(max(self.poll_interval, 1.0)))
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

    def signature_problem(self, delivery: Delivery) -> str | None:
        """With signing keys, why a held message must not be paced, if so: it is unsigned,
        forged, or a copy of one this pacer paced within the signature window. The pacer
        signs the paced copy anew (it is due when its turn came; the original's signature
        would make it a replay), so it checks first what a worker would have checked: it
        must not sign what anyone could drop into a holding queue."""
        keys = self.app.signing
        if keys is None:
            return None
        headers = delivery.properties.headers
        if not is_signed(headers) and is_celery(headers):
            if self.app.settings.accept_unsigned_celery:
                return None
        try:
            signed = verify(delivery.properties, delivery.body, keys)
        except SignatureError as exc:
            return exc.message
        now = self.app.broker.now()
        assert self._guard is not None
        expires_at = now + self.app.settings.signature_window
        if not self._guard.add(signed.digest, expires_at, now) and not delivery.redelivered:
            return "replayed: a copy of a message already paced within the window"
        return None

    async def refuse(self, delivery: Delivery, queue: str, problem: str) -> None:
        """Dead-letter a held message to ``queue``'s dead-letter queue (reason
        ``signature``), as a worker would; its caller is not told (not trusted)."""
        props = delivery.properties
        name = (props.headers or {}).get(H_TASK)
        await self._handoff.dead_letter(
            replace(delivery, queue=queue),
            reason="signature",
            error=ErrorInfo("dead_lettered", "signature", problem),
            task_id=props.correlation_id or props.message_id or "",
            task_name=name if isinstance(name, str) else "",
            reply_to=None,
        )

    async def _lead(self, lease: Lease | MemoryLease) -> None:
        log.info("pacer %s leads the rate limits of app %r", self.identity, self.app.name)
        lanes: list[_Lane] = []
        try:
            for task in limited_tasks(self.app):
                lane = _Lane(self, task)
                lanes.append(lane)
                await lane.start()
            self.leading.set()
            await self._unless_stopped(lease.wait_lost())
        finally:
            for lane in lanes:
                await lane.close()


class _Lane:
    """One rate-limited task while this process leads: its holding queue's messages are
    queued here in delivery order and sent one by one, each when its `SlotClock` says."""

    def __init__(self, pacer: Pacer, task: Task[Any, Any]) -> None:
        assert task.options.rate_limit is not None
        self.pacer = pacer
        self.app = pacer.app
        self.task = task
        self.holding = holding_queue_name(task.name)
        self.clock = SlotClock(task.options.rate_limit)
        self.inbox: asyncio.Queue[tuple[int, Delivery]] = asyncio.Queue()
        self.generation = 0  # bumped when the channel is lost: older deliveries are stale
        self.publishing: set[asyncio.Task[None]] = set()
        self.consumer: Consumer | None = None
        self.sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        broker = self.app.broker
        arguments = holding_queue_arguments(self.task.options.queue_type)
        await broker.declare_queue(self.holding, arguments)
        self.sender = asyncio.ensure_future(self._send())
        assert self.task.options.rate_limit is not None
        self.consumer = await broker.subscribe(
            self.holding,
            self._received,
            prefetch=pacer_prefetch(self.task.options.rate_limit),
            on_lost=self._lost,
        )

    async def _received(self, delivery: Delivery) -> None:
        self.inbox.put_nowait((self.generation, delivery))

    def _lost(self, queue: str, exc: BaseException | None) -> None:
        # the channel is gone and its deliveries are back in the queue: sending the ones
        # still here would move them twice
        self.generation += 1

    async def close(self) -> None:
        """Stop: what is not sent yet goes back to the holding queue."""
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.cancel()
        if self.sender is not None:
            self.sender.cancel()
            await asyncio.gather(self.sender, return_exceptions=True)
        if self.publishing:  # confirmed or not: let each end, then settle it
            await asyncio.gather(*self.publishing, return_exceptions=True)
        while not self.inbox.empty():
            _, delivery = self.inbox.get_nowait()
            with contextlib.suppress(Exception):
                await settle(delivery, ack=False, requeue=True)
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.close()

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            generation, delivery = await self.inbox.get()
            while True:  # a window may fill while waiting for the slot
                slot = self.clock.due(loop.time())
                if slot <= loop.time():
                    break
                try:
                    await asyncio.sleep(slot - loop.time())
                except asyncio.CancelledError:
                    self.inbox.put_nowait((generation, delivery))  # requeued by close
                    raise
            if generation != self.generation:
                continue  # stale: RabbitMQ has redelivered it already
            self.clock.took(loop.time())
            publish = loop.create_task(self._move(delivery))
            self.publishing.add(publish)
            publish.add_done_callback(self.publishing.discard)

    async def _move(self, delivery: Delivery) -> None:
        """Publish the paced copy to its work queue (confirmed), then ack the original."""
        headers = delivery.properties.headers or {}
        target = headers.get(H_RATE_QUEUE)
        if not isinstance(target, str) or not target or target.startswith(INFRA_PREFIX):
            target = self.task.options.queue  # never into aioqueue's own queues
        broker = self.app.broker
        problem = self.pacer.signature_problem(delivery)
        if problem is not None:
            await self.pacer.refuse(delivery, target, problem)
            return

        async def publish() -> None:
            if not broker.is_declared(target):
                kind = self.app.queue_type_of(target)
                await broker.declare_queue(target, work_queue_arguments(kind))
            copy = dead_letter_copy(delivery.properties, {H_PACED: 1})
            keys = self.app.signing
            if keys is not None and is_signed(copy.headers):  # due now: its turn came
                sign(copy, delivery.body, keys, due_at=broker.now())
            await broker.publish(target, delivery.body, copy)

        failure = f"pacer: could not move a message of {self.task.name} to {target!r}"
        if await settle_after(
            delivery, publish(), failure, errors=(PublishError, *CONNECTION_ERRORS)
        ):
            self.pacer.paced += 1
