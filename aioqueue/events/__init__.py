"""Task events kept by RabbitMQ: workers publish them to one stream, any number of readers
read them back from any point the stream still keeps.

- `EventPublisher`: batched, confirmed, in the background; drops (counted) rather than wait;
- `EventReader`: an async iterator of `Event` from a time, ``"first"`` or ``"next"``;
- `Event`, and the wire format: `aioqueue.message.events`.

docs/observability.md ("Task events") describes the stream, the fields and the costs.
"""

from ..message.events import Event
from .publisher import EventPublisher, EventStatistics
from .reader import EventReader

__all__ = ["Event", "EventPublisher", "EventReader", "EventStatistics"]
