"""aioqueue: an asyncio-native distributed task runner on RabbitMQ.

```python
from aioqueue import App

app = App("shop")

@app.task
async def add(x: int, y: int) -> int:
    return x + y

async with app:
    handle = await add.submit(2, 3)
    assert await handle.result(timeout=10) == 5
```
"""

from .app import App
from .celery_task import CeleryTask
from .context import TaskContext, task_context
from .errors import (
    AioqueueError,
    BrokerConnectionError,
    DeadLetteredError,
    DecodeError,
    EncodeError,
    PublishError,
    ResultUnavailableError,
    SignatureError,
    TaskCancelledError,
    TaskError,
    TaskNotFoundError,
    TaskTimeoutError,
    UnroutableError,
)
from .message.signing import SigningKeys
from .results import ResultHandle
from .retry import Retry, RetryPolicy
from .scheduler import Misfire, Schedule, Scheduler
from .settings import Settings
from .streams import Progress, Result
from .task import Task, TaskOptions

__version__ = "0.1.0"

__all__ = [
    "AioqueueError",
    "App",
    "BrokerConnectionError",
    "CeleryTask",
    "DeadLetteredError",
    "DecodeError",
    "EncodeError",
    "Misfire",
    "Progress",
    "PublishError",
    "Result",
    "ResultHandle",
    "ResultUnavailableError",
    "Retry",
    "RetryPolicy",
    "Schedule",
    "Scheduler",
    "Settings",
    "SignatureError",
    "SigningKeys",
    "Task",
    "TaskCancelledError",
    "TaskContext",
    "TaskError",
    "TaskNotFoundError",
    "TaskOptions",
    "TaskTimeoutError",
    "UnroutableError",
    "task_context",
]
