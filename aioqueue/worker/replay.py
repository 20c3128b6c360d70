"""The replay guard shared by the processes of one worker (``--processes N`` with signing keys).

`SharedReplayGuard` is a `aioqueue.worker.signature.SeenMessages` over a fixed table in a file
that the supervisor creates (in ``/dev/shm`` when there is one: memory, not disk) and every
child maps: slots of 16 bytes (the first 8 bytes of an accepted message's signature, and the
Unix time its freshness ends), found by open addressing over `PROBES` slots from the key's
hash. A look-up and its insert hold an exclusive ``flock`` on the file, so two processes given
copies of one message at once accept only one. When every probed slot is live the one that
expires first is overwritten (counted in `evicted`): size the table as the single-process guard
(``Settings.replay_guard_size``; the table has twice as many slots, 32 bytes per message).

The supervisor passes the table to its children as ``$AIOQUEUE_REPLAY_GUARD`` (``path:slots``).
On Linux the file has no name past its creation: the supervisor unlinks it at once and hands
its children the open file itself (``pass_fds``), which each opens anew as
``/proc/self/fd/N`` (an open file of its own, so that their ``flock`` exclude each other). The
kernel frees the table once the last process holding it is gone, so nothing is left behind even
when the supervisor is killed with SIGKILL (16 MB at the default size, in memory). Elsewhere
the table is a named file that the supervisor removes when it exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
import tempfile
import time
from typing import Final

__all__ = ["PROBES", "REPLAY_GUARD_ENV", "SharedReplayGuard"]

log = logging.getLogger("aioqueue.worker")

REPLAY_GUARD_ENV: Final = "AIOQUEUE_REPLAY_GUARD"  # "path:slots", set by the supervisor
PROBES: Final = 16
_SLOT = struct.Struct("<Qd")
LOG_EVERY = 60.0


class SharedReplayGuard:
    """Accepted signatures in a table mapped by every process of one worker."""

    def __init__(self, path: str, slots: int) -> None:
        self.path = path
        self.slots = slots
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, slots * _SLOT.size)
        self.evicted = 0
        self._last_warning = -LOG_EVERY
        self.held: int | None = None  # the supervisor's unnamed table: what its children get

    @classmethod
    def create(cls, messages: int) -> SharedReplayGuard:
        """A new, empty table for ``messages`` (twice as many slots), in ``/dev/shm`` if any."""
        slots = max(2 * messages, PROBES)
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="aioqueue.replay.", dir=where)
        try:
            os.ftruncate(fd, slots * _SLOT.size)  # zeros: every slot empty
            unnamed = f"/proc/self/fd/{fd}"  # Linux: the open file, whatever its name
            guard = cls(unnamed if os.path.exists(unnamed) else path, slots)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        if guard.path == path:  # a named file, which `unlink` removes at the end
            os.close(fd)
        else:  # no name from now on: nothing to leave behind
            os.unlink(path)
            guard.held = fd
        return guard

    @classmethod
    def attach(cls, spec: str) -> SharedReplayGuard:
        """The table a supervisor created, from ``$AIOQUEUE_REPLAY_GUARD``'s ``path:slots``."""
        path, _, slots = spec.rpartition(":")
        return cls(path, int(slots))

    @property
    def spec(self) -> str:
        return f"{self.path}:{self.slots}"

    def add(self, key: bytes, expires_at: float, now: float) -> bool:
        short = int.from_bytes(key[:8], "big") or 1  # 0 marks an empty slot
        start = short % self.slots
        table = self._map
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            free = oldest = -1
            oldest_expiry = float("inf")
            for j in range(PROBES):
                i = (start + j) % self.slots
                slot_key, expiry = _SLOT.unpack_from(table, i * _SLOT.size)
                if slot_key == short and expiry > now:
                    return False
                if free < 0 and (slot_key == 0 or expiry <= now):
                    free = i
                if expiry < oldest_expiry:
                    oldest, oldest_expiry = i, expiry
            if free < 0:
                free = oldest
                self._evicted()
            _SLOT.pack_into(table, free * _SLOT.size, short, expires_at)
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _evicted(self) -> None:
        self.evicted += 1
        if time.monotonic() - self._last_warning >= LOG_EVERY:
            self._last_warning = time.monotonic()
            log.warning(
                "the shared replay guard is full around a slot: forgot a live message early "
                "(%d so far in this process); raise Settings.replay_guard_size",
                self.evicted,
            )

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def unlink(self) -> None:
        """Close and remove the table (the supervisor, at its end)."""
        self.close()
        if self.held is not None:  # unnamed: gone with the last process that holds it
            os.close(self.held)
            self.held = None
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
