"""`App`: the task registry, the connection, and the submit path — the composition root."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, Unpack, overload

from .broker import Broker
from .errors import AioqueueError, PublishError, UnroutableError
from .message import Envelope, Outcome, check_json_native, task_properties
from .results import ReplyConsumer, ResultHandle
from .retry import RetryPolicy
from .scheduler import Clock, Schedule, Scheduler
from .scheduler._define import PeriodicDecorator, ScheduleOptions, add_schedule, build_schedule
from .settings import Settings, mask_url, resolve_broker_url
from .streams import EventSink, StreamReader
from .task import Task, TaskDecorator, TaskOptions
from .topology import (
    QueueType,
    delay_entry_exchange,
    delay_routing_key,
    delay_units,
    reply_queue_arguments,
    stream_queue_name,
    work_queue_arguments,
)
from .transports import broker_for

__all__ = ["App"]

log = logging.getLogger("aioqueue.app")

P = ParamSpec("P")
R = TypeVar("R")


class App:
    """A named set of tasks and one connection to RabbitMQ.

    Args:
        name: The application's name (shown in connection names and logs).
        broker_url: ``amqp://`` URL; None means ``$AIOQUEUE_BROKER_URL``, else
            ``amqp://guest:guest@localhost/``.
        default_queue: Queue of tasks that name none.
        queue_type: Default type of the queues this app declares (``"classic"`` or ``"quorum"``).
        settings: Timeouts and limits; see `Settings`.

    Use ``async with app:`` to connect; the connection closes cleanly on exit.
    """

    def __init__(
        self,
        name: str,
        *,
        broker_url: str | None = None,
        default_queue: str = "default",
        queue_type: QueueType = "classic",
        settings: Settings | None = None,
    ) -> None:
        self.name = name
        self.broker_url = resolve_broker_url(broker_url)
        self.default_queue = default_queue
        self.queue_type: QueueType = queue_type
        self.settings = settings or Settings()
        self.client_id = uuid.uuid4().hex
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        self._queue_types: dict[str, QueueType] | None = None
        self._broker: Broker | None = None
        self._replies: ReplyConsumer | None = None
        self._redeclaring: dict[str, asyncio.Future[None]] = {}  # queue -> its declare again
        # Called with the task's name after each confirmed submit (e.g. a metrics counter);
        # fast, non-blocking. Retries and scheduler firings are not submits.
        self.on_submit: list[Callable[[str], None]] = []
        # Called once per message of this client's reply queue that could not be read (logged
        # and dropped; the handle keeps waiting): e.g. a metrics counter. Fast, non-blocking.
        self.on_unreadable_reply: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<App {self.name!r} broker={mask_url(self.broker_url)} tasks={len(self.tasks)}>"

    # -- registry ---------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        ignore_result: bool = False,
        retry: RetryPolicy | None = None,
        queue_type: QueueType | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        ignore_result: bool = False,
        retry: RetryPolicy | None = None,
        queue_type: QueueType | None = None,
    ) -> Task[Any, Any] | TaskDecorator:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., ...)``.

        ``async def`` functions run on the worker's event loop, plain functions in a thread.
        """
        decorator = TaskDecorator(
            self,
            name=name,
            queue=queue,
            timeout=timeout,
            ignore_result=ignore_result,
            retry=retry,
            queue_type=queue_type,
        )
        return decorator if fn is None else decorator(fn)

    def register(self, task: Task[Any, Any]) -> None:
        if task.name in self.tasks:
            raise ValueError(f"a task named {task.name!r} is already registered")
        self.tasks[task.name] = task
        self._queue_types = None

    def _unregister(self, name: str) -> None:
        del self.tasks[name]
        self._queue_types = None

    def queues(self) -> list[str]:
        """The default queue and every queue a registered task names, in a stable order."""
        names = dict.fromkeys([self.default_queue, *(t.options.queue for t in self.tasks.values())])
        return list(names)

    def queue_type_of(self, queue: str) -> QueueType:
        """The declared type of ``queue``: a task's ``queue_type`` wins, else the app's."""
        if self._queue_types is None:  # the first task naming a queue decides
            tasks = reversed(self.tasks.values())
            self._queue_types = {t.options.queue: t.options.queue_type for t in tasks}
        return self._queue_types.get(queue, self.queue_type)

    # -- connection -------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise AioqueueError(f"{self!r} is not connected: use `async with app:` first")
        return self._broker

    async def connect(self) -> None:
        """Connect to the broker (retrying for ``settings.connect_timeout`` seconds)."""
        if self._broker is not None:
            return
        name = f"aioqueue {self.name} client"
        broker = broker_for(self.broker_url, self.settings, connection_name=name)
        await broker.connect()
        self._broker = broker
        self._replies = ReplyConsumer(
            broker, self.client_id, on_unreadable=self.on_unreadable_reply
        )

    async def close(self) -> None:
        """Fail pending handles with a clear error, then close the connection."""
        replies, self._replies = self._replies, None
        broker, self._broker = self._broker, None
        if replies is not None:
            await replies.close()
        if broker is not None:
            await broker.close()

    async def __aenter__(self) -> App:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- submitting -------------------------------------------------------------------------

    async def submit(self, name: str, /, *args: Any, **kwargs: Any) -> ResultHandle[Any]:
        """Submit a task by name: to its queue when registered here, else to the default queue."""
        return await self.submit_with_options(name, args=args, kwargs=kwargs)

    async def submit_with_options(
        self,
        name: str,
        /,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        ignore_result: bool | None = None,
    ) -> ResultHandle[Any]:
        """Submit a task by name with per-call options (see `Task.submit_with_options`)."""
        kwargs = dict(kwargs or {})
        task = self.tasks.get(name)
        if task is not None:
            task.bind(tuple(args), kwargs)
        check_json_native(list(args), "args")
        check_json_native(kwargs, "kwargs")
        now = self._broker.now() if self._broker is not None else time.time()
        delay = _delay(now, countdown, eta)
        options = task.options if task else TaskOptions(name=name, queue=self.default_queue)
        target = queue or options.queue
        wants_reply = not (options.ignore_result if ignore_result is None else ignore_result)
        envelope = Envelope(
            id=uuid.uuid4().hex,
            task=name,
            args=tuple(args),
            kwargs=kwargs,
            deadline=_deadline(now, expires),
        )
        stream = task is not None and task.is_generator
        return await self._send(
            envelope, target, wants_reply=wants_reply, delay=delay, stream=stream
        )

    async def _send(
        self,
        envelope: Envelope,
        queue: str,
        *,
        wants_reply: bool,
        delay: float = 0.0,
        stream: bool = False,
    ) -> ResultHandle[Any]:
        """Publish a new task (registering for its reply first) and return its handle.

        One publish deadline covers the whole submit, declaring queues on first use included:
        a broker that stays away past it is a `PublishError`, never a hang.
        """
        timeout = self.settings.publish_timeout
        receiver = _Receiver()
        replies = self._replies
        warm = (
            delay <= 0
            and not stream
            and self._broker is not None
            and self._broker.is_declared(queue)
            and (not wants_reply or (replies is not None and replies.started))
        )
        try:
            if warm:
                # Nothing to declare or subscribe first: the publish's own deadline is the
                # submit's, without a timer of ours around it.
                if wants_reply and replies is not None:
                    envelope = receiver.expect(replies, envelope)
                await self._publish(envelope, queue, timeout=timeout)
            else:
                async with asyncio.timeout(timeout):
                    if wants_reply:
                        envelope = await receiver.prepare(self, envelope, stream=stream)
                    await self._publish(envelope, queue, delay=delay)
        except BaseException as exc:
            if self._replies is not None:
                self._replies.forget(envelope.id)
            await receiver.abandon()
            if isinstance(exc, TimeoutError):
                raise PublishError(
                    f"task {envelope.task} was not confirmed within {timeout:g}s",
                    task_name=envelope.task,
                    task_id=envelope.id,
                ) from None
            if isinstance(exc, PublishError) and exc.task_id is None:
                exc.task_name, exc.task_id = envelope.task, envelope.id
            raise
        for hook in self.on_submit:
            try:
                hook(envelope.task)
            except Exception:  # the task is published: a failing hook must not say otherwise
                log.exception("on_submit hook %r failed", hook)
        return ResultHandle(
            envelope.id, envelope.task, receiver.future, receiver.sink, receiver.reader
        )

    async def _publish(
        self, envelope: Envelope, queue: str, *, delay: float = 0.0, timeout: float | None = None
    ) -> None:
        """Publish ``envelope`` to ``queue`` — through the delay ladder when ``delay`` > 0 —
        and return once RabbitMQ confirmed it. Used for submits and for retries."""
        broker = self.broker
        kind = self.queue_type_of(queue)
        if not broker.is_declared(queue):
            await broker.declare_queue(queue, work_queue_arguments(kind))
        properties = task_properties(envelope)
        body = envelope.encode()
        if delay <= 0:
            try:
                await broker.publish(queue, body, properties, timeout=timeout)
            except UnroutableError:
                if not broker.is_declared(queue):
                    raise
                # declared here, so deleted since (RabbitMQ drops no queue of ours by itself):
                # declare it again as it was, once, and publish once more
                log.warning("queue %r was deleted; declaring it again", queue)
                budget = self.settings.publish_timeout if timeout is None else timeout
                try:
                    async with asyncio.timeout(budget):
                        await self._declare_again(queue, work_queue_arguments(kind))
                        await broker.publish(queue, body, properties, timeout=timeout)
                except TimeoutError:
                    raise PublishError(
                        f"queue {queue!r} was deleted; declaring it again and publishing once "
                        f"more took over {budget:g}s"
                    ) from None
            return
        units = delay_units(delay)
        await broker.ensure_delay_route(queue, kind)
        await broker.publish(
            delay_routing_key(queue, units),
            body,
            properties,
            exchange=delay_entry_exchange(kind),
        )

    async def _declare_again(self, queue: str, arguments: dict[str, Any]) -> None:
        """Declare ``queue`` again, although this connection declared it: it was deleted since
        (a publish to it came back unroutable). With the arguments it was declared with here,
        else ``arguments``. Concurrent callers share one declare. Used for work queues by
        `_publish` and for dead-letter queues by the worker.

        Raises:
            PublishError: the declare failed (the queue was made again with other arguments,
                access refused, the connection is gone).
        """
        pending = self._redeclaring.get(queue)
        if pending is None:
            pending = asyncio.ensure_future(self.broker.redeclare_queue(queue, arguments))
            self._redeclaring[queue] = pending
            pending.add_done_callback(lambda done: self._declared_again(queue, done))
        await asyncio.shield(pending)

    def _declared_again(self, queue: str, done: asyncio.Future[None]) -> None:
        if self._redeclaring.get(queue) is done:
            del self._redeclaring[queue]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have been cancelled meanwhile

    # -- periodic tasks: aioqueue.scheduler, docs/scheduler.md ------------------------------

    def periodic(
        self,
        *,
        name: str | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        ignore_result: bool = False,
        retry: RetryPolicy | None = None,
        queue_type: QueueType | None = None,
        **when: Unpack[ScheduleOptions],
    ) -> PeriodicDecorator:
        """Register the function as a task and schedule it: ``@app.periodic(cron="0 3 * * *")``.

        ``name``, ``queue``, ``timeout``, ``ignore_result``, ``retry`` and ``queue_type`` are
        the task's options, as in `task`; the others are the schedule's, as in `schedule`. The
        schedule takes the task's name.

        Raises:
            ValueError: a bad cron expression, time zone, interval or misfire setting.
            TypeError: the schedule's arguments do not fit the function (nothing is registered).
        """
        template = build_schedule("?", "?", queue, when)  # validated before anything registers
        register = self.task(
            name=name,
            queue=queue,
            timeout=timeout,
            ignore_result=ignore_result,
            retry=retry,
            queue_type=queue_type,
        )
        return PeriodicDecorator(self, register, template)

    def schedule(
        self,
        task: str,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        **when: Unpack[ScheduleOptions],
    ) -> Schedule:
        """Submit the task named ``task`` periodically: ``app.schedule("a.b", cron="0 * * * *")``.

        Args:
            task: The task's name (its arguments are checked if it is registered here).
            name: The schedule's name, unique in this app (default: ``task``).
            queue: Queue to submit to (default: the task's queue, else the default queue).
            **when: ``cron`` or ``every``, and ``tz``, ``start``, ``args``, ``kwargs``,
                ``misfire``, ``misfire_window``, ``grace``, ``skip_if_running``: see `Schedule`.

        Raises:
            ValueError: a bad expression, zone, interval or option, or a duplicate name.
            TypeError: the arguments do not fit the registered task, or an unknown option.
        """
        return add_schedule(self, build_schedule(name or task, task, queue, when))

    def scheduler(
        self,
        *,
        clock: Clock | None = None,
        poll_interval: float = 0.5,
        heartbeat: int = 5,
        identity: str | None = None,
    ) -> Scheduler:
        """A `Scheduler` of this app: ``async with app.scheduler():`` runs it in the background."""
        return Scheduler(
            self, clock=clock, poll_interval=poll_interval, heartbeat=heartbeat, identity=identity
        )


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
            await app.broker.declare_queue(queue, reply_queue_arguments(expires))
            self.reader = StreamReader(app.broker, queue, app.settings.event_buffer)
            await self.reader.start()
            envelope = replace(envelope, stream_to=queue)
        return self.expect(replies, envelope)

    def expect(self, replies: ReplyConsumer, envelope: Envelope) -> Envelope:
        """Register for the outcome of ``envelope``, sent with this client's reply queue."""
        self.future, self.sink = replies.expect(envelope.id)
        return replace(envelope, reply_to=replies.queue)

    async def abandon(self) -> None:
        if self.reader is not None:
            await self.reader.close()


def _delay(now: float, countdown: float | None, eta: datetime | None) -> float:
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    delay = _raw_delay(now, countdown, eta)
    delay_units(delay)  # raises ValueError beyond the longest delay the ladder holds
    return delay


def _raw_delay(now: float, countdown: float | None, eta: datetime | None) -> float:
    if eta is not None:
        if eta.tzinfo is None:
            raise ValueError("eta must be an aware datetime (with a time zone)")
        return max(0.0, eta.timestamp() - now)
    if countdown is not None:
        if countdown < 0:
            raise ValueError("countdown must not be negative")
        return float(countdown)
    return 0.0


def _deadline(now: float, expires: float | datetime | None) -> float | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            raise ValueError("expires must be an aware datetime (with a time zone)")
        return expires.timestamp()
    return now + float(expires)
