"""The broker for a URL: the one place that tells RabbitMQ from the in-memory broker."""

from __future__ import annotations

from .broker import Broker
from .memory import is_memory_url, memory_broker
from .rabbit import RabbitBroker
from .settings import Settings, broker_nodes

__all__ = ["broker_for", "check_broker_url"]


def check_broker_url(url: str) -> str:
    """``url`` if it names a broker: ``memory://...``, one AMQP URL or a list of a cluster's
    nodes; else the `ValueError` of `aioqueue.settings.broker_nodes` (passwords masked)."""
    if not is_memory_url(url):
        broker_nodes(url)
    return url


def broker_for(url: str, settings: Settings, *, connection_name: str) -> Broker:
    """The process's in-memory broker for a ``memory://`` URL, else a new `RabbitBroker`.

    ``url`` is one AMQP URL (``amqp://`` or ``amqps://``); ``connection_name`` is what
    RabbitMQ's management tools show for the connection.
    """
    if is_memory_url(url):
        return memory_broker(url, settings)
    return RabbitBroker(url, settings, connection_name=connection_name)
