"""`Scheduler`: campaign for the lease, then fire the app's schedules while holding it.

One *term* of leadership: acquire the lease (``aioqueue.rabbit.lease``), read each schedule's
last slot (``aioqueue.rabbit.slots``), then loop — fire the due slots (``due_slots`` in
``schedule.py``), sleep on the clock until the next one — until the lease is lost or the
scheduler stops. A slot fires on the lease connection, with publisher confirms: its record and
its task message, each published again until RabbitMQ takes it (``rabbit/slots.py``).

An app on the in-memory broker (``memory://``) keeps its lease and records in that broker instead
(``in_memory.py``) and, by default, takes slot time from the broker's `VirtualClock`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from ..memory import is_memory_url
from ..message import Envelope
from ..rabbit.lease import CONNECTION_ERRORS, Lease
from ..rabbit.slots import SlotStore
from ..topology import work_queue_arguments
from ..tracing import Tracing, detect
from .clock import Clock, SystemClock
from .in_memory import MemoryBackend
from .records import LeaseLost, SlotRecord, done_queue_arguments, done_queue_name
from .schedule import Misfire, Schedule, due_slots, missed_slots, next_run, slot_id

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Scheduler", "SchedulerStatistics"]

log = logging.getLogger("aioqueue.scheduler")

# Pause after a term that ended in an error, so a persistent one cannot spin.
_RETRY_PAUSE = 1.0
_MISFIRE_ACTIONS = {
    Misfire.SKIP: "skipped (misfire=skip)",
    Misfire.ONCE: "firing the latest once (misfire=once)",
    Misfire.ALL: "firing those within the misfire window (misfire=all)",
}


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """A snapshot of one scheduler instance's counters.

    Attributes:
        leader: Whether it holds the lease now.
        terms: How many times it became the leader.
        fired: Slots it submitted.
        skipped_running: Slots it skipped because the previous run had not finished.
    """

    leader: bool
    terms: int
    fired: int
    skipped_running: int


class _Lease(Protocol):
    """One attempt at leadership (`Lease` on RabbitMQ, `MemoryLease` in memory)."""

    async def connect(self, timeout: float) -> None: ...
    async def acquire(self) -> None: ...
    async def release(self) -> None: ...
    async def wait_lost(self) -> None: ...
    def check(self) -> None: ...
    def contended(self) -> bool: ...
    def describe(self, exc: BaseException) -> str: ...


class _Store(Protocol):
    """Slot records and fires through a held lease (`SlotStore`, `MemorySlotStore`)."""

    async def declare(self, queue: str, arguments: dict[str, Any]) -> None: ...
    async def load(self, schedule_name: str) -> SlotRecord | None: ...
    async def fire(
        self, schedule_name: str, slot: datetime, queue: str, envelope: Envelope
    ) -> None: ...
    async def finished(self, schedule_name: str, run_id: str) -> bool: ...


def _always() -> bool:
    return True


@dataclass(slots=True)
class _Plan:
    """A schedule during one term: where it stands and where its runs go."""

    schedule: Schedule
    queue: str
    cursor: datetime  # every slot up to here was fired or given up
    running: str | None = None  # id of a skip_if_running run whose outcome is awaited


class Scheduler:
    """Fires an app's schedules; run any number of instances, exactly one fires.

    Args:
        app: The app whose schedules (``app.periodic``, ``app.schedule``) are fired, with its
            broker URL and settings; the scheduler uses a connection of its own.
        clock: Source of slot time (default: the system clock, or the in-memory broker's
            `VirtualClock` on a ``memory://`` app); see `FakeClock` for tests.
        poll_interval: Seconds between a follower's looks for a free lease: the takeover time
            after a leader process dies is about this plus a few milliseconds.
        heartbeat: AMQP heartbeat of the lease connection, in seconds: when a leader's machine
            or network is lost, RabbitMQ frees the lease after two to three of them.
        identity: This instance's name in logs and state records (default: host:pid:random).

    ``async with Scheduler(app):`` (or ``async with app.scheduler():``) runs it in the
    background of the current event loop; `run` runs it in the foreground until `stop`.
    """

    def __init__(
        self,
        app: App,
        *,
        clock: Clock | None = None,
        poll_interval: float = 0.5,
        heartbeat: int = 5,
        identity: str | None = None,
    ) -> None:
        if poll_interval <= 0 or heartbeat < 1:
            raise ValueError("poll_interval must be positive and heartbeat at least 1 s")
        self.app = app
        self.clock: Clock = clock or SystemClock()
        self._default_clock = clock is None
        self.poll_interval = poll_interval
        self.heartbeat = heartbeat
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ready = asyncio.Event()  # set once the broker was reached
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._leader = False
        self._terms = self._fired = self._skipped = 0
        # Whether it has work due: in memory, `VirtualClock.advance` and `run_until_idle` wait
        # for it. Running, and not parked (asleep until a slot still ahead, or waiting for a
        # lease another instance holds).
        self._active = False
        self._parked: Callable[[], bool] | None = None
        self._memory: MemoryBackend | None = None
        self._tracing: Tracing | None = None  # a root span per fired slot, when tracing is on

    def __repr__(self) -> str:
        role = "leader" if self._leader else "follower"
        return f"<Scheduler {self.identity} of {self.app.name!r} {role}>"

    @property
    def is_leader(self) -> bool:
        """Whether this instance holds the lease now."""
        return self._leader

    def statistics(self) -> SchedulerStatistics:
        """A snapshot of this instance's counters."""
        return SchedulerStatistics(self._leader, self._terms, self._fired, self._skipped)

    def stop(self) -> None:
        """Stop after the slot being fired, if any; the lease is released at once."""
        self._stop.set()

    async def __aenter__(self) -> Scheduler:
        self._start()  # now, so that in memory a clock advanced next waits for the first term
        self._task = asyncio.ensure_future(self.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await task
            finally:
                self._finish()

    async def run(self) -> None:
        """Campaign and fire until `stop`.

        Raises:
            TypeError: a schedule's arguments do not fit its registered task.
            BrokerConnectionError: the broker was not reachable within the app's
                ``settings.connect_timeout`` at start (later outages are waited out).
        """
        self._start()
        try:
            self.check_schedules()
            while not self._stop.is_set():
                if not await self._term():
                    self._parked = _always
                    try:
                        await self._unless_stopped(asyncio.sleep(_RETRY_PAUSE))
                    finally:
                        self._parked = None
        finally:
            self._finish()

    def _start(self) -> None:
        self._active = True
        self._tracing = detect()
        if self._memory is None and is_memory_url(self.app.broker_url):
            app = self.app
            self._memory = MemoryBackend(
                app.broker_url, app.settings, app.name, self._busy, signing=app.signing
            )
            virtual = self._memory.clock
            if self._default_clock and virtual is not None:
                self.clock = virtual

    def _finish(self) -> None:
        self._active = False
        self._parked = None
        memory, self._memory = self._memory, None
        if memory is not None:
            memory.close()

    def _busy(self) -> bool:
        """Whether it has work due now (a slot to fire, a free lease to take)."""
        if not self._active:
            return False
        parked = self._parked
        return parked is None or not parked()

    def check_schedules(self) -> None:
        """Raise `TypeError` if a schedule's arguments do not fit its registered task."""
        for schedule in self.app.schedules.values():
            task = self.app.tasks.get(schedule.task)
            if task is not None:
                task.bind(schedule.args, schedule.kwargs)

    async def _unless_stopped(self, work: Coroutine[Any, Any, Any]) -> bool:
        """Run ``work`` unless `stop` comes first (then cancel it); True if it completed."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.done() and not task.cancelled():
            task.result()
            return True
        return False

    def _open(self) -> tuple[_Lease, _Store]:
        """A lease to campaign with and the store that fires through it, for this term."""
        if self._memory is not None:
            return self._memory.open(self.identity)
        lease = Lease(
            self.app.broker_url,
            self.app.name,
            identity=self.identity,
            poll_interval=self.poll_interval,
            heartbeat=self.heartbeat,
            queue_type=self.app.queue_type,
        )
        app = self.app
        store = SlotStore(
            lease, app.name, identity=self.identity, queue_type=app.queue_type, signing=app.signing
        )
        return lease, store

    async def _term(self) -> bool:
        """Campaign, then lead until the lease is lost or `stop`; False if it ended in error."""
        lease, store = self._open()
        try:
            if not self.ready.is_set():
                if not await self._unless_stopped(lease.connect(self.app.settings.connect_timeout)):
                    return True
                self.ready.set()
            self._parked = lease.contended
            try:
                acquired = await self._unless_stopped(lease.acquire())
            finally:
                self._parked = None
            if acquired:
                await self._lead(lease, store)
            return True
        except LeaseLost as exc:
            log.warning("scheduler %s: %s; stopped firing", self.identity, exc)
            return False
        except CONNECTION_ERRORS as exc:
            log.warning(
                "scheduler %s: lease connection failed (%s); stopped firing",
                self.identity,
                lease.describe(exc),
            )
            return False
        finally:
            was_leader, self._leader = self._leader, False
            await lease.release()
            if was_leader:
                log.info("scheduler %s released the lease of app %r", self.identity, self.app.name)

    async def _lead(self, lease: _Lease, store: _Store) -> None:
        self._terms += 1
        self._leader = True
        schedules = list(self.app.schedules.values())
        log.info(
            "scheduler %s is the leader of app %r (term %d, schedules: %d)",
            self.identity,
            self.app.name,
            self._terms,
            len(schedules),
        )
        started = self.clock.now()
        plans = [await self._plan(store, schedule, started) for schedule in schedules]
        while not self._stop.is_set():
            now = self.clock.now()
            for plan in plans:
                await self._fire_due(plan, store, now)
            wake = min((next_run(p.schedule, p.cursor) for p in plans), default=None)
            await self._sleep(wake, lease)

    async def _plan(self, store: _Store, schedule: Schedule, started: datetime) -> _Plan:
        """Where ``schedule`` stands at the start of a term, from its state record."""
        record = await store.load(schedule.name)
        queue = self._queue_of(schedule)
        await store.declare(queue, work_queue_arguments(self.app.queue_type_of(queue)))
        if schedule.skip_if_running:
            done = done_queue_name(self.app.name, schedule.name)
            await store.declare(done, done_queue_arguments(self.app.queue_type))
        if record is None:  # never fired: start with the first slot after now
            return _Plan(schedule, queue, cursor=started)
        running = slot_id(schedule.name, record.slot) if schedule.skip_if_running else None
        return _Plan(schedule, queue, cursor=record.slot, running=running)

    def _queue_of(self, schedule: Schedule) -> str:
        if schedule.queue is not None:
            return schedule.queue
        task = self.app.tasks.get(schedule.task)
        return task.options.queue if task is not None else self.app.default_queue

    async def _fire_due(self, plan: _Plan, store: _Store, now: datetime) -> None:
        schedule = plan.schedule
        if next_run(schedule, plan.cursor) <= now - schedule.grace:
            first, last = missed_slots(schedule, plan.cursor, now)
            log.warning(
                "schedule %r: slots from %s to %s were missed (more than %gs late): %s",
                schedule.name,
                first.isoformat(),
                last.isoformat(),
                schedule.grace.total_seconds(),
                _MISFIRE_ACTIONS[schedule.misfire],
            )
        for slot in due_slots(schedule, plan.cursor, now):
            if self._stop.is_set():
                return
            await self._fire(plan, slot, store)
            plan.cursor = slot
        plan.cursor = max(plan.cursor, now)

    async def _fire(self, plan: _Plan, slot: datetime, store: _Store) -> None:
        """Record the slot and submit its task, confirmed, on the lease connection."""
        schedule = plan.schedule
        if plan.running is not None:
            if not await store.finished(schedule.name, plan.running):
                self._skipped += 1
                log.info(
                    "schedule %r: slot %s skipped, %s is still running",
                    schedule.name,
                    slot.isoformat(),
                    plan.running,
                )
                return
            plan.running = None
        run_id = slot_id(schedule.name, slot)
        reply_to = done_queue_name(self.app.name, schedule.name)
        envelope = Envelope(
            id=run_id,
            task=schedule.task,
            args=schedule.args,
            kwargs=schedule.kwargs,
            reply_to=reply_to if schedule.skip_if_running else None,
            scheduled_at=slot.timestamp(),
        )
        if self._tracing is None:
            await store.fire(schedule.name, slot, plan.queue, envelope)
        else:
            with self._tracing.firing(schedule.name, slot, envelope, plan.queue) as envelope:
                await store.fire(schedule.name, slot, plan.queue, envelope)
        self._fired += 1
        if schedule.skip_if_running:
            plan.running = run_id
        log.info("fired %s (task %s, queue %r)", run_id, schedule.task, plan.queue)

    async def _sleep(self, wake: datetime | None, lease: _Lease) -> None:
        """Sleep on the clock until ``wake``, `stop` or the loss of the lease."""
        waits: list[Awaitable[Any]] = [self._stop.wait(), lease.wait_lost()]
        if wake is not None:
            waits.append(self.clock.sleep_until(wake))
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.sleep(0)  # the sleepers are now waiting on the clock: we are parked
            self._parked = _always if wake is None else lambda: self.clock.now() < wake
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._parked = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self._stop.is_set():
            lease.check()
