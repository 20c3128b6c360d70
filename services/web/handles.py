"""The handles a web process keeps so that clients can ask for outcomes: bounded, in memory."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from aioqueue import ResultHandle

__all__ = ["HandleStore"]


class HandleStore:
    """At most ``max_handles`` handles, by task id, oldest first.

    When it is full, a new task makes room by evicting *finished* handles, oldest submit first;
    a pending handle is never evicted (its outcome is still on its way), so when every kept
    handle is pending, `reserve` refuses and the service answers 503 until some finish. Memory
    is bounded either way. Finding a finished handle scans from the oldest one: cheap unless
    the store is full of pending handles.

    Args:
        max_handles: The most handles kept (pending and finished together).
    """

    def __init__(self, max_handles: int) -> None:
        if max_handles < 1:
            raise ValueError("max_handles must be at least 1")
        self.max_handles = max_handles
        self._handles: OrderedDict[str, ResultHandle[Any]] = OrderedDict()
        self._reserved = 0  # submits under way: their handle is about to be added

    def __len__(self) -> int:
        return len(self._handles)

    def get(self, task_id: str) -> ResultHandle[Any] | None:
        """The handle of ``task_id``, or None if unknown here (never seen, or evicted)."""
        return self._handles.get(task_id)

    def reserve(self) -> bool:
        """Make room for one more handle (evicting finished ones); False if all are pending.

        Call it before submitting, then `add` the handle, or `release` if the submit failed.
        """
        while len(self._handles) + self._reserved >= self.max_handles:
            if not self._evict_oldest_finished():
                return False
        self._reserved += 1
        return True

    def add(self, handle: ResultHandle[Any]) -> None:
        """Keep ``handle`` in the room `reserve` made."""
        self._reserved -= 1
        self._handles[handle.id] = handle

    def release(self) -> None:
        """Give back the room `reserve` made (the submit failed)."""
        self._reserved -= 1

    def _evict_oldest_finished(self) -> bool:
        for task_id, handle in self._handles.items():
            if handle.done():
                del self._handles[task_id]
                return True
        return False
