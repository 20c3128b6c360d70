"""Settings, broker URL resolution, and credential masking: the one place the environment is read.

Environment variables:
    AIOQUEUE_BROKER_URL: the broker URL when ``App(broker_url=None)`` and no ``--broker-url``.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DEFAULT_BROKER_URL", "ENV_BROKER_URL", "Settings", "mask_url", "resolve_broker_url"]

ENV_BROKER_URL: Final = "AIOQUEUE_BROKER_URL"
DEFAULT_BROKER_URL: Final = "amqp://guest:guest@localhost/"


def resolve_broker_url(url: str | None) -> str:
    """``url`` if given, else ``$AIOQUEUE_BROKER_URL``, else ``amqp://guest:guest@localhost/``."""
    return url or os.environ.get(ENV_BROKER_URL) or DEFAULT_BROKER_URL


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``****``, safe for logs, errors and reprs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable broker URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{host}"))


@dataclass(frozen=True, slots=True)
class Settings:
    """Tunables shared by producers and workers; the defaults suit most deployments.

    Attributes:
        publish_timeout: Seconds a publish may wait for its confirm (reconnects included)
            before raising `PublishError`.
        connect_timeout: Seconds to keep trying to reach the broker at start-up.
        reply_queue_expires: Seconds an unused reply queue lives on (RabbitMQ ``x-expires``).
        max_message_size: Largest body accepted, in bytes, checked before decoding.
        max_inflight_publishes: Cap on unconfirmed publishes per connection.
        event_buffer: Per handle, most progress updates kept and most stream items held
            unacked in this process.
        reconnect_interval: Seconds between reconnection attempts after a connection is lost.
        heartbeat: AMQP heartbeat in whole seconds, unless the URL sets ``?heartbeat=``
            (0 disables it). A silent peer is declared dead by RabbitMQ after 2 missed
            heartbeats and by the client after ``3 * (heartbeat + 1)`` seconds without a
            frame (about 50 s at the default), then the connection is re-established.
        ssl_context: TLS settings for ``amqps://`` URLs; None means the URL's ``cafile``,
            ``certfile``, ``keyfile`` (and ``no_verify_ssl=1`` to turn verification off),
            else the system's CA store with verification on. See ``docs/guarantees.md``.
    """

    publish_timeout: float = 30.0
    connect_timeout: float = 30.0
    reply_queue_expires: float = 600.0
    max_message_size: int = 1024 * 1024
    max_inflight_publishes: int = 1000
    event_buffer: int = 100
    reconnect_interval: float = 1.0
    heartbeat: int = 15
    ssl_context: ssl.SSLContext | None = None
