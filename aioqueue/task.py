"""`Task[P, R]`: a registered function that can be called locally or submitted to workers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from .ratelimit import Rate, holding_queue_name, parse_rate
from .retry import NO_RETRY, RetryPolicy
from .signature import Signature
from .topology import QueueType, check_queue_name

if TYPE_CHECKING:
    from .app import App
    from .results import ResultHandle

__all__ = ["Task", "TaskDecorator", "TaskOptions"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task is routed and run.

    Attributes:
        name: Registered name, ``"<module>.<function>"`` unless given.
        queue: Work queue (the app's default queue unless given).
        timeout: Seconds one run may take; then `TaskTimeoutError`. None: no limit.
        ignore_result: Send no reply; the handle's ``result()`` raises at once.
        retry: The retry policy (default: no retries).
        queue_type: ``"classic"`` or ``"quorum"`` for this task's queue.
        sensitive: Task events leave its arguments, results and progress out (secrets).
        rate_limit: At most this many runs per second/minute/hour across all workers of the
            app (`aioqueue.ratelimit`); None: no limit.
        concurrency_limit: At most this many runs at once in one worker; None: no limit.
    """

    name: str
    queue: str
    timeout: float | None = None
    ignore_result: bool = False
    retry: RetryPolicy = NO_RETRY
    queue_type: QueueType = "classic"
    sensitive: bool = False
    rate_limit: Rate | None = None
    concurrency_limit: int | None = None


_MAX_SHAPES = 64


class Task(Generic[P, R]):
    """A function registered with an `App`.

    Calling it runs the function here, as a plain call (``await add(2, 3)``); ``submit`` sends it
    to a worker and returns a `ResultHandle` once RabbitMQ confirmed the message.
    """

    def __init__(self, app: App, fn: Callable[P, Any], options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.is_generator = inspect.isasyncgenfunction(fn)
        self.signature = inspect.signature(fn)
        self._fits: set[tuple[int, frozenset[str]]] = set()  # argument shapes that bound
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", options.name)
        self.__wrapped__ = fn

    @property
    def name(self) -> str:
        return self.options.name

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.options.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function locally, with no broker involved."""
        return self.fn(*args, **kwargs)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Check the arguments against the signature; `TypeError` if they do not fit.

        Whether arguments bind depends only on how many are positional and which names the
        keywords have, so a shape that bound once is not checked again (``Signature.bind``
        costs more than the rest of a submit's own work).
        """
        shape = (len(args), frozenset(kwargs))
        if shape in self._fits:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        if len(self._fits) < _MAX_SHAPES:
            self._fits.add(shape)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this task with (some of) its arguments, for a workflow
        (`aioqueue.chain`, `group`, `chord`); checked when the workflow is submitted."""
        return Signature(self, args, dict(kwargs))

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, ResultHandle[R]]:
        """Send the task to a worker (``await task.submit(...)``); returns once RabbitMQ
        confirmed the message.

        A plain function returning the producer's coroutine, which does all the work when
        awaited: a submit waiting for its turn holds that one coroutine, not two.

        Raises:
            TypeError: the arguments do not fit the signature (nothing is published).
            EncodeError: an argument is not JSON-native (nothing is published).
            PublishError: RabbitMQ refused the message or did not confirm it in time.
        """
        return self.app.producer.submit(self.name, args, kwargs)

    async def submit_with_options(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        queue: str | None = None,
        ignore_result: bool | None = None,
    ) -> ResultHandle[R]:
        """Send the task with per-call options.

        Args:
            args: Positional arguments (JSON-native).
            kwargs: Keyword arguments (JSON-native).
            countdown: Run no earlier than this many seconds from now.
            eta: Run no earlier than this aware datetime.
            expires: Seconds from now, or an aware datetime, after which the task is not run.
            queue: Another queue than the task's own.
            ignore_result: Override the task's ``ignore_result``.
        """
        return await self.app.producer.submit(
            self.name,
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires,
            queue=queue,
            ignore_result=ignore_result,
        )


class TaskDecorator:
    """``@app.task(...)`` with options: applied to the function, returns the `Task`."""

    def __init__(
        self,
        app: App,
        *,
        name: str | None,
        queue: str | None,
        timeout: float | None,
        ignore_result: bool,
        retry: RetryPolicy | None,
        queue_type: QueueType | None,
        sensitive: bool = False,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        if concurrency_limit is not None and (
            not isinstance(concurrency_limit, int)
            or isinstance(concurrency_limit, bool)
            or concurrency_limit < 1
        ):
            raise ValueError(f"concurrency_limit must be a positive int, not {concurrency_limit!r}")
        self._rate = None if rate_limit is None else parse_rate(rate_limit)
        self._concurrency_limit = concurrency_limit
        self._app = app
        self._name = name
        self._queue = None if queue is None else check_queue_name(queue)
        self._timeout = timeout
        self._ignore_result = ignore_result
        self._retry = retry or NO_RETRY
        self._queue_type = queue_type
        self._sensitive = sensitive

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Task[Any, Any]:
        name = self._name or f"{fn.__module__}.{fn.__qualname__}"
        options = TaskOptions(
            name=name,
            queue=self._queue or self._app.default_queue,
            timeout=self._timeout,
            ignore_result=self._ignore_result,
            retry=self._retry,
            queue_type=self._queue_type or self._app.queue_type,
            sensitive=self._sensitive,
            rate_limit=self._rate,
            concurrency_limit=self._concurrency_limit,
        )
        if self._rate is not None:
            try:
                check_queue_name(holding_queue_name(name))
            except ValueError:
                raise ValueError(
                    f"task {name!r} has a rate_limit, and its name cannot name its holding "
                    f"queue {holding_queue_name(name)!r}: give it a name=..."
                ) from None
        task: Task[Any, Any] = Task(self._app, fn, options)
        self._app.register(task)
        return task
