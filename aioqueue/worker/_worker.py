"""`Worker`: consume, run, settle — one asyncio task per delivery."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import anyio

from ..app import App
from ..broker import Consumer, Delivery, settle
from ..errors import DecodeError
from ..message import H_DELIVERIES, H_TASK, Envelope, ErrorInfo, Outcome
from ..retry import Retry, next_delay
from ..topology import dlq_arguments, dlq_name, work_queue_arguments
from .emit import Emitter
from .events import Outcome as TaskOutcome
from .events import TaskLog, TaskObserver
from .execute import execute
from .settle import Handoff

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
        self.observers: list[TaskObserver] = list(observers or [TaskLog()])
        self._current: dict[int, tuple[str, str, str]] = {}
        self._consumer_timeouts = 0
        self._recounting: dict[str, asyncio.Event] = {}
        # runs in hand by (task id, attempt): a retry is the same id with the next attempt,
        # and may arrive (with no delay) before the attempt that published it is settled
        self._running_ids: dict[tuple[str, int], asyncio.Future[bool]] = {}
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
        try:
            await self._run(Handoff(self.app, self.identity, self.observers), executor)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            if own_connection:
                await self.app.close()

    async def _run(self, handoff: Handoff, executor: ThreadPoolExecutor) -> None:
        broker = self.app.broker
        subscriptions: list[Consumer] = []
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()  # one per delivery in hand

        async def on_delivery(delivery: Delivery) -> None:
            # aiormq runs this in a task of the channel's, cancelled if the channel closes:
            # the delivery gets a task of its own, which outlives its channel
            self._received()
            if self._stopping:
                self._in_hand -= 1
                await settle(delivery, ack=False, requeue=True)
                return
            task = loop.create_task(self._handle(delivery, handoff, executor))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        try:
            for queue in self.queues:
                kind = self.app.queue_type_of(queue)
                await broker.declare_queue(queue, work_queue_arguments(kind))
                await broker.declare_queue(dlq_name(queue), dlq_arguments(kind))
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

    async def _handle(
        self, delivery: Delivery, handoff: Handoff, executor: ThreadPoolExecutor
    ) -> None:
        try:
            async with self._slots:
                if self._stopping:
                    await settle(delivery, ack=False, requeue=True)
                    return
                self._running += 1
                try:
                    await self._process(delivery, handoff, executor)
                finally:
                    self._running -= 1
                    self._processed += 1
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

    async def _process(
        self, delivery: Delivery, handoff: Handoff, executor: ThreadPoolExecutor
    ) -> None:
        """Decode → run → settle."""
        envelope = await self._decode(delivery, handoff)
        if envelope is None or await self._already_running(delivery, envelope):
            return
        redelivered = await self._count_delivery(delivery, envelope, handoff)
        if redelivered is None:
            return
        reason, error = self._refuse(envelope)
        if error is not None:
            await handoff.dead_letter(
                delivery,
                reason=reason,
                error=error,
                task_id=envelope.id,
                task_name=envelope.task,
                reply_to=envelope.reply_to,
            )
            return
        task = self.app.tasks[envelope.task]
        self._current[id(delivery)] = (delivery.queue, envelope.task, envelope.id)
        handed_off = asyncio.get_running_loop().create_future()
        run_key = (envelope.id, envelope.attempt)
        self._running_ids[run_key] = handed_off
        for observer in self.observers:
            observer.started(envelope.task, envelope.id, envelope.attempt)
        started = time.perf_counter()
        try:
            emitter = Emitter(self.app.broker, envelope)
            outcome, exc = await execute(
                task, envelope, redelivered=redelivered, threads=executor, emitter=emitter
            )
            duration = time.perf_counter() - started
            handed_off.set_result(await self._settle(delivery, envelope, outcome, exc, handoff))
            self._observe_finish(envelope, outcome, exc, duration)
        finally:
            del self._current[id(delivery)]
            if self._running_ids.get(run_key) is handed_off:  # two copies may run here
                del self._running_ids[run_key]
            if not handed_off.done():
                handed_off.set_result(False)

    def _observe_finish(
        self, envelope: Envelope, outcome: Outcome, exc: BaseException | None, duration: float
    ) -> None:
        result: TaskOutcome = "succeeded"
        if outcome.error is not None:
            policy = self.app.tasks[envelope.task].options.retry
            if (
                exc is not None
                and envelope.attempt < policy.max_attempts
                and isinstance(exc, (Retry, *policy.retry_on))
            ):
                result = "retried"
            else:
                result = "timeout" if outcome.error.kind == "timeout" else "failed"
        for observer in self.observers:
            try:
                observer.finished(envelope.task, envelope.id, envelope.attempt, result, duration)
            except Exception:  # an observer's bug must not touch the task's outcome
                log.exception("task observer %r failed", observer)

    async def _settle(
        self,
        delivery: Delivery,
        envelope: Envelope,
        outcome: Outcome,
        exc: BaseException | None,
        handoff: Handoff,
    ) -> bool:
        """Hand the outcome off — reply, retry or dead letter — then settle the delivery."""
        if outcome.error is None:
            return await handoff.finish(delivery, envelope.reply_to, outcome)
        policy = self.app.tasks[envelope.task].options.retry
        delay = None if exc is None else next_delay(policy, envelope.attempt, exc)
        if delay is not None:
            return await handoff.retry(delivery, envelope, delay)
        error = outcome.error
        if isinstance(exc, Retry) and exc.__cause__ is None:  # asked for an attempt not left
            error = replace(
                error,
                message=f"{error.message}, but attempt {envelope.attempt} was the last that "
                f"the task's retry policy allows (max_attempts={policy.max_attempts})",
            )
        return await handoff.dead_letter(
            delivery,
            reason="timeout" if error.kind == "timeout" else "failed",
            error=error,
            task_id=envelope.id,
            task_name=envelope.task,
            reply_to=envelope.reply_to,
        )

    async def _already_running(self, delivery: Delivery, envelope: Envelope) -> bool:
        """A redelivery of a message this worker is still running (its channel was closed, e.g.
        by RabbitMQ's consumer timeout): wait for that run instead of starting a second one."""
        running = self._running_ids.get((envelope.id, envelope.attempt))
        if running is None:
            return False
        log.info(
            "task %s id=%s is already running here; its redelivery waits for it",
            envelope.task,
            envelope.id,
        )
        if await asyncio.shield(running):
            await settle(delivery, ack=True)
            return True
        return False

    async def _decode(self, delivery: Delivery, handoff: Handoff) -> Envelope | None:
        props = delivery.properties
        try:
            return Envelope.decode(
                delivery.body,
                message_id=props.message_id,
                headers=props.headers,
                reply_to=props.reply_to,
                content_type=props.content_type,
                max_size=self.app.settings.max_message_size,
            )
        except DecodeError as exc:
            await handoff.dead_letter(
                delivery,
                reason="decode",
                error=ErrorInfo("decode", "DecodeError", exc.message),
                task_id=props.correlation_id or props.message_id,
                task_name=_header_str(props.headers, H_TASK),
                reply_to=props.reply_to,
            )
            return None

    async def _count_delivery(
        self, delivery: Delivery, envelope: Envelope, handoff: Handoff
    ) -> bool | None:
        """Count deliveries that were never settled; poison goes to the DLQ.

        Returns whether this is a redelivery, or None when the message was handled here
        (re-published with its count, or dead-lettered as poison).
        """
        headers = delivery.properties.headers or {}
        recounting = self._recounting.get(envelope.id)
        if recounting is not None:
            await recounting.wait()  # this may be the copy: let the old one's ack go out first
        quorum_count = headers.get("x-delivery-count")
        if isinstance(quorum_count, int) and not isinstance(quorum_count, bool):
            deaths = quorum_count  # quorum queues count returned deliveries themselves
        else:
            deaths = _header_int(headers, H_DELIVERIES) + int(delivery.redelivered)
            if delivery.redelivered and deaths < self.max_deliveries:
                self._recounting[envelope.id] = done = asyncio.Event()
                try:
                    await handoff.recount(delivery, deaths)
                finally:
                    if self._recounting.get(envelope.id) is done:  # two copies may recount
                        del self._recounting[envelope.id]
                    done.set()
                return None
        if deaths >= self.max_deliveries:
            message = (
                f"task {envelope.task} was delivered {deaths} times without being settled "
                "(each time its worker died or lost its connection): treated as poison"
            )
            await handoff.dead_letter(
                delivery,
                reason="poison",
                error=ErrorInfo("dead_lettered", "poison", message),
                task_id=envelope.id,
                task_name=envelope.task,
                reply_to=envelope.reply_to,
            )
            return None
        return delivery.redelivered or deaths > 0

    def _refuse(self, envelope: Envelope) -> tuple[str, ErrorInfo | None]:
        """Why this worker must not run ``envelope``, if it must not."""
        if envelope.task not in self.app.tasks:
            message = f"no task named {envelope.task!r} is registered on worker {self.identity}"
            return "not_found", ErrorInfo("not_found", "TaskNotFoundError", message)
        if envelope.deadline is not None and self.app.broker.now() > envelope.deadline:
            message = f"task {envelope.task} expired before it started"
            return "expired", ErrorInfo("dead_lettered", "expired", message)
        return "", None

    def _channel_lost(self, queue: str, exc: BaseException | None) -> None:
        """A consuming channel closed: its unacked deliveries are back in the queue."""
        running = [(name, tid) for q, name, tid in self._current.values() if q == queue]
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


def _header_int(headers: dict[str, Any], key: str) -> int:
    value = headers.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _header_str(headers: dict[str, Any] | None, key: str) -> str:
    value = (headers or {}).get(key)
    return value if isinstance(value, str) else ""
