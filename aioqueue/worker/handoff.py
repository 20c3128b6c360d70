"""Handing an outcome off before the ack: replies and dead letters, each confirmed.

Every function here publishes and waits for RabbitMQ's confirm, then settles the delivery:
ack when the outcome is safely elsewhere, reject-with-requeue when it could not be handed off
(the message runs again rather than being lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from ..app import App
from ..broker import Delivery, settle
from ..errors import PublishError, UnroutableError
from ..message import (
    H_DEAD_AT,
    H_DEAD_ERROR,
    H_DEAD_QUEUE,
    H_DEAD_REASON,
    H_DEAD_TRACEBACK,
    H_DEAD_WORKER,
    H_DELIVERIES,
    H_RATE_QUEUE,
    Envelope,
    ErrorInfo,
    Outcome,
    dead_letter_copy,
    reply_properties,
)
from ..message.celery import CeleryFields, encode_reply
from ..message.signing import is_signed, sign, signed_due_at
from ..ratelimit import holding_queue_arguments, holding_queue_name
from ..topology import dlq_arguments, dlq_name
from .events import TaskObserver

__all__ = ["Handoff", "settle_after"]

log = logging.getLogger("aioqueue.worker")

MAX_HEADER_TRACEBACK = 4096
DEAD_LETTER_BACKOFF = 0.5  # seconds a message waits before its requeue after a failed hand-off
DEAD_LETTER_BACKOFF_MAX = 10.0  # ... doubling per failure in a row, up to this


async def settle_after(
    delivery: Delivery,
    step: Awaitable[object],
    failure: str,
    *,
    errors: tuple[type[BaseException], ...] = (PublishError,),
    flush: bool = False,
) -> bool:
    """Await ``step`` (what must be confirmed first), then ack ``delivery``; if ``step`` raises
    one of ``errors``, log ``failure`` with it and requeue the delivery instead (a crash in
    between duplicates the message at worst, never loses it). Returns whether it was acked."""
    try:
        await step
    except errors as exc:
        log.error("%s (%s); requeued", failure, exc)
        await settle(delivery, ack=False, requeue=True)
        return False
    await settle(delivery, ack=True, flush=flush)
    return True


class Handoff:
    """Publishes replies and dead letters for one worker, then settles deliveries."""

    def __init__(self, app: App, identity: str, observers: Sequence[TaskObserver] = ()) -> None:
        self.app = app
        self.broker = app.broker
        self.identity = identity
        self.observers = observers
        self._failures: dict[str, int] = {}  # queue -> dead letters not handed off in a row

    async def retry(self, delivery: Delivery, envelope: Envelope, delay: float) -> bool:
        """Publish the next attempt (through the delay ladder), then ack this one."""
        nxt = replace(envelope, attempt=envelope.attempt + 1)
        if nxt.celery is not None:  # a Celery worker reading it would wait as long
            nxt = replace(nxt, celery=replace(nxt.celery, eta=self.broker.now() + delay))
        if not await self._republish(delivery, nxt, delay, "retry"):
            return False
        log.info(
            "retrying task %s id=%s: attempt %d in %.1fs",
            envelope.task,
            envelope.id,
            envelope.attempt + 1,
            delay,
        )
        return True

    async def postpone(self, delivery: Delivery, envelope: Envelope, delay: float) -> bool:
        """A message that must not run before its ETA (Celery's ``eta``/``countdown``): it
        waits ``delay`` seconds in the delay ladder — in RabbitMQ, never in this worker."""
        if not await self._republish(delivery, envelope, delay, "wait for its ETA"):
            return False
        log.info("task %s id=%s waits %.1fs for its ETA", envelope.task, envelope.id, delay)
        return True

    async def _republish(
        self, delivery: Delivery, envelope: Envelope, delay: float, what: str
    ) -> bool:
        """Publish ``envelope`` to the delivery's queue after ``delay``, then ack the delivery;
        requeue it instead if the publish is not confirmed."""
        return await settle_after(
            delivery,
            self.app.producer.publish(envelope, delivery.queue, delay=delay),
            f"could not publish the {what} of {envelope.task} id={envelope.id}",
        )

    async def hold(self, delivery: Delivery, task_name: str) -> bool:
        """A rate-limited task that has not had its turn yet: move it to the task's holding
        queue, where the pacer lets it back at the rate (`aioqueue.worker.pacer`); the copy
        remembers its work queue. Confirmed, then acked; requeued if not confirmed."""
        copy = dead_letter_copy(delivery.properties, {H_RATE_QUEUE: delivery.queue})
        holding = holding_queue_name(task_name)

        async def publish() -> None:
            try:
                await self.broker.publish(holding, delivery.body, copy)
            except UnroutableError:  # deleted under us: declare it again, publish once more
                kind = self.app.tasks[task_name].options.queue_type
                await self.app.producer.redeclare(holding, holding_queue_arguments(kind))
                await self.broker.publish(holding, delivery.body, copy)

        failure = f"could not hold a message of {task_name} for its rate limit"
        return await settle_after(delivery, publish(), failure)

    async def recount(self, delivery: Delivery, deliveries: int) -> bool:
        """Re-publish a redelivered message with its crash count, then ack the old copy.

        Classic queues keep no delivery count, so the count travels in a header: the copy is
        confirmed before the redelivered message is acked, so a crash in between duplicates
        the message at worst and never loses it. Returns False if it had to requeue instead.
        """
        copy = dead_letter_copy(delivery.properties, {H_DELIVERIES: deliveries})
        keys = self.app.signing
        if keys is not None and is_signed(copy.headers):  # the count is signed: sign anew,
            due_at = signed_due_at(copy.headers)  # fresh as long as the message it copies
            sign(copy, delivery.body, keys, due_at=self.broker.now() if due_at is None else due_at)
        # flushed: the old copy must be gone before the new one can kill this worker
        return await settle_after(
            delivery,
            self.broker.publish(delivery.queue, delivery.body, copy),
            "could not re-publish a redelivered message",
            flush=True,
        )

    async def finish(
        self,
        delivery: Delivery,
        reply_to: str | None,
        outcome: Outcome,
        *,
        celery: CeleryFields | None = None,
    ) -> bool:
        """Send the outcome to the caller (if it waits for one), then ack."""
        ok = await self._reply(reply_to, outcome, celery)
        await settle(delivery, ack=ok, requeue=not ok)
        return ok

    async def dead_letter(
        self,
        delivery: Delivery,
        *,
        reason: str,
        error: ErrorInfo,
        task_id: str | None,
        task_name: str,
        reply_to: str | None,
        celery: CeleryFields | None = None,
        reply_id: str | None = None,
    ) -> bool:
        """Copy the message to ``Q.dlq`` with why/when/who headers, tell the caller (in
        Celery's rpc:// format when ``celery`` is set; under ``reply_id`` if given: a workflow
        step's caller waits for its workflow's id), then ack."""
        outcome = Outcome(task_id=reply_id or task_id or "", task_name=task_name, error=error)
        stored, replied = await asyncio.gather(
            self._store_dead(delivery, reason, error),
            self._reply(reply_to if task_id else None, outcome, celery),
        )
        ok = stored and replied
        if stored:
            for observer in self.observers:
                observer.dead_lettered(delivery.queue, task_name, task_id or "", reason)
            log.warning(
                "dead-lettered task %s id=%s from %r to %r: %s: %s: %s",
                task_name or "?",
                task_id or "?",
                delivery.queue,
                dlq_name(delivery.queue),
                reason,
                error.type_name,
                error.message,
            )
        if ok:
            self._failures.pop(delivery.queue, None)
        else:
            await self._back_off(delivery.queue)
        await settle(delivery, ack=ok, requeue=not ok)
        return ok

    async def _back_off(self, queue: str) -> None:
        """Hold a message whose dead letter could not be handed off a while before it goes
        back to ``queue``: requeued at once, it would come straight back and fail again, an
        ERROR line each time. The wait doubles with each failure in a row on ``queue``."""
        failures = self._failures[queue] = self._failures.get(queue, 0) + 1
        delay = min(DEAD_LETTER_BACKOFF_MAX, DEAD_LETTER_BACKOFF * 2 ** min(failures - 1, 16))
        log.info("requeueing a message of %r in %.1fs", queue, delay)
        await asyncio.sleep(delay)

    async def _store_dead(self, delivery: Delivery, reason: str, error: ErrorInfo) -> bool:
        headers: dict[str, Any] = {
            H_DEAD_REASON: reason,
            H_DEAD_ERROR: f"{error.type_name}: {error.message}"[:1024],
            H_DEAD_AT: datetime.now(UTC).isoformat(),
            H_DEAD_WORKER: self.identity,
            H_DEAD_QUEUE: delivery.queue,
        }
        if error.traceback:
            headers[H_DEAD_TRACEBACK] = error.traceback[-MAX_HEADER_TRACEBACK:]
        copy = dead_letter_copy(delivery.properties, headers)
        dlq = dlq_name(delivery.queue)
        try:
            try:
                await self.broker.publish(dlq, delivery.body, copy)
            except UnroutableError:
                # Q.dlq was deleted under us: declare it again as at start, publish once more
                log.warning("dead-letter queue %r was deleted; declaring it again", dlq)
                kind = self.app.queue_type_of(delivery.queue)
                await self.app.producer.redeclare(dlq, dlq_arguments(kind))
                await self.broker.publish(dlq, delivery.body, copy)
        except PublishError as exc:
            log.error("could not dead-letter a message of %r (%s); requeued", delivery.queue, exc)
            return False
        return True

    async def _reply(
        self, reply_to: str | None, outcome: Outcome, celery: CeleryFields | None = None
    ) -> bool:
        """Publish the outcome to ``reply_to`` (as Celery's rpc:// backend would, for a
        Celery caller); False means "requeue, try again later"."""
        if not reply_to:
            return True
        if reply_to.startswith("amq."):
            # No queue can be named amq.*; publishing to amq.rabbitmq.reply-to without
            # consuming it is a channel error, so a message asking for it would loop forever.
            log.warning(
                "reply_to %r of task %s id=%s is reserved by RabbitMQ; outcome discarded",
                reply_to,
                outcome.task_name,
                outcome.task_id,
            )
            return True
        if celery is not None:
            body, properties = encode_reply(outcome, parent_id=celery.parent_id)
        else:
            body, properties = outcome.encode(), reply_properties(outcome.task_id)
            if self.app.signing is not None:  # a caller with keys drops unsigned replies
                sign(properties, body, self.app.signing, due_at=self.broker.now())
        try:
            await self.broker.publish(reply_to, body, properties)
        except UnroutableError:
            # The caller's reply queue expired: nobody can receive this outcome any more.
            log.warning(
                "reply queue %r of task %s id=%s is gone; outcome discarded, task settled",
                reply_to,
                outcome.task_name,
                outcome.task_id,
            )
        except PublishError as exc:
            log.error(
                "reply of task %s id=%s not confirmed (%s)", outcome.task_name, outcome.task_id, exc
            )
            return False
        return True
