"""Every error aioqueue raises, under one base class.

```
AioqueueError
├── EncodeError            argument (or result) not JSON-native; also a TypeError
├── DecodeError            a body or header the worker cannot read
│   └── SignatureError     unsigned, forged, unknown key, stale or replayed (signing keys set)
├── PublishError           nack, unroutable, or no confirm within the deadline
│   └── UnroutableError    returned by RabbitMQ: no queue to route it to
├── BrokerConnectionError  the broker cannot be reached (or was lost for good)
├── TaskError              the task ran and raised; after the last retry, the last attempt's error
│   ├── TaskTimeoutError   the task exceeded its own timeout
│   └── TaskCancelledError cancelled (``await handle.cancel()``) before or while it ran
├── TaskNotFoundError      no worker registered that name
├── DeadLetteredError      dead-lettered without running to an error: expired, or poison
└── ResultUnavailableError the handle can never get an outcome (e.g. an ``ignore_result`` task)
```

Errors carry context (task name, task id) as attributes, not only in their message.
"""

from __future__ import annotations

__all__ = [
    "AioqueueError",
    "BrokerConnectionError",
    "DeadLetteredError",
    "DecodeError",
    "EncodeError",
    "PublishError",
    "ResultUnavailableError",
    "SignatureError",
    "TaskCancelledError",
    "TaskError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "UnroutableError",
]


class AioqueueError(Exception):
    """Base class of every error raised by aioqueue."""

    def __init__(
        self, message: str, *, task_name: str | None = None, task_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.task_name = task_name
        self.task_id = task_id


class EncodeError(AioqueueError, TypeError):
    """A task argument or result is not JSON-native."""


class DecodeError(AioqueueError):
    """A message body or header that the worker cannot read."""


class SignatureError(DecodeError):
    """A message refused by its signature: unsigned, forged, signed with an unknown key, stale
    or replayed (only with ``App(signing_keys=...)``; the message never names a key's secret)."""


class PublishError(AioqueueError):
    """The broker refused a message, could not route it, or did not confirm it in time."""


class UnroutableError(PublishError):
    """RabbitMQ returned a ``mandatory`` message: no queue is bound to take it."""


class BrokerConnectionError(AioqueueError):
    """The broker cannot be reached, or the connection was lost for good."""


class TaskError(AioqueueError):
    """The task ran and raised; ``type_name``, ``message`` and ``traceback`` describe it."""

    def __init__(
        self,
        type_name: str,
        message: str,
        *,
        traceback: str = "",
        task_name: str | None = None,
        task_id: str | None = None,
    ) -> None:
        super().__init__(message, task_name=task_name, task_id=task_id)
        self.args = (f"{type_name}: {message}",)
        self.type_name = type_name
        self.traceback = traceback

    def __str__(self) -> str:
        where = f" (task {self.task_name} id {self.task_id})" if self.task_name else ""
        return f"{self.type_name}: {self.message}{where}"


class TaskTimeoutError(TaskError):
    """The task exceeded its own ``timeout``."""


class TaskCancelledError(TaskError):
    """The task was cancelled (``await handle.cancel()``, ``aioqueue cancel``): it never ran,
    or its coroutine was cancelled while it ran; a cancelled task is not retried."""


class TaskNotFoundError(AioqueueError):
    """No worker registered a task of that name; the message was dead-lettered."""


class DeadLetteredError(AioqueueError):
    """The message was dead-lettered without running to an error (expired, or poison)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        task_name: str | None = None,
        task_id: str | None = None,
    ) -> None:
        super().__init__(message, task_name=task_name, task_id=task_id)
        self.reason = reason


class ResultUnavailableError(AioqueueError):
    """The handle can never receive an outcome (its task was submitted with ``ignore_result``)."""
