"""The producer: (task, arguments, options) → envelope → confirmed publish.

`Producer.submit` checks the arguments against a registered task's signature and for JSON,
works out delays and deadlines, registers for the reply, and publishes (`submit_celery` the same
for a task a Celery worker runs, in Celery's format); `Producer.publish` is
the one confirmed publish of a task message (to its queue, through the delay ladder, or for a
rate-limited task of this app straight to its holding queue), used by submits and by the
worker's retries. A queue this connection declared and someone deleted
since is declared again once (`Producer.redeclare`; dead-letter queues too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .admission import Deadlines, Slots, Turn
from .errors import AioqueueError, BrokerConnectionError, PublishError, UnroutableError
from .message import H_RATE_QUEUE, Envelope, Outcome, new_id
from .message.celery import CeleryFields, encode_task
from .message.properties import task_message
from .ratelimit import holding_route
from .results import ReplyConsumer, ResultHandle
from .streams import EventSink, StreamReader
from .submit_options import check_arguments, deadline_of, delay_of
from .task import TaskOptions
from .topology import (
    delay_entry_exchange,
    delay_routing_key,
    delay_units,
    reply_queue_arguments,
    stream_queue_name,
    work_queue_arguments,
)

if TYPE_CHECKING:
    from .app import App
    from .tracing import Tracing

__all__ = ["Producer"]

log = logging.getLogger("aioqueue.app")


class Producer:
    """Submits and publishes task messages for one `App` (``app.producer``)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._redeclaring: dict[str, asyncio.Future[None]] = {}  # queue -> its declare again
        self._gate: tuple[asyncio.AbstractEventLoop, Slots] | None = None
        self._cancel = app.cancel  # every handle's canceller: one bound method, not one each

    def _admission(self, loop: asyncio.AbstractEventLoop) -> Slots:
        """Submits publishing at once, at most ``settings.max_inflight_publishes`` (the cap on
        unconfirmed publishes, which each holds one of): more wait their turn, first come
        first served, within their publish deadline. One gate per event loop."""
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, Slots(self.app.settings.max_inflight_publishes, Deadlines()))
        return self._gate[1]

    async def submit(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        ignore_result: bool | None = None,
    ) -> ResultHandle[Any]:
        """Check, build and publish one task; its handle once RabbitMQ confirmed it.

        Raises:
            TypeError: the arguments do not fit a task registered here (nothing is published).
            EncodeError: an argument is not JSON-native.
            ValueError: a bad ``countdown``, ``eta`` or ``expires``.
            PublishError: not confirmed within the publish deadline.
        """
        app = self.app
        now = app._broker.now() if app._broker is not None else time.time()
        task_id = new_id()
        # A turn first, then the checks and the message: in a burst (a `gather` of thousands)
        # a submit beyond the cap waits at the cost of a future (no coroutine or `Turn` of its
        # own meanwhile), and the first messages leave before the rest have been looked at.
        loop = asyncio.get_running_loop()
        slots, deadline = self._admission(loop), loop.time() + app.settings.publish_timeout
        waiter = slots.enter(deadline, loop)
        if waiter is not None:
            try:
                await waiter
            except asyncio.CancelledError:
                if slots.timed_out(waiter):
                    raise _not_confirmed(name, task_id, app.settings.publish_timeout) from None
                raise
        turn = Turn(slots, deadline, loop, held=True)
        try:
            kwargs = dict(kwargs or {})
            task = app.tasks.get(name)
            if task is not None:
                task.bind(tuple(args), kwargs)
            check_arguments(args, kwargs)
            delay = delay_of(now, countdown, eta)
            options = task.options if task else TaskOptions(name=name, queue=app.default_queue)
            target = queue or options.queue
            wants_reply = not (options.ignore_result if ignore_result is None else ignore_result)
            replies = app._replies
            envelope = Envelope(
                id=task_id,
                task=name,
                args=tuple(args),
                kwargs=kwargs,
                # where the reply goes, already (no copy of the envelope to add it later)
                reply_to=replies.queue if wants_reply and replies is not None else None,
                deadline=deadline_of(now, expires),
            )
        except BaseException:
            turn.give_back()
            raise
        stream = task is not None and task.is_generator
        return await self.send(
            envelope, target, wants_reply=wants_reply, delay=delay, stream=stream, turn=turn
        )

    async def submit_celery(
        self,
        name: str,
        queue: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        ignore_result: bool = False,
    ) -> ResultHandle[Any]:
        """`submit` for a task that a Celery worker runs (`aioqueue.celery_task`).

        The message is Celery's protocol 2 and goes straight to ``queue``: a ``countdown`` or
        ``eta`` is its ``eta`` header, which the Celery worker honours itself (not aioqueue's
        delay ladder). The reply is read in Celery's ``rpc://`` format.

        Raises:
            EncodeError: an argument is not JSON-native.
            ValueError: a bad ``countdown``, ``eta`` or ``expires``.
            PublishError: not confirmed within the publish deadline.
        """
        kwargs = dict(kwargs or {})
        check_arguments(args, kwargs)
        now = self.app.broker.now()
        delay = delay_of(now, countdown, eta, ladder=False)
        fields = CeleryFields(eta=now + delay if delay > 0 else None, ignore_result=ignore_result)
        envelope = Envelope(
            id=new_id(),
            task=name,
            args=tuple(args),
            kwargs=kwargs,
            deadline=deadline_of(now, expires),
            celery=fields,
        )
        return await self.send(envelope, queue, wants_reply=not ignore_result)

    def send(
        self,
        envelope: Envelope,
        queue: str,
        *,
        wants_reply: bool,
        delay: float = 0.0,
        stream: bool = False,
        turn: Turn | None = None,
    ) -> Coroutine[Any, Any, ResultHandle[Any]]:
        """Publish a new task (registering for its reply first) and return its handle.

        One publish deadline covers the whole submit, declaring queues on first use included:
        a broker that stays away past it is a `PublishError`, never a hang. With tracing on,
        the submit is a producer span, and the handle's wait is linked to it. (A plain
        function returning the coroutine to await: tracing off adds no coroutine of its own.)
        ``turn``: the submit's turn to publish (`Producer._turn`), when taken already; it is
        given back when the publish ends.
        """
        tracing = self.app.tracing
        turn = turn or self._turn()
        if tracing is None:
            return self._send(envelope, queue, wants_reply, delay, stream, turn)
        return self._traced_send(tracing, envelope, queue, wants_reply, delay, stream, turn)

    async def _traced_send(
        self,
        tracing: Tracing,
        envelope: Envelope,
        queue: str,
        wants_reply: bool,
        delay: float,
        stream: bool,
        turn: Turn,
    ) -> ResultHandle[Any]:
        try:
            with tracing.publishing(envelope, queue) as wait_span:
                handle = await self._send(envelope, queue, wants_reply, delay, stream, turn)
                handle.wait_span = wait_span
                return handle
        finally:
            turn.give_back()  # (if the span failed to open, `_send` never had it)

    def _turn(self) -> Turn:
        """A turn to publish, not yet taken, whose wait ends at the publish deadline."""
        loop = asyncio.get_running_loop()
        return Turn(self._admission(loop), loop.time() + self.app.settings.publish_timeout, loop)

    def _warm(
        self, envelope: Envelope, queue: str, wants_reply: bool, delay: float, stream: bool
    ) -> bool:
        """Whether the publish needs nothing declared or subscribed first."""
        app, broker, replies = self.app, self.app._broker, self.app._replies
        route = holding_route(app.tasks, envelope) if delay <= 0 else None
        return (
            delay <= 0
            and not stream
            and broker is not None
            and broker.is_declared(queue)
            and (route is None or broker.is_declared(route[0]))
            and (not wants_reply or (replies is not None and replies.started))
        )

    async def _send(
        self,
        envelope: Envelope,
        queue: str,
        wants_reply: bool,
        delay: float,
        stream: bool,
        turn: Turn,
    ) -> ResultHandle[Any]:
        app = self.app
        timeout = app.settings.publish_timeout
        loop = turn.loop
        deadline = turn.deadline
        receiver = _Receiver()
        try:
            # a turn first (unless `submit` took it), then the message is built: in a burst,
            # the first messages go out while the rest wait their turn unbuilt
            if not turn.held:
                await turn.take()
            try:
                replies = app._replies
                if self._warm(envelope, queue, wants_reply, delay, stream):
                    # Nothing to declare or subscribe first: the publish's own deadline is
                    # the submit's, without a timer of ours around it.
                    if wants_reply and replies is not None:
                        envelope = receiver.expect(replies, envelope)
                    await self.publish(envelope, queue, timeout=deadline - loop.time())
                else:
                    async with asyncio.timeout_at(deadline):
                        if wants_reply:
                            envelope = await receiver.prepare(app, envelope, stream=stream)
                        await self.publish(envelope, queue, delay=delay)
            finally:
                turn.give_back()
        except BaseException as exc:
            if app._replies is not None:
                app._replies.forget(envelope.id)
            await receiver.abandon()
            if isinstance(exc, TimeoutError):
                raise _not_confirmed(envelope.task, envelope.id, timeout) from None
            if isinstance(exc, BrokerConnectionError) and app._broker is not None:
                # the connection gave out under this submit (e.g. a declare while RabbitMQ
                # is away): not confirmed, as a publish past its deadline
                raise PublishError(
                    f"task {envelope.task} was not published: {exc}",
                    task_name=envelope.task,
                    task_id=envelope.id,
                ) from exc
            if isinstance(exc, PublishError) and exc.task_id is None:
                exc.task_name, exc.task_id = envelope.task, envelope.id
            raise
        self._submitted(envelope.task)
        return ResultHandle(
            envelope.id,
            envelope.task,
            receiver.future,
            receiver.sink,
            receiver.reader,
            canceller=self._cancel,
        )

    def _submitted(self, task: str) -> None:
        for hook in self.app.on_submit:
            try:
                hook(task)
            except Exception:  # the task is published: a failing hook must not say otherwise
                log.exception("on_submit hook %r failed", hook)

    async def publish(
        self, envelope: Envelope, queue: str, *, delay: float = 0.0, timeout: float | None = None
    ) -> None:
        """Publish ``envelope`` to ``queue`` — through the delay ladder when ``delay`` > 0 —
        and return once RabbitMQ confirmed it. Used for submits and for worker retries.

        A task of this app with a ``rate_limit``, due now and in aioqueue's format, goes
        straight to its holding queue, marked with ``queue`` (`holding_route`): the copy a
        worker's `Handoff.hold` would make, one hop less. Anything else that is unpaced in a
        work queue still takes the worker's hold."""
        broker = self.app.broker
        kind = self.app.queue_type_of(queue)
        if self.app.tracing is not None:  # the current span's context, in the headers
            envelope = self.app.tracing.stamp(envelope)
        if not broker.is_declared(queue):  # also for a held task: the pacer's target
            await broker.declare_queue(queue, work_queue_arguments(kind))
        if envelope.celery is not None:  # Celery's format, read from or sent to Celery
            body, properties = encode_task(envelope, expiration=delay <= 0)
        else:  # signed with the app's keys, fresh from when it is due
            due_at = broker.now() + max(delay, 0.0)
            body, properties = task_message(envelope, self.app.signing, due_at=due_at)
        if delay > 0:
            units = delay_units(delay)
            await broker.ensure_delay_route(queue, kind)
            await broker.publish(
                delay_routing_key(queue, units),
                body,
                properties,
                exchange=delay_entry_exchange(kind),
            )
            return
        target, arguments = queue, None
        route = holding_route(self.app.tasks, envelope)
        if route is not None:  # (the work queue is not a signed header: no signing anew)
            target, arguments = route
            properties.headers = {**(properties.headers or {}), H_RATE_QUEUE: queue}
            if not broker.is_declared(target):
                await broker.declare_queue(target, arguments)
        try:
            await broker.publish(target, body, properties, timeout=timeout)
        except UnroutableError:
            if not broker.is_declared(target):
                raise
            # declared here, so deleted since (RabbitMQ drops no queue of ours by itself):
            # declare it again as it was, once, and publish once more
            log.warning("queue %r was deleted; declaring it again", target)
            budget = self.app.settings.publish_timeout if timeout is None else timeout
            try:
                async with asyncio.timeout(budget):
                    await self.redeclare(target, arguments or work_queue_arguments(kind))
                    await broker.publish(target, body, properties, timeout=timeout)
            except TimeoutError:
                raise PublishError(
                    f"queue {target!r} was deleted; declaring it again and publishing once "
                    f"more took over {budget:g}s"
                ) from None

    async def redeclare(self, queue: str, arguments: dict[str, Any]) -> None:
        """Declare ``queue`` again, although this connection declared it: it was deleted since
        (a publish to it came back unroutable). With the arguments it was declared with here,
        else ``arguments``. Concurrent callers share one declare. Used for work queues by
        `publish` and for dead-letter queues by the worker.

        Raises:
            PublishError: the declare failed (the queue was made again with other arguments,
                access refused, the connection is gone).
        """
        pending = self._redeclaring.get(queue)
        if pending is None:
            pending = asyncio.ensure_future(self.app.broker.redeclare_queue(queue, arguments))
            self._redeclaring[queue] = pending
            pending.add_done_callback(lambda done: self._declared_again(queue, done))
        await asyncio.shield(pending)

    def _declared_again(self, queue: str, done: asyncio.Future[None]) -> None:
        if self._redeclaring.get(queue) is done:
            del self._redeclaring[queue]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have been cancelled meanwhile


class _Receiver:
    """What a submit that waits for its outcome sets up before publishing."""

    future: asyncio.Future[Outcome] | None = None
    sink: EventSink | None = None
    reader: StreamReader | None = None

    async def prepare(self, app: App, envelope: Envelope, *, stream: bool) -> Envelope:
        replies = app._replies
        if replies is None:
            raise AioqueueError(f"{app!r} is not connected: use `async with app:` first")
        await replies.ensure_started()
        if stream:
            queue = stream_queue_name(envelope.id)
            expires = app.settings.reply_queue_expires
            await app.broker.declare_queue(queue, reply_queue_arguments(expires, app.queue_type))
            buffer = app.settings.event_buffer
            self.reader = StreamReader(app.broker, queue, buffer, signing=app.signing)
            await self.reader.start()
            envelope = replace(envelope, stream_to=queue)
        return self.expect(replies, envelope)

    def expect(self, replies: ReplyConsumer, envelope: Envelope) -> Envelope:
        """Register for the outcome of ``envelope``, sent with this client's reply queue."""
        celery_task = envelope.task if envelope.celery is not None else None
        self.future, self.sink = replies.expect(envelope.id, celery_task=celery_task)
        if envelope.reply_to == replies.queue:
            return envelope
        return replace(envelope, reply_to=replies.queue)

    async def abandon(self) -> None:
        if self.reader is not None:
            await self.reader.close()


def _not_confirmed(task: str, task_id: str, timeout: float) -> PublishError:
    return PublishError(
        f"task {task} was not confirmed within {timeout:g}s", task_name=task, task_id=task_id
    )
