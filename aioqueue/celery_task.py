"""`CeleryTask`: a task that an unchanged Celery 5 worker runs, awaited from aioqueue.

``app.celery_task("tasks.add", queue="celery")`` names a Celery task; there is no local
function. ``submit`` publishes a Celery protocol-2 JSON message (`aioqueue.message.celery`)
straight to the Celery queue, confirmed like any submit, and returns an ordinary `ResultHandle`:
the Celery worker's ``rpc://`` result backend replies to this client's reply queue, with the
task id as correlation id.

- The Celery app needs ``result_backend="rpc://"`` and ``result_serializer="json"`` (a pickled
  reply is never read: it is logged as unreadable and the handle keeps waiting), and its
  ``task_serializer``/``accept_content`` must accept JSON.
- ``countdown``/``eta`` become the message's ``eta`` header, which the Celery worker honours
  itself; ``expires`` its ``expires`` header and the AMQP ``expiration`` property, as kombu
  writes them. A task that expired reaches the caller as `TaskError` ``TaskRevokedError``; a
  Celery time limit as `TaskTimeoutError`.
- The in-memory broker (``memory://``) has no Celery worker on the other side: ``submit``
  raises `AioqueueError` there instead of waiting for a reply that cannot come.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import AioqueueError
from .memory import is_memory_url
from .topology import check_queue_name

if TYPE_CHECKING:
    from .app import App
    from .results import ResultHandle

__all__ = ["CeleryTask"]


class CeleryTask:
    """A task of a Celery worker, submitted from aioqueue (``app.celery_task(...)``).

    Attributes:
        name: The Celery task's name, e.g. ``"tasks.add"``.
        queue: The Celery queue it is sent to (Celery's default is ``"celery"``).
        ignore_result: Send the Celery header ``ignore_result: true`` and return handles
            without a result, unless a submit says otherwise.
    """

    def __init__(
        self, app: App, name: str, *, queue: str = "celery", ignore_result: bool = False
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a Celery task name must be a non-empty str, not {name!r}")
        self.app = app
        self.name = name
        self.queue = check_queue_name(queue)
        self.ignore_result = ignore_result

    def __repr__(self) -> str:
        return f"<CeleryTask {self.name} queue={self.queue}>"

    async def submit(self, *args: Any, **kwargs: Any) -> ResultHandle[Any]:
        """Send the task to a Celery worker; returns once RabbitMQ confirmed the message.

        Raises:
            EncodeError: an argument is not JSON-native (nothing is published).
            PublishError: RabbitMQ refused the message or did not confirm it in time.
            AioqueueError: the app is not connected, or uses the in-memory broker.
        """
        return await self.submit_with_options(args=args, kwargs=kwargs)

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
    ) -> ResultHandle[Any]:
        """Send the task with per-call options, as Celery's ``apply_async`` would.

        Args:
            args: Positional arguments (JSON-native).
            kwargs: Keyword arguments (JSON-native).
            countdown: Run no earlier than this many seconds from now (Celery's ``eta``).
            eta: Run no earlier than this aware datetime.
            expires: Seconds from now, or an aware datetime, after which the Celery worker
                revokes the task instead of running it (`TaskError` ``TaskRevokedError``).
            queue: Another queue than this task's own.
            ignore_result: Override this task's ``ignore_result``.
        """
        if is_memory_url(self.app.broker_url):
            raise AioqueueError(
                f"Celery task {self.name}: the in-memory broker has no Celery worker to run "
                "it; submit Celery tasks over RabbitMQ",
                task_name=self.name,
            )
        return await self.app.producer.submit_celery(
            self.name,
            self.queue if queue is None else check_queue_name(queue),
            args,
            kwargs,
            countdown=countdown,
            eta=eta,
            expires=expires,
            ignore_result=self.ignore_result if ignore_result is None else ignore_result,
        )
