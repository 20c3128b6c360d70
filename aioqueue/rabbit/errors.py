"""How RabbitMQ's and aiormq's errors are classified: retry through them, or give up."""

from __future__ import annotations

import aiormq

__all__ = ["FATAL_CHANNEL", "STALE", "TRANSIENT"]

# Connection-level trouble: wait for the robust connection to come back and try again.
TRANSIENT = (
    ConnectionError,
    OSError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    RuntimeError,
)
# Channel errors caused by the request itself: retrying cannot help.
FATAL_CHANNEL = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelPreconditionFailed,
)
# A settle that failed this way is stale: the channel of its delivery tag is gone, and RabbitMQ
# redelivers the message (taskiq-aio-pika #46); never worth raising to a task's code.
STALE = (aiormq.exceptions.ChannelInvalidStateError, *TRANSIENT)
