"""Was the machine ours? CPU used by other processes (and stolen by the hypervisor) meanwhile.

On a shared 2-core machine another test suite or broker running at the same time skews every
figure. `CpuWatch` compares the machine's busy CPU time (``/proc/stat``) over a measurement with
the CPU time of the benchmark's own processes: this process, the children it reaped (workers,
producers) and the private broker node.
"""

from __future__ import annotations

import os
import time
from types import TracebackType

from .cpu import process_seconds

__all__ = [
    "BrokerPids",
    "CpuWatch",
    "listener_pid",
    "stolen_and_total",
    "wait_until_quiet",
]

TICK = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return busy / TICK, steal / TICK, sum(fields) / TICK


def stolen_and_total() -> tuple[float, float]:
    """(steal, total) CPU seconds of all CPUs since boot: what the hypervisor took."""
    _busy, steal, total = _machine()
    return steal, total


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` on this machine, if it can be seen.

    A socket's inode comes from ``/proc/net/tcp`` (and ``tcp6``), its owner from the
    ``socket:[inode]`` links under ``/proc/*/fd`` (other users' only as root).
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        for row in rows:  # sl local_address rem_address st ... inode
            if row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{row[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return int(pid)
        except OSError:
            continue
    return None


BrokerPids = int | tuple[int, ...] | None  # a node, the nodes of a cluster, or unknown


def _ours(broker_pid: BrokerPids) -> float:
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    pids = (broker_pid,) if isinstance(broker_pid, int) else broker_pid or ()
    return own + sum(process_seconds(pid) for pid in pids)


class CpuWatch:
    """``with CpuWatch(broker_pid) as watch: ...`` then ``watch.summary()``.

    Without ``broker_pid`` (a broker given by URL that is not on this machine, or whose process
    cannot be seen) the broker counts as "other".
    """

    def __init__(self, broker_pid: BrokerPids) -> None:
        self._broker_pid = broker_pid
        self._start = self._end = (0.0, 0.0, 0.0, 0.0, 0.0)

    def _now(self) -> tuple[float, float, float, float, float]:
        return (time.monotonic(), *_machine(), _ours(self._broker_pid))

    def __enter__(self) -> CpuWatch:
        self._start = self._now()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end = self._now()

    def summary(self) -> dict[str, float]:
        """Average cores used by other processes, and % of CPU time stolen, over the block."""
        wall, busy, steal, total, ours = (
            b - a for a, b in zip(self._start, self._end, strict=True)
        )
        return {
            "seconds": wall,
            "other_cores": max(0.0, busy - ours) / wall if wall > 0 else 0.0,
            "steal_pct": 100 * steal / total if total > 0 else 0.0,
        }


def wait_until_quiet(
    broker_pid: BrokerPids, *, limit: float, threshold: float, probe: float = 1.0
) -> float:
    """Wait up to ``limit`` seconds until other processes use under ``threshold`` cores for a
    ``probe``-second sample; returns the seconds waited (``limit`` or more if never quiet)."""
    start = time.monotonic()
    while True:
        with CpuWatch(broker_pid) as watch:
            time.sleep(probe)
        waited = time.monotonic() - start
        if watch.summary()["other_cores"] < threshold or waited >= limit:
            return waited
