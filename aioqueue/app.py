"""`App`: the task registry, the connection, and the submit path — the composition root."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, Unpack, overload

from .broker import Broker
from .cancel import publish_cancellations
from .celery_task import CeleryTask
from .errors import AioqueueError
from .message.signing import SigningKeys
from .producer import Producer
from .results import ReplyConsumer, ResultHandle
from .retry import RetryPolicy
from .scheduler import Clock, Schedule, Scheduler
from .scheduler._define import PeriodicDecorator, ScheduleOptions, add_schedule, build_schedule
from .settings import Settings, mask_url, resolve_broker_url, signing_keys_from_env
from .task import Task, TaskDecorator
from .topology import (
    QueueType,
    check_queue_name,
)
from .tracing import Tracing, detect
from .transports import broker_for, check_broker_url

__all__ = ["App"]

log = logging.getLogger("aioqueue.app")

P = ParamSpec("P")
R = TypeVar("R")


class App:
    """A named set of tasks and one connection to RabbitMQ.

    Args:
        name: The application's name (shown in connection names and logs).
        broker_url: ``amqp://`` URL, or the comma-separated URLs of the nodes of one RabbitMQ
            cluster (each connection tries them in turn from a random one); ``memory://`` for
            the in-memory broker. None means ``$AIOQUEUE_BROKER_URL``, else
            ``amqp://guest:guest@localhost/``.
        default_queue: Queue of tasks that name none.
        queue_type: Default type of the queues this app declares (``"classic"`` or
            ``"quorum"``). With ``"quorum"`` every queue that holds work or results is
            replicated over the cluster: task, dead-letter, delay, reply and stream queues and
            the scheduler's state (docs/deploying.md).
        settings: Timeouts and limits; see `Settings`.
        signing_keys: Key id → secret (at least 32 bytes), e.g. ``{"k2": new, "k1": old}``:
            the first signs every task message, reply, event batch and replay, all verify;
            a worker refuses what is unsigned, forged, stale or replayed (docs/security.md).
            None means ``$AIOQUEUE_SIGNING_KEYS`` (``k2:HEX,k1:HEX``), else no signing.

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
        signing_keys: Mapping[str, bytes] | SigningKeys | None = None,
    ) -> None:
        if queue_type not in ("classic", "quorum"):
            raise ValueError(f"queue_type must be 'classic' or 'quorum', not {queue_type!r}")
        self.name = name
        # a malformed URL fails here, not at connect
        self.broker_url = check_broker_url(resolve_broker_url(broker_url))
        self.default_queue = check_queue_name(default_queue)
        self.queue_type: QueueType = queue_type
        self.settings = settings or Settings()
        self.signing: SigningKeys | None = _signing_keys(signing_keys)
        self.client_id = uuid.uuid4().hex
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        self._queue_types: dict[str, QueueType] | None = None
        self._broker: Broker | None = None
        self._replies: ReplyConsumer | None = None
        # OpenTelemetry spans, when the otel extra is installed and a tracer provider was
        # configured before `connect` (checked there, once): else None, and tracing costs nothing
        self.tracing: Tracing | None = None
        self.producer = Producer(self)
        # Called with the task's name after each confirmed submit (e.g. a metrics counter);
        # fast, non-blocking. Retries and scheduler firings are not submits.
        self.on_submit: list[Callable[[str], None]] = []
        # Called once per message of this client's reply queue that could not be read (logged
        # and dropped; the handle keeps waiting): e.g. a metrics counter. Fast, non-blocking.
        self.on_unreadable_reply: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        signed = "" if self.signing is None else f" signing={self.signing.ids!r}"
        broker = mask_url(self.broker_url)
        return f"<App {self.name!r} broker={broker} tasks={len(self.tasks)}{signed}>"

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
        sensitive: bool = False,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
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
        sensitive: bool = False,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
    ) -> Task[Any, Any] | TaskDecorator:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., ...)``.

        ``async def`` functions run on the worker's event loop, plain functions in a thread.
        ``sensitive=True`` keeps its arguments, results and progress out of task events.
        ``rate_limit="50/s"`` (also ``/m``, ``/h``) holds across all workers of the app;
        ``concurrency_limit=N`` allows at most N runs at once in each worker.
        """
        decorator = TaskDecorator(
            self,
            name=name,
            queue=queue,
            timeout=timeout,
            ignore_result=ignore_result,
            retry=retry,
            queue_type=queue_type,
            sensitive=sensitive,
            rate_limit=rate_limit,
            concurrency_limit=concurrency_limit,
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
        self.tracing = detect()
        self._replies = ReplyConsumer(
            broker,
            self.client_id,
            on_unreadable=self.on_unreadable_reply,
            queue_type=self.queue_type,
            signing=self.signing,
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
        return await self.producer.submit(
            name,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires,
            queue=queue,
            ignore_result=ignore_result,
        )

    def celery_task(
        self, name: str, /, *, queue: str = "celery", ignore_result: bool = False
    ) -> CeleryTask:
        """A task that an unchanged Celery worker runs: ``app.celery_task("tasks.add")``.

        Its ``submit``/``submit_with_options`` send Celery's own message to ``queue`` and
        return an ordinary `ResultHandle` (the Celery app's result backend must be
        ``rpc://`` with the JSON serializer). RabbitMQ only: see `aioqueue.celery_task`.
        """
        return CeleryTask(self, name, queue=queue, ignore_result=ignore_result)

    async def cancel(self, task_id: str, /, *more: str) -> None:
        """Cancel tasks by id: returns once the cancellation is published (confirmed).

        A queued or delayed task never runs (dead-lettered, reason ``cancelled``); a running
        ``async def`` task has its coroutine cancelled; a running plain function sees
        ``task_context().cancelled``. Its caller gets `TaskCancelledError`; it is not retried.
        An unknown or finished id changes nothing. See `aioqueue.cancel`.
        """
        await self.connect()
        await publish_cancellations(self.broker, (task_id, *more), self.signing)

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


def _signing_keys(keys: Mapping[str, bytes] | SigningKeys | None) -> SigningKeys | None:
    """The app's keys: given, else ``$AIOQUEUE_SIGNING_KEYS``, else none (no signing)."""
    if isinstance(keys, SigningKeys):
        return keys
    if keys is not None:
        return SigningKeys(keys)
    text = signing_keys_from_env()
    return None if text is None else SigningKeys.parse(text)
