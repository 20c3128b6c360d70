"""The scheduler on the in-memory broker (``memory://``): lease and slot records in memory.

The same `Scheduler` loop runs; what ``aioqueue.rabbit.lease`` and ``aioqueue.rabbit.slots`` keep
in RabbitMQ lives in the process's `aioqueue.memory.MemoryBroker` instead, under the same names
(`aioqueue.scheduler.records`):

- the lease is an exclusive hold on ``aioqueue.scheduler.<app>.lease`` (`MemoryBroker.claim`):
  one scheduler of the app in this process leads, the others wait and take over the moment it
  stops (`MemoryBroker.revoke` takes it away, as a dead connection would);
- each schedule's last fired slot is the one message of its memory queue
  ``aioqueue.scheduler.<app>.state.<schedule>``, so it outlives a scheduler (a later one
  continues after it, and missed slots follow the misfire policy) for as long as the broker;
- a slot fires as its task message, published with the properties of every submit
  (`aioqueue.message.task_properties`) to the task's queue, and its record, together: nothing
  in between yields to the event loop, so it is both or neither, and only while the lease is
  held (the fence);
- ``skip_if_running`` runs reply to the memory queue ``aioqueue.scheduler.<app>.done.<schedule>``.

Slot time comes from the broker's `VirtualClock` when one is installed (`use_clock`, the
``aioqueue_clock`` fixture); a scheduler reports whether it has a slot due, so that
`VirtualClock.advance` and `run_until_idle` wait for it to fire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pamqp import commands as spec

from ..errors import DecodeError
from ..memory import MemoryBroker, VirtualClock, memory_broker
from ..message import CONTENT_TYPE, Envelope
from ..message.properties import task_message
from ..message.signing import SigningKeys
from ..settings import Settings
from .records import (
    STATE_QUEUE_ARGS,
    LeaseLost,
    SlotRecord,
    describe_error,
    done_queue_name,
    lease_queue_name,
    state_queue_name,
)

__all__ = ["MemoryBackend", "MemoryLease", "MemorySlotStore"]

log = logging.getLogger("aioqueue.scheduler")


class MemoryLease:
    """Leadership of one app's schedules among the schedulers of this process.

    Args:
        broker: The in-memory broker of the app's ``memory://`` URL.
        app_name: Whose scheduler this is (names the lease).
        identity: This instance's name.
    """

    def __init__(
        self, broker: MemoryBroker, app_name: str, *, identity: str, role: str = "scheduler"
    ) -> None:
        self._broker = broker
        self._name = lease_queue_name(app_name, role)
        self._identity = identity
        self._connected = False
        self._lost: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<MemoryLease {self._name} {'held' if self.held else 'not held'}>"

    @property
    def held(self) -> bool:
        """Whether this instance leads now."""
        lost = self._lost
        return lost is not None and not lost.is_set() and self._broker.connected

    def check(self) -> None:
        """Raise `LeaseLost` unless the lease is held right now."""
        if not self.held:
            raise LeaseLost(f"lost the lease {self._name}")

    def contended(self) -> bool:
        """Whether another scheduler holds the lease (waiting for it is then idle time)."""
        holder = self._broker.holder(self._name)
        return holder is not None and holder is not self

    async def connect(self, timeout: float) -> None:
        """Use the broker (it stays open while this lease does)."""
        if not self._connected:
            await self._broker.connect()
            self._connected = True

    async def acquire(self) -> None:
        """Return once this instance holds the lease."""
        await self.connect(0.0)
        while True:
            lost = self._broker.claim(self._name, self)
            if lost is not None:
                self._lost = lost
                return
            await self._broker.released()

    async def wait_lost(self) -> None:
        """Return when the lease is taken away (`MemoryBroker.revoke`) or given up."""
        if self._lost is not None:
            await self._lost.wait()

    async def release(self) -> None:
        """Give the lease up: a waiting scheduler of the app takes it at once."""
        self._broker.release(self._name, self)
        if self._connected:
            self._connected = False
            await self._broker.close()

    def describe(self, exc: BaseException) -> str:
        return describe_error(exc)


class MemorySlotStore:
    """Slot records in memory queues, and firing a slot: task and record together.

    Args:
        lease: The lease; every operation fails with `LeaseLost` once it is gone.
        broker: The in-memory broker.
        app_name: Whose schedules these are (names the queues).
        identity: This instance's name, written into each record.
        signing: The app's signing keys: each fired task message is signed, due now.
    """

    def __init__(
        self,
        lease: MemoryLease,
        broker: MemoryBroker,
        app_name: str,
        *,
        identity: str,
        signing: SigningKeys | None = None,
    ) -> None:
        self._signing = signing
        self._lease = lease
        self._broker = broker
        self._app_name = app_name
        self._identity = identity

    async def declare(self, queue: str, arguments: dict[str, Any]) -> None:
        """Declare a queue the fires publish to (so they are never unroutable)."""
        self._lease.check()
        await self._broker.declare_queue(queue, arguments)

    async def load(self, schedule_name: str) -> SlotRecord | None:
        """The schedule's last fired slot (None if it never fired)."""
        queue = state_queue_name(self._app_name, schedule_name)
        await self.declare(queue, STATE_QUEUE_ARGS)
        records: list[SlotRecord] = []
        for body, _ in self._broker.messages(queue):
            try:
                records.append(SlotRecord.decode(body))
            except DecodeError as exc:
                log.warning("ignoring a message in %r: %s", queue, exc)
        return max(records, key=lambda r: r.slot, default=None)

    async def fire(
        self, schedule_name: str, slot: datetime, queue: str, envelope: Envelope
    ) -> None:
        """Submit ``envelope`` to ``queue`` and record ``slot``: both or neither."""
        self._lease.check()  # the fence: only the holder fires
        state = state_queue_name(self._app_name, schedule_name)
        record = SlotRecord(slot, by=self._identity)
        properties = spec.Basic.Properties(
            content_type=CONTENT_TYPE, delivery_mode=2, app_id=self._identity
        )
        # No await below yields to the event loop (the memory broker's operations complete at
        # once): the task message and the record appear together, or an error leaves neither.
        await self._broker.declare_queue(state, STATE_QUEUE_ARGS)
        body, task_props = task_message(envelope, self._signing, due_at=self._broker.now())
        await self._broker.publish(queue, body, task_props)
        self._broker.take(state)  # x-max-length=1: the new record replaces the old one
        await self._broker.publish(state, record.encode(), properties)

    async def finished(self, schedule_name: str, run_id: str) -> bool:
        """Whether the outcome of run ``run_id`` has arrived (earlier outcomes are dropped)."""
        self._lease.check()
        done = done_queue_name(self._app_name, schedule_name)
        found = False
        for body, properties in self._broker.take(done):
            if properties.correlation_id == run_id:
                found = True
                await self._broker.publish(done, body, properties)  # kept for a later leader
        return found


class MemoryBackend:
    """What a `Scheduler` of a ``memory://`` app uses instead of RabbitMQ.

    Args:
        url: The app's ``memory://`` URL.
        settings: The app's settings (for a broker created here).
        app_name: The app's name.
        busy: Whether the scheduler has work due now; registered with the broker so that
            `VirtualClock.advance` and `run_until_idle` wait for it.
    """

    def __init__(
        self,
        url: str,
        settings: Settings,
        app_name: str,
        busy: Callable[[], bool],
        signing: SigningKeys | None = None,
    ) -> None:
        self._signing = signing
        self.broker = memory_broker(url, settings)
        self._app_name = app_name
        self._busy = busy
        self.broker.attach(busy)

    @property
    def clock(self) -> VirtualClock | None:
        """The broker's virtual clock, if it has one."""
        clock = self.broker.clock
        return clock if isinstance(clock, VirtualClock) else None

    def open(self, identity: str) -> tuple[MemoryLease, MemorySlotStore]:
        """A lease to campaign with, and the store that fires through it."""
        lease = MemoryLease(self.broker, self._app_name, identity=identity)
        store = MemorySlotStore(
            lease, self.broker, self._app_name, identity=identity, signing=self._signing
        )
        return lease, store

    def close(self) -> None:
        self.broker.detach(self._busy)
