"""Settings, broker URL resolution, and credential masking: the one place the environment is read.

A broker URL is one AMQP URL, or a comma-separated list of the URLs of the nodes of one
RabbitMQ cluster (``amqp://u:p@rabbit1/,amqp://u:p@rabbit2/``): users, passwords and virtual
hosts are cluster-wide in RabbitMQ, so the URLs may differ only in host and port.

Environment variables:
    AIOQUEUE_BROKER_URL: the broker URL when ``App(broker_url=None)`` and no ``--broker-url``.
    AIOQUEUE_SIGNING_KEYS: the signing keys when ``App(signing_keys=None)``, as
        ``id:HEX,id:HEX`` (the first signs; docs/security.md).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "DEFAULT_BROKER_URL",
    "ENV_BROKER_URL",
    "ENV_SIGNING_KEYS",
    "Settings",
    "broker_nodes",
    "mask_url",
    "resolve_broker_url",
    "scrub",
    "signing_keys_from_env",
]

ENV_BROKER_URL: Final = "AIOQUEUE_BROKER_URL"
DEFAULT_BROKER_URL: Final = "amqp://guest:guest@localhost/"
ENV_SIGNING_KEYS: Final = "AIOQUEUE_SIGNING_KEYS"


def resolve_broker_url(url: str | None) -> str:
    """``url`` if given, else ``$AIOQUEUE_BROKER_URL``, else ``amqp://guest:guest@localhost/``."""
    return url or os.environ.get(ENV_BROKER_URL) or DEFAULT_BROKER_URL


def signing_keys_from_env() -> str | None:
    """``$AIOQUEUE_SIGNING_KEYS`` (``id:HEX,id:HEX``), or None when unset or empty."""
    return os.environ.get(ENV_SIGNING_KEYS) or None


def mask_url(url: str) -> str:
    """The URL (or each URL of a comma-separated list) with its password replaced by ``****``,
    safe for logs, errors and reprs."""
    if "," in url:
        return ",".join(_mask_one(part) for part in url.split(","))
    return _mask_one(url)


def _mask_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable broker URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if port is not None:
        host = f"{host}:{port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{host}"))


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with every password of ``url`` masked, in
    whatever form a library wrote the node's URL: ``user:password@`` becomes ``user:****@``."""
    for node in url.split(","):
        node = node.strip()
        text = text.replace(node, _mask_one(node))
        try:
            parts = urlsplit(node)
        except ValueError:
            continue
        if parts.password:
            at = parts.netloc.rpartition("@")[0]  # user:password as written in the URL
            for secret in {at.partition(":")[2], parts.password}:
                if secret:
                    text = text.replace(f":{secret}@", ":****@")
    return text


def broker_nodes(url: str) -> tuple[str, ...]:
    """The node URLs of an AMQP broker URL: one, or each of a comma-separated list.

    Raises:
        ValueError: an entry is empty, not an ``amqp://``/``amqps://`` URL, or differs from
            the first in anything but host and port (scheme, user, password, virtual host,
            options): the nodes of one cluster share all of those. The message masks passwords.
    """
    nodes = tuple(part.strip() for part in url.split(","))
    first = None
    for node in nodes:
        try:
            parts = urlsplit(node)
            parts.port  # noqa: B018 -- a port out of range raises here
        except ValueError:
            raise ValueError(f"unparsable broker URL in {mask_url(url)!r}") from None
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(
                f"broker URL {mask_url(node)!r} in {mask_url(url)!r}: expected "
                "amqp://user:password@host:port/vhost (or amqps://), one per cluster node, "
                "separated by commas"
            )
        shared = (parts.scheme, parts.username, parts.password, parts.path, parts.query)
        if first is None:
            first = shared
        elif shared != first:
            raise ValueError(
                f"broker URLs {mask_url(url)!r}: the nodes of one cluster share scheme, user, "
                "password, virtual host and options; only host and port may differ"
            )
    return nodes


@dataclass(frozen=True, slots=True)
class Settings:
    """Tunables shared by producers and workers; the defaults suit most deployments.

    Attributes:
        publish_timeout: Seconds a publish may wait for its confirm (reconnects included)
            before raising `PublishError`.
        connect_timeout: Seconds to keep trying to reach the broker at start-up.
        reply_queue_expires: Seconds an unused reply queue lives on (RabbitMQ ``x-expires``).
        max_message_size: Largest body accepted, in bytes, checked before decoding.
        max_inflight_publishes: Cap on unconfirmed publishes per connection, and on submits
            publishing at once per app: more wait their turn (first come, first served,
            within their publish deadline) before their message is built.
        event_buffer: Per handle, most progress updates kept and most stream items held
            unacked in this process.
        reconnect_interval: Seconds between reconnection attempts after a connection is lost.
        heartbeat: AMQP heartbeat in whole seconds, unless the URL sets ``?heartbeat=``
            (0 disables it). A silent peer is declared dead by RabbitMQ after 2 missed
            heartbeats and by the client after ``3 * (heartbeat + 1)`` seconds without a
            frame (about 50 s at the default), then the connection is re-established.
        cancellations_max_age: Seconds a cancellation stays known (the ``x-max-age`` of the
            ``aioqueue.cancellations`` stream, and how far back a starting worker reads it).
        ssl_context: TLS settings for ``amqps://`` URLs; None means the URL's ``cafile``,
            ``certfile``, ``keyfile`` (and ``no_verify_ssl=1`` to turn verification off),
            else the system's CA store with verification on. See ``docs/guarantees.md``.
        events: Workers publish task events and heartbeats to the stream ``aioqueue.events``
            (docs/observability.md); False turns them off.
        events_max_bytes: Retention of the event stream by size (``x-max-length-bytes``).
        events_max_age: Retention of the event stream by age (``x-max-age``: a number and
            a unit, Y M D h m s, e.g. ``"7D"``).
        heartbeat_interval: Seconds between a worker's ``worker-heartbeat`` events.
        signature_window: With signing keys: seconds a signed task message stays fresh after
            it is due (its publish time, or the end of its delay); a worker refuses an older
            one, and remembers each accepted message this long (the replay guard).
        replay_guard_size: Most messages the replay guard remembers; past it the oldest are
            forgotten early (counted and logged): size it over tasks per second times
            ``signature_window``.
        accept_unsigned_celery: With signing keys: run Celery protocol-2 messages, which
            cannot be signed, instead of refusing them (reason ``signature``).
    """

    publish_timeout: float = 30.0
    connect_timeout: float = 30.0
    reply_queue_expires: float = 600.0
    max_message_size: int = 1024 * 1024
    max_inflight_publishes: int = 1000
    event_buffer: int = 100
    reconnect_interval: float = 1.0
    heartbeat: int = 15
    cancellations_max_age: float = 3600.0
    ssl_context: ssl.SSLContext | None = None
    events: bool = True
    events_max_bytes: int = 256 * 1024 * 1024
    events_max_age: str = "7D"
    heartbeat_interval: float = 5.0
    signature_window: float = 300.0
    replay_guard_size: int = 500_000
    accept_unsigned_celery: bool = False
