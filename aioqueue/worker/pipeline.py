"""One delivery, start to end: decode → guards → run → hand-off.

`Pipeline.process` is the whole path of a message through a worker, in four readable steps:

0. with signing keys, the signature (`aioqueue.worker.signature`): unsigned, forged, stale
   or replayed messages are dead-lettered (reason ``signature``) before they are decoded;
1. decode: an unreadable message is dead-lettered (reason ``decode``);
2. guards: a redelivery of a run still going here waits for it; a redelivered message on a
   classic queue is re-published with its crash count, and poison is dead-lettered; a task
   this worker does not have, or one past its deadline, is dead-lettered;
3. run: the task itself (`aioqueue.worker.execute`);
4. hand-off: `judge` decides once what became of the run — succeeded, retried (with its
   delay), failed or timed out — and that one verdict is both handed off (reply, retry or
   dead letter, then the ack: `aioqueue.worker.handoff`) and told to the observers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from ..app import App
from ..broker import Delivery, settle
from ..errors import DecodeError
from ..message import H_DELIVERIES, H_TASK, Envelope, ErrorInfo, Outcome
from ..message.celery import CeleryFields, RefusedMessage, conform_arguments, decode_task, is_celery
from .controls import RunControls, cancelled_error
from .emit import Emitter
from .events import TaskObserver, Verdict, notify
from .execute import execute
from .handoff import Handoff
from .judge import judge
from .limits import ConcurrencyLimits, needs_pacing
from .signature import SeenMessages, SignatureCheck
from .workflow import Workflows

__all__ = ["Pipeline", "Verdict", "judge"]

log = logging.getLogger("aioqueue.worker")


class Pipeline:
    """Takes each delivery of one worker from its bytes to its ack."""

    def __init__(
        self,
        app: App,
        handoff: Handoff,
        executor: ThreadPoolExecutor,
        *,
        observers: Sequence[TaskObserver],
        max_deliveries: int,
        identity: str,
        replay_guard: SeenMessages | None = None,
    ) -> None:
        self.app = app
        self.handoff = handoff
        self.workflows = Workflows(app, handoff)
        self.executor = executor
        self.observers = observers
        self.max_deliveries = max_deliveries
        self.identity = identity
        # this worker's loop: looked up once (each lookup checks the process, a system call)
        self.loop = asyncio.get_running_loop()
        # (queue, task, task id) of each run in hand, for a lost channel's log line
        self.current: dict[int, tuple[str, str, str]] = {}
        self._recounting: dict[str, asyncio.Event] = {}
        # runs in hand by (task id, attempt): a retry is the same id with the next attempt,
        # and may arrive (with no delay) before the attempt that published it is settled
        self._running_ids: dict[tuple[str, int], asyncio.Future[bool]] = {}
        # cancelled ids (the worker's `CancelListener` keeps them), each run's way to stop it
        self.controls = RunControls()
        self.limits = ConcurrencyLimits()  # the worker gives it its slots
        # with signing keys: unsigned, forged, stale and replayed messages never get further
        keys = app.signing
        self.signature = None if keys is None else SignatureCheck(app, keys, handoff, replay_guard)

    async def receive(self, delivery: Delivery) -> Envelope | None:
        """(Signature →) decode, and tell the observers the task was received: the worker
        calls this as a delivery arrives, before it waits for a concurrency slot, so a task in
        hand but not yet started is seen (``task-received``: queued). None when it was
        refused here (dead-lettered)."""
        if self.signature is not None and not await self.signature.admit(delivery):
            return None
        envelope = self._read(delivery)
        if isinstance(envelope, DecodeError):
            await self._refuse_unreadable(delivery, envelope)
            return None
        notify(
            self.observers, "received", envelope.task, envelope.id, envelope.attempt,
            delivery.queue, envelope.args, envelope.kwargs,
        )  # fmt: skip
        return envelope

    async def process(self, delivery: Delivery, envelope: Envelope | None = None) -> None:
        """(Signature →) decode, unless `receive` did (``envelope``) → guards → run →
        hand-off."""
        if envelope is None:
            envelope = await self.receive(delivery)
            if envelope is None:
                return
        if await self._already_running(delivery, envelope):
            return
        if self.controls.is_cancelled(envelope.id, envelope):  # queued, or from the ladder
            await self._refuse_cancelled(delivery, envelope)
            return
        redelivered = await self._count_delivery(delivery, envelope)
        if redelivered is None:
            return
        reason, error = self._refuse(envelope)
        if error is not None:
            await self._dead_letter(delivery, envelope, reason, error)
            return
        if envelope.celery is not None:
            envelope = await self._celery_guards(delivery, envelope)
            if envelope is None:
                return
        task = self.app.tasks[envelope.task]
        if needs_pacing(task, delivery):  # its turn comes from the pacer, in RabbitMQ
            await self.handoff.hold(delivery, task.name)
            return
        async with self.limits.turn(task):  # a chord's callback runs only with its claim
            await self.workflows.run(
                delivery, envelope, lambda: self._run(delivery, envelope, redelivered)
            )

    async def _celery_guards(self, delivery: Delivery, envelope: Envelope) -> Envelope | None:
        """A Celery message: wait for its ETA in the delay ladder, and fit kombu-typed
        arguments to the task's annotations. None when it was handed off here."""
        assert envelope.celery is not None
        eta = envelope.celery.eta
        now = self.app.broker.now()
        if eta is not None and eta > now:
            await self.handoff.postpone(delivery, envelope, eta - now)
            return None
        try:
            args, kwargs = conform_arguments(
                self.app.tasks[envelope.task].fn, envelope.args, envelope.kwargs
            )
        except DecodeError as exc:
            error = ErrorInfo("decode", "DecodeError", exc.message)
            await self._dead_letter(delivery, envelope, "decode", error)
            return None
        return replace(envelope, args=args, kwargs=kwargs)

    async def _run(self, delivery: Delivery, envelope: Envelope, redelivered: bool) -> bool:
        """Run the task and hand its outcome off; whether the hand-off was confirmed."""
        task = self.app.tasks[envelope.task]
        self.current[id(delivery)] = (delivery.queue, envelope.task, envelope.id)
        handed_off = self.loop.create_future()
        run_key = (envelope.id, envelope.attempt)
        self._running_ids[run_key] = handed_off
        for observer in self.observers:
            observer.started(envelope.task, envelope.id, envelope.attempt)
        started = time.perf_counter()
        try:
            emitter = Emitter(
                self.app.broker, envelope, observers=self.observers, signing=self.app.signing
            )
            # in this delivery's own task (`controls.py`: how a cancellation reaches it)
            cancellable = task.is_async or task.is_generator
            control = self.controls.start(envelope.id, cancellable=cancellable, loop=self.loop)
            try:
                try:
                    outcome, exc = await execute(
                        task,
                        envelope,
                        redelivered=redelivered,
                        threads=self.executor,
                        emitter=emitter,
                        cancelled=control.flag,
                        loop=self.loop,
                    )
                finally:
                    self.controls.end(envelope.id, control)
                    ours = control.ours()
            except asyncio.CancelledError:
                if not ours:
                    raise  # the worker's own shutdown, not (only) a cancellation
            duration = time.perf_counter() - started
            if control.flag.is_set():  # whatever the run did after it was cancelled
                verdict = Verdict("cancelled", error=cancelled_error(envelope, running=True))
                outcome = Outcome(envelope.id, envelope.task, error=verdict.error)
            else:
                verdict = judge(envelope, outcome, exc, task.options.retry)
            handed_off.set_result(await self._hand_off(delivery, envelope, outcome, verdict))
            self._report(envelope, verdict, duration, outcome)
            return bool(handed_off.result())
        finally:
            del self.current[id(delivery)]
            if self._running_ids.get(run_key) is handed_off:  # two copies may run here
                del self._running_ids[run_key]
            if not handed_off.done():
                handed_off.set_result(False)

    def refusal(self, delivery: Delivery, envelope: Envelope) -> Awaitable[None] | None:
        """For a cancelled task not running here, before it has a slot: its refusal to await
        (None otherwise: no coroutine made per delivery)."""
        running = (envelope.id, envelope.attempt) in self._running_ids
        if running or not self.controls.is_cancelled(envelope.id, envelope):
            return None
        return self._refuse_cancelled(delivery, envelope)

    async def _refuse_cancelled(self, delivery: Delivery, envelope: Envelope) -> None:
        self._tell_cancelled(envelope)  # before its dead letter, as for a running task
        error = cancelled_error(envelope, running=False)
        await self._dead_letter(delivery, envelope, "cancelled", error)

    def _tell_cancelled(self, envelope: Envelope) -> None:
        notify(self.observers, "cancelled", envelope.task, envelope.id, envelope.attempt)

    async def _hand_off(
        self, delivery: Delivery, envelope: Envelope, outcome: Outcome, verdict: Verdict
    ) -> bool:
        """Hand the verdict off — reply, retry or dead letter — then settle the delivery."""
        if verdict.result == "succeeded" and envelope.workflow is not None:
            return await self.workflows.advance(delivery, envelope, outcome)
        if verdict.result == "succeeded":
            return await self.handoff.finish(
                delivery, envelope.reply_to, outcome, celery=envelope.celery
            )
        if verdict.retry_delay is not None:
            return await self.handoff.retry(delivery, envelope, verdict.retry_delay)
        assert verdict.error is not None
        if verdict.result == "cancelled":
            self._tell_cancelled(envelope)
        return await self._dead_letter(delivery, envelope, verdict.result, verdict.error)

    def _report(
        self, envelope: Envelope, verdict: Verdict, duration: float, outcome: Outcome
    ) -> None:
        notify(
            self.observers, "outcome", envelope.task, envelope.id, envelope.attempt, verdict,
            duration, outcome,
        )  # fmt: skip
        for observer in self.observers:
            try:
                observer.finished(
                    envelope.task, envelope.id, envelope.attempt, verdict.result, duration
                )
            except Exception:  # an observer's bug must not touch the task's outcome
                log.exception("task observer %r failed", observer)

    async def _dead_letter(
        self, delivery: Delivery, envelope: Envelope, reason: str, error: ErrorInfo
    ) -> bool:
        return await self.handoff.dead_letter(
            delivery,
            reason=reason,
            error=error,
            task_id=envelope.id,
            task_name=envelope.task,
            reply_to=envelope.reply_to,
            celery=envelope.celery,
            reply_id=envelope.workflow.id if envelope.workflow is not None else None,
        )

    # -- decode and guards --------------------------------------------------------------------

    def _read(self, delivery: Delivery) -> Envelope | DecodeError:
        """The delivery's envelope — an aioqueue message, or a Celery protocol-2 message (told
        by its ``task`` header) — or why it cannot be read."""
        props = delivery.properties
        max_size = self.app.settings.max_message_size
        try:
            if is_celery(props.headers):
                return decode_task(delivery.body, props, max_size=max_size)
            return Envelope.decode(
                delivery.body,
                message_id=props.message_id,
                headers=props.headers,
                reply_to=props.reply_to,
                content_type=props.content_type,
                max_size=max_size,
            )
        except DecodeError as exc:
            return exc

    async def _refuse_unreadable(self, delivery: Delivery, exc: DecodeError) -> None:
        """Dead-letter a message that could not be read, and tell its caller if it has one."""
        props = delivery.properties
        reason, error = _unreadable(exc)
        headers = props.headers or {}
        celery = is_celery(props.headers)
        if celery:  # tell a Celery caller, unless it asked for no result
            task_id, name = _header_str(headers, "id"), _header_str(headers, "task")
            reply_to = None if headers.get("ignore_result") is True else props.reply_to
        else:
            task_id = props.correlation_id or props.message_id or ""
            name, reply_to = _header_str(headers, H_TASK), props.reply_to
        await self.handoff.dead_letter(
            delivery,
            reason=reason,
            error=error,
            task_id=task_id,
            task_name=name,
            reply_to=reply_to,
            celery=CeleryFields() if celery else None,
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

    async def _count_delivery(self, delivery: Delivery, envelope: Envelope) -> bool | None:
        """Count deliveries that were never settled; poison goes to the DLQ.

        Returns whether this is a redelivery, or None when the message was handled here
        (re-published with its count, or dead-lettered as poison).
        """
        headers = delivery.properties.headers or {}
        recounting = self._recounting.get(envelope.id)
        if recounting is not None:
            await recounting.wait()  # this may be the copy: let the old one's ack go out first
        quorum_count = headers.get("x-delivery-count")
        if (
            isinstance(quorum_count, int)
            and not isinstance(quorum_count, bool)
            and self.app.queue_type_of(delivery.queue) == "quorum"
        ):
            # a quorum queue counts returned deliveries itself and writes the header when it
            # redelivers; a first delivery (not redelivered) carries a publisher's value, if
            # any (3.10 keeps it): it has died 0 times. On a classic queue the header can only
            # be a publisher's, so it counts for nothing there.
            deaths = quorum_count if delivery.redelivered else 0
        else:
            deaths = _header_int(headers, H_DELIVERIES) + int(delivery.redelivered)
            if delivery.redelivered and deaths < self.max_deliveries:
                self._recounting[envelope.id] = done = asyncio.Event()
                try:
                    await self.handoff.recount(delivery, deaths)
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
            error = ErrorInfo("dead_lettered", "poison", message)
            await self._dead_letter(delivery, envelope, "poison", error)
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


def _unreadable(exc: DecodeError) -> tuple[str, ErrorInfo]:
    """The dead-letter reason and the caller's error for a message that cannot run as sent."""
    if not isinstance(exc, RefusedMessage):
        return "decode", ErrorInfo("decode", "DecodeError", exc.message)
    if exc.reason == "serializer":  # what a Celery caller knows from kombu
        return exc.reason, ErrorInfo(
            "decode", "ContentDisallowed", exc.message, module="kombu.exceptions"
        )
    return exc.reason, ErrorInfo("decode", "NotImplementedError", exc.message, module="builtins")


def _header_int(headers: dict[str, Any], key: str) -> int:
    value = headers.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _header_str(headers: dict[str, Any] | None, key: str) -> str:
    value = (headers or {}).get(key)
    return value if isinstance(value, str) else ""
