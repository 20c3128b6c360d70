"""Results pushed to the caller: one durable reply queue per client, futures by correlation id.

The reply queue (``aioqueue.reply.<client id>``) is durable and expires only when unused, replies
are persistent and acked after they resolved their future, so a connection blip or a broker
restart loses none (invariant 5). A reply whose task id has no pending future — a duplicate
after a redelivery, or a reply to an earlier process — is acked and dropped: one outcome per
handle (invariant 3). A message that cannot be read — a body that is not an outcome, or
properties the frame reader could not decode (``aioqueue-undecodable``) — is logged, counted
(``ReplyConsumer.unreadable``, and ``App.on_unreadable_reply`` hooks) and dropped: the handle
keeps waiting for a readable outcome, so a forged or broken reply cannot take the real one's place.
With signing keys (``App(signing_keys=...)``) an unsigned or badly signed reply or progress
event is such a message too (replies of Celery workers excepted: they cannot sign).

A task sent to a Celery worker (`aioqueue.celery_task`) is answered in the ``rpc://`` result
backend's format: its reply is read with `aioqueue.message.celery.decode_reply`, and a state
that is not an outcome yet (RETRY, STARTED) is acked and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from .broker import Broker, Consumer, Delivery, ack_soon
from .errors import (
    AioqueueError,
    BrokerConnectionError,
    DeadLetteredError,
    DecodeError,
    ResultUnavailableError,
    TaskCancelledError,
    TaskError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from .message import H_EVENT, Outcome, refuse_unreadable
from .message.celery import decode_reply
from .message.signing import SigningKeys, verify
from .streams import EventSink, Progress, Result, StreamReader
from .topology import QueueType, reply_queue_arguments, reply_queue_name
from .tracing import WaitSpan

__all__ = ["ReplyConsumer", "ResultHandle"]

_NO_SPAN: contextlib.AbstractContextManager[None] = contextlib.nullcontext()  # tracing off

log = logging.getLogger("aioqueue.results")

R = TypeVar("R")


class ReplyConsumer:
    """Consumes this client's reply queue and resolves the matching futures."""

    def __init__(
        self,
        broker: Broker,
        client_id: str,
        *,
        prefetch: int = 1000,
        on_unreadable: Sequence[Callable[[], None]] = (),
        queue_type: QueueType = "classic",
        signing: SigningKeys | None = None,
    ) -> None:
        self._broker = broker
        # with keys, only signed replies and progress count: others are dropped as unreadable
        self._signing = signing
        self._queue_type: QueueType = queue_type
        self.queue = reply_queue_name(client_id)
        self._prefetch = prefetch
        self._pending: dict[str, asyncio.Future[Outcome]] = {}
        self._sinks: dict[str, EventSink] = {}
        self._celery: dict[str, str] = {}  # task id -> name, of tasks sent to Celery workers
        self._subscription: Consumer | None = None
        self._lock = asyncio.Lock()
        self._on_unreadable = on_unreadable
        self.dropped = 0  # replies to no pending handle (a duplicate, an earlier process's)
        self.unreadable = 0  # messages that could not be read: logged and dropped

    @property
    def pending(self) -> int:
        """How many handles still wait for their outcome."""
        return len(self._pending)

    @property
    def started(self) -> bool:
        """Whether the reply queue is declared and consumed."""
        return self._subscription is not None

    async def ensure_started(self) -> None:
        """Declare the reply queue and consume it (once; later calls return at once)."""
        if self._subscription is not None:
            return
        async with self._lock:
            if self._subscription is None:
                expires = self._broker.settings.reply_queue_expires
                arguments = reply_queue_arguments(expires, self._queue_type)
                await self._broker.declare_queue(self.queue, arguments)
                self._subscription = await self._broker.subscribe(
                    self.queue, self._on_reply, prefetch=self._prefetch
                )

    def expect(
        self, task_id: str, *, celery_task: str | None = None
    ) -> tuple[asyncio.Future[Outcome], EventSink]:
        """Register interest in ``task_id``'s outcome (and progress) before it is published.

        ``celery_task``: the task's name when a Celery worker runs it; its reply is then read
        in Celery's ``rpc://`` format.
        """
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending[task_id] = future
        if celery_task is not None:
            self._celery[task_id] = celery_task
        sink = self._sinks[task_id] = EventSink(self._broker.settings.event_buffer)
        return future, sink

    def forget(self, task_id: str) -> None:
        """Drop interest (the publish failed, so no outcome will come)."""
        self._pending.pop(task_id, None)
        self._sinks.pop(task_id, None)
        self._celery.pop(task_id, None)

    def _unreadable(self, task_id: str, what: str, reason: str) -> None:
        """Count and log a message of the reply queue that cannot be read; it is dropped (acked)
        and the handle, if any, keeps waiting for a readable outcome."""
        self.unreadable += 1
        log.warning("dropped an unreadable %s of task %s: %s", what, task_id or "?", reason)
        for hook in self._on_unreadable:
            try:
                hook()
            except Exception:  # a metrics hook's bug must not stop the reply consumer
                log.exception("on_unreadable_reply hook %r failed", hook)

    def _on_progress(self, task_id: str, delivery: Delivery) -> None:
        sink = self._sinks.get(task_id)
        if sink is None:
            return
        try:
            if self._signing is not None:
                verify(delivery.properties, delivery.body, self._signing)
            sink.push(delivery, self._broker.settings.max_message_size)
        except DecodeError as exc:
            self._unreadable(task_id, "progress event", exc.message)

    def _on_reply(self, delivery: Delivery) -> None:
        """A reply or a progress event, read and acked at once (no task per reply)."""
        task_id = delivery.properties.correlation_id or ""
        headers = delivery.properties.headers or {}
        try:
            # properties the frame reader could not read: neither an outcome nor a progress
            # event of ours can be told from such a message, whatever its headers claim
            refuse_unreadable(headers)
        except DecodeError as exc:
            what = "progress event" if headers.get(H_EVENT) == "progress" else "reply"
            self._unreadable(task_id, what, exc.message)
        else:
            if headers.get(H_EVENT) == "progress":
                self._on_progress(task_id, delivery)
            else:
                self._on_outcome(task_id, delivery)
        ack_soon(delivery)

    def _on_outcome(self, task_id: str, delivery: Delivery) -> None:
        future = self._pending.get(task_id)
        if future is None:
            self.dropped += 1
            log.debug("dropped a reply for unknown or finished task %r", task_id)
            return
        # read before the handle is let go: an unreadable reply (forged, or broken on the
        # way) must not take the place of the real outcome, which may still come
        celery_task = self._celery.get(task_id)
        max_size = self._broker.settings.max_message_size
        try:
            if celery_task is None:
                if self._signing is not None:  # (a Celery worker cannot sign its replies)
                    verify(delivery.properties, delivery.body, self._signing)
                outcome = Outcome.decode(delivery.body, task_id=task_id, max_size=max_size)
            else:
                decoded = decode_reply(
                    delivery.body,
                    task_id=task_id,
                    task_name=celery_task,
                    content_type=delivery.properties.content_type,
                    max_size=max_size,
                )
                if decoded is None:  # a state on the way (RETRY, STARTED): not the outcome
                    log.debug("Celery task %s is not done yet: a progress state ignored", task_id)
                    return
                outcome = decoded
        except DecodeError as exc:
            what = "reply" if celery_task is None else "Celery reply"
            self._unreadable(task_id, what, exc.message)
            return
        del self._pending[task_id]
        self._celery.pop(task_id, None)
        sink = self._sinks.pop(task_id, None)
        if sink is not None:
            sink.notify()
        if not future.done():
            future.set_result(outcome)

    async def close(self, reason: str = "the app was closed before the outcome arrived") -> None:
        """Stop consuming and fail every pending future with a clear error."""
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None
        pending, self._pending = self._pending, {}
        self._celery.clear()
        for task_id, future in pending.items():
            if not future.done():
                future.set_exception(BrokerConnectionError(reason, task_id=task_id))
                future.exception()  # retrieved: a handle nobody awaits must not log an error


class _Relay:
    """A future (``waiter``) that completes as a handle's does and whose cancelling leaves the
    handle's alone: ``asyncio.shield`` for `ResultHandle.result`, with fewer objects for the
    cyclic collector to walk while callers wait (docs/design.md, "The collector in the
    producer")."""

    __slots__ = ("future", "waiter")

    def __init__(self, future: asyncio.Future[Outcome]) -> None:
        self.future = future
        self.waiter: asyncio.Future[Outcome] = future.get_loop().create_future()
        # it reads no context variable: one shared empty context, not a copy per callback
        future.add_done_callback(self, context=_NO_CONTEXT)

    def let_go(self) -> None:
        """After the wait ended: a cancelled or timed-out wait stops listening."""
        if not self.waiter.done() or self.waiter.cancelled():
            self.future.remove_done_callback(self)

    def __call__(self, future: asyncio.Future[Outcome]) -> None:
        if self.waiter.done():
            return
        if future.cancelled():
            self.waiter.cancel()
        elif (error := future.exception()) is not None:
            self.waiter.set_exception(error)
        else:
            self.waiter.set_result(future.result())


_NO_CONTEXT = contextvars.Context()


class ResultHandle(Generic[R]):
    """The caller's handle on one submitted task.

    Attributes:
        id: The task id, unique per submit.
        task_name: The task's registered name.
    """

    __slots__ = ("_canceller", "_future", "_sink", "_stream", "id", "task_name", "wait_span")

    def __init__(
        self,
        task_id: str,
        task_name: str,
        future: asyncio.Future[Outcome] | None,
        sink: EventSink | None = None,
        stream: StreamReader | None = None,
        *,
        canceller: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._canceller = canceller
        self.id = task_id
        self.task_name = task_name
        self._future = future
        self._sink = sink
        self._stream = stream
        # with tracing on (`aioqueue.tracing`): `result` waits in a span linked to the submit's
        self.wait_span: WaitSpan | None = None

    def __repr__(self) -> str:
        state = "ignored" if self._future is None else ("done" if self.done() else "pending")
        return f"<ResultHandle {self.task_name} id={self.id} {state}>"

    def done(self) -> bool:
        """Whether the outcome has arrived (never blocks)."""
        return self._future is not None and self._future.done()

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the task's return value.

        Raises:
            TaskError: the task raised (after its last attempt).
            TaskTimeoutError: the task exceeded its own timeout.
            TaskCancelledError: the task was cancelled (``cancel``).
            TaskNotFoundError: no worker registered the task's name.
            DeadLetteredError: the message was dead-lettered without running (expired, poison).
            DecodeError: the worker could not read the message.
            TimeoutError: no outcome within ``timeout`` seconds (the handle stays usable).
            ResultUnavailableError: the task was submitted with ``ignore_result``.
        """
        if self._future is None:
            raise ResultUnavailableError(
                f"task {self.task_name} was submitted with ignore_result: it has no result",
                task_name=self.task_name,
                task_id=self.id,
            )
        future = self._future
        # with tracing on, the wait is a span linked to the submit's (`aioqueue.tracing`)
        with _NO_SPAN if self.wait_span is None else self.wait_span():
            if future.done():
                outcome = future.result()
            else:
                relay = _Relay(future)  # `asyncio.wait_for(asyncio.shield(future), timeout)`
                try:
                    waiter = relay.waiter
                    outcome = await (
                        waiter if timeout is None else asyncio.wait_for(waiter, timeout)
                    )
                finally:
                    relay.let_go()
            return self._unwrap(outcome)  # type: ignore[no-any-return]

    async def cancel(self) -> None:
        """Cancel this task; returns once the cancellation is published (confirmed), without
        waiting for a worker. `result` then raises `TaskCancelledError` — unless the task
        had already finished (cancelling a finished task changes nothing). See `App.cancel`.
        """
        if self._canceller is None:
            raise AioqueueError(
                "this handle cannot cancel its task: use app.cancel(task_id)",
                task_name=self.task_name,
                task_id=self.id,
            )
        await self._canceller(self.id)

    async def events(self) -> AsyncIterator[Progress | Result]:
        """Progress updates as they come, then the `Result` — or the task's error, raised.

        Updates are ordered and never repeated; a reader that lags more than
        ``Settings.event_buffer`` updates behind loses the oldest ones.
        """
        future = self._require_future()
        sink = self._sink
        while True:
            while sink is not None and sink.events:
                yield sink.events.popleft()
            if future.done():
                yield Result(self._unwrap(future.result()))
                return
            if sink is None:
                await asyncio.shield(future)
                continue
            sink.changed.clear()
            changed: asyncio.Future[Any] = asyncio.ensure_future(sink.changed.wait())
            waiters: set[asyncio.Future[Any]] = {changed, future}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()

    async def stream(self) -> AsyncIterator[Any]:
        """The items of an ``async def`` generator task, in order, each once.

        At most ``Settings.event_buffer`` items wait in this process; the rest wait in
        RabbitMQ until read. Ends when the task finished and every item was read; raises the
        task's error after the items that arrived.
        """
        future = self._require_future()
        if self._stream is None:
            raise ResultUnavailableError(
                f"task {self.task_name} is not a registered generator task: it has no stream",
                task_name=self.task_name,
                task_id=self.id,
            )
        try:
            while True:
                expected = self._expected_items(future)
                try:
                    yield await self._stream.next_item(future, expected)
                except StopAsyncIteration:
                    break
            self._unwrap(future.result())
        finally:
            await self._stream.close()

    def _expected_items(self, future: asyncio.Future[Outcome]) -> int | None:
        if not future.done() or future.exception() is not None:
            return None
        return future.result().items

    def _require_future(self) -> asyncio.Future[Outcome]:
        if self._future is None:
            raise ResultUnavailableError(
                f"task {self.task_name} was submitted with ignore_result: it has no result",
                task_name=self.task_name,
                task_id=self.id,
            )
        return self._future

    def _unwrap(self, outcome: Outcome) -> Any:
        err = outcome.error
        if err is None:
            return outcome.value
        ctx = {"task_name": outcome.task_name or self.task_name, "task_id": self.id}
        if err.kind == "timeout":
            raise TaskTimeoutError(err.type_name, err.message, traceback=err.traceback, **ctx)
        if err.kind == "cancelled":
            raise TaskCancelledError(err.type_name, err.message, traceback=err.traceback, **ctx)
        if err.kind == "not_found":
            raise TaskNotFoundError(err.message, **ctx)
        if err.kind == "decode":
            raise DecodeError(err.message, **ctx)
        if err.kind == "dead_lettered":
            raise DeadLetteredError(err.message, reason=err.type_name, **ctx)
        if err.kind == "error":
            raise TaskError(err.type_name, err.message, traceback=err.traceback, **ctx)
        raise AioqueueError(f"{err.type_name}: {err.message}", **ctx)
