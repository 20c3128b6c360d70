"""Broker housekeeping between measurements, over plain AMQP (works with ``--broker-url`` too)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiormq

from .loop import run

__all__ = ["delete_queues", "server_version"]


async def _delete(url: str, names: list[str]) -> dict[str, int]:
    left: dict[str, int] = {}
    connection = await aiormq.connect(url)
    try:
        for name in names:
            channel = await connection.channel()  # a passive declare of a missing queue kills it
            try:
                ok = await channel.queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            left[name] = ok.message_count or 0
            await channel.queue_delete(name)
            await channel.close()
    finally:
        await connection.close()
    return left


def delete_queues(url: str, names: Iterable[str]) -> dict[str, int]:
    """Delete the queues that exist; returns the messages each still held (ready ones)."""
    return run(_delete(url, list(dict.fromkeys(names))))


async def _server(url: str) -> dict[str, Any]:
    connection = await aiormq.connect(url)
    try:
        props = connection.server_properties
    finally:
        await connection.close()
    return {key: _text(props.get(key)) for key in ("product", "version", "platform")}


def server_version(url: str) -> dict[str, Any]:
    """The broker's product, version and platform, as it announces them."""
    return run(_server(url))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
