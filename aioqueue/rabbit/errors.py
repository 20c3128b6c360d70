"""How RabbitMQ's and aiormq's errors are classified: retry through them, or give up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiormq

from ..errors import PublishError, UnroutableError

__all__ = ["FATAL_CHANNEL", "STALE", "TRANSIENT", "publish_retry", "unconfirmed"]

log = logging.getLogger("aioqueue.broker")

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


def unconfirmed(
    exc: BaseException, confirm: asyncio.Future[Any], channel: aiormq.Channel
) -> BaseException:
    """What a publish whose wait for its ``confirm`` raised ``exc`` raises: `TimeoutError`
    if the publish deadline cancelled the confirm (not the caller's cancellation), connection
    trouble if the channel closed without a reason (it fails its pending confirms with a bare
    `Exception`, which is no refusal), else ``exc``."""
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if confirm.cancelled() and task is not None and not task.cancelling():
            return TimeoutError()
    elif type(exc) is Exception and channel.is_closed:
        return aiormq.exceptions.ChannelInvalidStateError("closed")
    return exc


def publish_retry(
    exc: Exception,
    routing_key: str,
    *,
    left: float,
    delay: float,
    timeout: float,
    describe: Callable[[BaseException], str],
) -> float | None:
    """After a publish to ``routing_key`` failed with ``exc``, ``left`` seconds before its
    deadline (``timeout`` after its start): the seconds to wait before publishing again
    (logged, ``exc`` told by ``describe``), or None if ``exc`` is not ours to judge (the
    caller raises it). Raises the `PublishError` when trying again is no use."""
    if isinstance(exc, aiormq.exceptions.PublishError):
        reply_text = exc.args[0] if exc.args else "NO_ROUTE"  # `reason` is a template
        raise UnroutableError(
            f"message to {routing_key!r} was returned unroutable: {reply_text}"
        ) from None
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        # not stored: a quorum queue without a leader (a node just went, an election runs) or
        # a majority, or a full queue that rejects publishes. Each passes or not within the
        # deadline: publish again until then.
        if delay >= left:
            raise PublishError(
                f"RabbitMQ refused (nacked) a message to {routing_key!r} until the publish "
                "deadline (a quorum queue without a leader or a majority of its nodes, or a "
                "full queue that rejects publishes)"
            ) from None
        log.info("publish to %r nacked by RabbitMQ; publishing again", routing_key)
        return delay
    if isinstance(exc, FATAL_CHANNEL):
        raise PublishError(f"publish to {routing_key!r} refused: {exc}") from None
    if isinstance(exc, TRANSIENT):
        if isinstance(exc, TimeoutError) and left <= 0:
            raise PublishError(
                f"no confirm for a publish to {routing_key!r} within {timeout:g}s"
            ) from None
        log.info("publish to %r interrupted (%s); retrying", routing_key, describe(exc))
        return min(delay, max(0.0, left))
    return None
