"""A message the in-memory broker hands out held unacked (`MemoryBroker.hold`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pamqp import commands as spec

if TYPE_CHECKING:
    from .broker import _Message

__all__ = ["HeldMessage"]


@dataclass(slots=True)
class HeldMessage:
    """Held until the hold ends: `ack` removes it, else it goes back to its queue."""

    message: _Message
    acked: bool = False

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def properties(self) -> spec.Basic.Properties:
        return self.message.properties

    async def ack(self) -> None:
        self.acked = True
