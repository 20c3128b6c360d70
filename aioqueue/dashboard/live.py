"""The dashboard's feed: events from the stream into `DashboardState`, changes out to browsers.

One `EventReader` from ``now - window`` (so a restarted dashboard rebuilds its picture from
history, then follows live). Changes are coalesced: every ``flush_interval`` the task and
worker records touched since the last flush go to every connected browser (server-sent
events), at most ``MAX_PUSH`` tasks per flush; a browser that cannot keep up gets a
``resync`` and reloads its page's data instead of an ever-growing queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from ..message.events import Event
from .state import DashboardState, TaskRecord, WorkerRecord

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Feed"]

log = logging.getLogger("aioqueue.dashboard")

MAX_PUSH: Final = 200
CLIENT_BACKLOG: Final = 64


class Feed:
    """Keeps `state` current from the stream and fans its changes out to subscribers."""

    def __init__(self, app: App, state: DashboardState, *, flush_interval: float = 0.3) -> None:
        self.app = app
        self.state = state
        self.flush_interval = flush_interval
        self._clients: set[asyncio.Queue[dict[str, Any]]] = set()
        self._dirty_tasks: dict[str, TaskRecord] = {}
        self._dirty_workers: dict[str, WorkerRecord] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read(), name="dashboard-reader"),
            asyncio.create_task(self._flush_loop(), name="dashboard-flush"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def apply(self, event: Event) -> None:
        """Take one event into the state and remember what changed for the next flush."""
        record = self.state.apply(event)
        if isinstance(record, TaskRecord):
            self._dirty_tasks[record.id] = record
            if len(self._dirty_tasks) > MAX_PUSH:  # the oldest change is reloaded, not pushed
                del self._dirty_tasks[next(iter(self._dirty_tasks))]
        elif isinstance(record, WorkerRecord):
            self._dirty_workers[record.identity] = record

    async def _read(self) -> None:
        from ..events import EventReader  # the events package imports the app; keep it lazy

        since = time.time() - self.state.window_seconds
        while True:
            if self.app._broker is None:  # closed under the dashboard: never reopened here
                log.warning("the app's connection is closed: the dashboard stops reading events")
                return
            try:
                async with EventReader(self.app, since=since) as reader:
                    async for event in reader:
                        self.apply(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # the reader reconnects itself; this is a last resort
                log.exception("the dashboard's event reader stopped; starting again")
                since = max(since, self.state.last_time)
                await asyncio.sleep(1.0)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.flush()

    def flush(self) -> None:
        if not (self._dirty_tasks or self._dirty_workers):
            return
        now = time.time()
        message = {
            "tasks": [record.summary() for record in self._dirty_tasks.values()],
            "workers": [record.view(now) for record in self._dirty_workers.values()],
        }
        self._dirty_tasks = {}
        self._dirty_workers = {}
        for client in list(self._clients):
            try:
                client.put_nowait(message)
            except asyncio.QueueFull:  # a slow browser: drop its backlog, tell it to reload
                while not client.empty():
                    client.get_nowait()
                client.put_nowait({"resync": True})

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        client: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=CLIENT_BACKLOG)
        self._clients.add(client)
        try:
            yield client
        finally:
            self._clients.discard(client)
