"""`Worker`: the lifecycle — consume, drain, stop — with one asyncio task per delivery.

What happens to each delivery is `aioqueue.worker.pipeline`'s; this module starts the
subscriptions (prefetch split exactly across the queues), bounds the concurrency, keeps the
books (in hand, running, processed), and on `stop` stops consuming, lets running tasks finish
within the shutdown timeout and returns the rest to their queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import anyio

from ..app import App
from ..broker import Consumer, Delivery, settle
from ..cancel import CancelListener
from ..events import EventPublisher
from ..ratelimit import holding_queue_arguments, holding_queue_name
from ..topology import dlq_arguments, dlq_name, work_queue_arguments
from .events import TaskLog, TaskObserver
from .handoff import Handoff
from .pacer import Pacer, limited_tasks
from .pipeline import Pipeline
from .signature import SeenMessages
from .slots import take_slot
from .task_events import TaskEvents

__all__ = ["Worker", "WorkerStatistics", "split_prefetch"]

log = logging.getLogger("aioqueue.worker")


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """A snapshot of a worker's counters."""

    in_hand: int
    max_in_hand: int
    running: int
    processed: int
    consumer_timeouts: int


class Worker:
    """Runs an app's tasks from its queues until stopped.

    Args:
        app: The app whose registered tasks this worker runs (and whose connection it uses).
        queues: Queues to consume; default: the app's default queue plus every task's queue.
        concurrency: Most tasks running at once.
        prefetch: Most unacked messages held by this worker process, in total; default:
            ``concurrency``. It is split exactly across the queues (the first ones get the
            remainder; the shares add up to it). Each queue needs at least 1, so a prefetch
            below the number of queues is raised to that number, with a warning at start.
        shutdown_timeout: Seconds running tasks get to finish after `stop`; the rest go back
            to their queue.
        threads: Size of the thread pool for plain-function tasks; default
            ``min(concurrency, 40)``.
        max_deliveries: A message delivered this many times without ever being settled
            (each time its worker died) is poison: it goes to ``Q.dlq`` instead of running.
        observers: Receive task events (see `aioqueue.worker.events`); default: `TaskLog`,
            one log line per task.
        events: Publish task events and heartbeats to the stream ``aioqueue.events``
            (`aioqueue.worker.task_events`); default: ``app.settings.events``.
        replay_guard: With signing keys, where accepted messages are remembered (a
            `aioqueue.worker.signature.SeenMessages`); default: a `ReplayGuard` of this
            process. Processes of one worker share it by sharing this object's state.
    """

    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 100,
        prefetch: int | None = None,
        shutdown_timeout: float = 30.0,
        threads: int | None = None,
        max_deliveries: int = 5,
        observers: Sequence[TaskObserver] | None = None,
        events: bool | None = None,
        replay_guard: SeenMessages | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if prefetch is not None and prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.app = app
        self.queues = list(queues) if queues else app.queues()
        self.concurrency = concurrency
        self.requested_prefetch = prefetch or concurrency
        self.prefetch = max(self.requested_prefetch, len(self.queues))  # the true total
        self.shutdown_timeout = shutdown_timeout
        self.threads = threads or min(concurrency, 40)
        self.max_deliveries = max_deliveries
        self.replay_guard = replay_guard
        self.observers: list[TaskObserver] = list(observers or [TaskLog()])
        self.events_enabled = app.settings.events if events is None else events
        self.events: TaskEvents | None = None  # while running with events on
        self.pacer: Pacer | None = None  # while running, if the app has rate-limited tasks
        self._pipeline: Pipeline | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._consumer_timeouts = 0
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = False
        self._in_hand = 0
        self._max_in_hand = 0
        self._running = 0
        self._processed = 0

    @property
    def prefetch_shares(self) -> list[int]:
        """The prefetch of each queue, in the order of `queues`; they add up to `prefetch`."""
        return split_prefetch(self.prefetch, len(self.queues))

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            self._in_hand,
            self._max_in_hand,
            self._running,
            self._processed,
            self._consumer_timeouts,
        )

    def stop(self) -> None:
        """Begin a graceful shutdown; a second call returns running tasks to the queue at once."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def run(self) -> None:
        """Consume until `stop`; connects the app first if it is not connected yet."""
        if self.prefetch > self.requested_prefetch:
            log.warning(
                "prefetch %d is below the number of queues (%d) and each queue needs at least "
                "one: this worker holds up to %d unacked messages",
                self.requested_prefetch,
                len(self.queues),
                self.prefetch,
            )
        own_connection = self.app._broker is None
        if own_connection:
            await self.app.connect()
        executor = ThreadPoolExecutor(self.threads, thread_name_prefix="aioqueue-task")
        observers = list(self.observers)
        if self.app.tracing is not None:  # annotates each delivery's consumer span
            observers.append(self.app.tracing.observer())
        if self.events_enabled:
            self.events = await self._start_events()
            observers.append(self.events)
        handoff = Handoff(self.app, self.identity, observers)
        self._pipeline = Pipeline(
            self.app,
            handoff,
            executor,
            observers=observers,
            max_deliveries=self.max_deliveries,
            identity=self.identity,
            replay_guard=self.replay_guard,
        )
        self._pipeline.limits.worker_slots = self._slots
        try:
            await self._run(self._pipeline)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            if self.events is not None:
                await self._stop_events(self.events)
            if own_connection:
                await self.app.close()

    # -- task events and heartbeats ---------------------------------------------------------

    async def _start_events(self) -> TaskEvents:
        publisher = EventPublisher(self.app.broker, signing=self.app.signing)
        for observer in self.observers:  # a PrometheusObserver counts the drops
            dropped = getattr(observer, "events_dropped", None)
            if dropped is not None:
                publisher.on_dropped.append(dropped)
        await publisher.start()
        events = TaskEvents(self.app, publisher, self.identity)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(events))
        return events

    def _worker_event(self, events: TaskEvents, kind: str) -> None:
        events.emit(
            kind,
            app=self.app.name,
            queues=self.queues,
            concurrency=self.concurrency,
            running=list(events.running.values()),
            processed=self._processed,
            interval=self.app.settings.heartbeat_interval,
        )

    async def _beat(self, events: TaskEvents) -> None:
        """worker-online once consuming, then a worker-heartbeat every interval."""
        await self.ready.wait()
        self._worker_event(events, "worker-online")
        while True:
            await asyncio.sleep(self.app.settings.heartbeat_interval)
            self._worker_event(events, "worker-heartbeat")

    async def _stop_events(self, events: TaskEvents) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self._worker_event(events, "worker-offline")
        await events.publisher.close()

    async def _run(self, pipeline: Pipeline) -> None:
        broker = self.app.broker
        subscriptions: list[Consumer] = []
        tasks: set[asyncio.Task[None]] = set()  # one per delivery in hand

        async def on_delivery(delivery: Delivery) -> None:
            # the broker runs this in a task of its own per delivery, which outlives the
            # delivery's channel (`DeliveryCallback`): the whole delivery is handled in it
            self._received()
            if self._stopping:
                self._in_hand -= 1
                await settle(delivery, ack=False, requeue=True)
                return
            task = asyncio.current_task(pipeline.loop)
            assert task is not None
            tasks.add(task)
            try:
                await self._handle(delivery, pipeline)
            finally:
                tasks.discard(task)

        listener = CancelListener(broker, pipeline.controls.cancel, self.app.signing)
        pacing: asyncio.Future[None] | None = None
        try:
            await listener.start()  # every cancellation published before now is known
            pipeline.controls.ids = listener.ids
            for queue in self.queues:
                kind = self.app.queue_type_of(queue)
                await broker.declare_queue(queue, work_queue_arguments(kind))
                await broker.declare_queue(dlq_name(queue), dlq_arguments(kind))
            pacing = await self._start_pacer()
            for queue, share in zip(self.queues, self.prefetch_shares, strict=True):
                subscriptions.append(
                    await broker.subscribe(
                        queue, on_delivery, prefetch=share, on_lost=self._channel_lost
                    )
                )
            self.ready.set()
            await self._stop.wait()
            await self._drain(subscriptions)
        finally:
            self._stopping = True
            for task in list(tasks):  # past the shutdown timeout: back to their queue
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for subscription in subscriptions:
                await subscription.close()
            await listener.close()
            if self.pacer is not None and pacing is not None:
                self.pacer.stop()
                await asyncio.gather(pacing, return_exceptions=True)

    async def _start_pacer(self) -> asyncio.Future[None] | None:
        """Declare the holding queues of the app's rate-limited tasks and campaign to pace
        them (`aioqueue.worker.pacer`: one worker of the app leads)."""
        limited = limited_tasks(self.app)
        if not limited:
            return None
        for task in limited:
            arguments = holding_queue_arguments(task.options.queue_type)
            await self.app.broker.declare_queue(holding_queue_name(task.name), arguments)
        self.pacer = Pacer(self.app, self.identity)
        return asyncio.ensure_future(self.pacer.run())

    async def _drain(self, subscriptions: list[Consumer]) -> None:
        self._stopping = True
        log.info(
            "stopping: no new tasks; waiting up to %gs for %d in hand",
            self.shutdown_timeout,
            self._in_hand,
        )
        for subscription in subscriptions:
            await subscription.cancel()
        with anyio.move_on_after(self.shutdown_timeout):
            idle = asyncio.ensure_future(self._idle.wait())
            force = asyncio.ensure_future(self._force.wait())
            try:
                await asyncio.wait({idle, force}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()
                force.cancel()
        if self._in_hand:
            log.warning("returning %d unfinished task(s) to their queue", self._in_hand)

    def _received(self) -> None:
        self._in_hand += 1
        self._max_in_hand = max(self._max_in_hand, self._in_hand)
        self._idle.clear()

    async def _handle(self, delivery: Delivery, pipeline: Pipeline) -> None:
        """One delivery in hand, in a consumer span when tracing (from its arrival to its
        settle, continuing the trace the message carries), and the books kept."""
        try:
            tracing = self.app.tracing
            if tracing is None:
                await self._take(delivery, pipeline)
            else:
                with tracing.consuming(delivery):
                    await self._take(delivery, pipeline)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await settle(delivery, ack=False, requeue=True)
            raise
        except Exception:
            # A bug of ours, not the task's: never lose the message, never stop the worker.
            log.exception("unexpected error handling a message of %r; requeued", delivery.queue)
            await settle(delivery, ack=False, requeue=True)
        finally:
            self._in_hand -= 1
            if self._in_hand == 0:
                self._idle.set()

    async def _take(self, delivery: Delivery, pipeline: Pipeline) -> None:
        """Received (decoded, told: seen as queued), then a concurrency slot, then the rest."""
        envelope = await pipeline.receive(delivery)
        if envelope is None or not await take_slot(self._slots, delivery, envelope, pipeline):
            self._processed += 1  # unreadable, refused or cancelled: dead-lettered
            return
        try:
            if self._stopping:
                await settle(delivery, ack=False, requeue=True)
                return
            self._running += 1
            try:
                await pipeline.process(delivery, envelope)
            finally:
                self._running -= 1
                self._processed += 1
        finally:
            self._slots.release()

    def _channel_lost(self, queue: str, exc: BaseException | None) -> None:
        """A consuming channel closed: its unacked deliveries are back in the queue."""
        current = self._pipeline.current if self._pipeline is not None else {}
        running = [(name, tid) for q, name, tid in current.values() if q == queue]
        text = str(exc or "")
        if "acknowledgement" in text and "timed out" in text:
            self._consumer_timeouts += 1
            log.error(
                "RabbitMQ's consumer_timeout closed the channel of %r: a task held its "
                "message too long. Running there: %s. They will be redelivered and run "
                "again; raise consumer_timeout above your longest task (see README).",
                queue,
                ", ".join(f"{name} id={tid}" for name, tid in running) or "none",
            )
        elif self._stopping is False:
            log.warning(
                "lost the channel of %r (%s); %d running task(s) will be redelivered",
                queue,
                text or "closed",
                len(running),
            )


def split_prefetch(total: int, queues: int) -> list[int]:
    """``total`` split across ``queues`` consumers: equal shares, the remainder one each to
    the first ones; every share at least 1 (ValueError when ``total < queues``).

    >>> split_prefetch(10, 4)
    [3, 3, 2, 2]
    """
    if queues < 1 or total < queues:
        raise ValueError(f"cannot split a prefetch of {total} across {queues} queue(s)")
    share, remainder = divmod(total, queues)
    return [share + 1 if i < remainder else share for i in range(queues)]
