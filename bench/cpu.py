"""CPU per task, by process: where a workload's CPU goes, and what the broker alone allows.

During the timed part of rpc and fire, the producer reads the CPU time (``/proc/<pid>/stat``)
of the broker's VM(s), the worker process(es) and itself; divided by the tasks, that is the CPU
each spends on one task. On a machine whose cores the three share, the rate can never exceed
``cores / (CPU per task of all three)``; and even a client that cost nothing would leave
``cores / (broker's CPU per task)``: the *broker ceiling*, at the broker's cost per task as
measured (an estimate: a broker's cost per task falls somewhat as its batches grow).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CpuSplit", "children", "cpu_markdown", "process_seconds"]

TICK = os.sysconf("SC_CLK_TCK")
ROLES = ("broker", "worker", "producer")


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and the children it reaped; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / TICK  # utime stime cutime cstime


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid`` (from ``/proc``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found.append(int(entry))
    return found


class CpuSplit:
    """``split = CpuSplit({"broker": [pid], ...}).start()``, the timed work, then
    ``split.per_task(n)``: microseconds of CPU per task of each role (roles without a pid
    that can be read are left out)."""

    def __init__(self, pids: Mapping[str, Iterable[int]]) -> None:
        self.pids = {role: [p for p in ps if p] for role, ps in pids.items()}
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {role: sum(map(process_seconds, ps)) for role, ps in self.pids.items() if ps}

    def start(self) -> CpuSplit:
        self._start = self._now()
        return self

    def seconds(self) -> dict[str, float]:
        """CPU seconds each role spent since `start`."""
        end = self._now()
        return {role: end[role] - self._start[role] for role in self._start}

    def per_task(self, tasks: int) -> dict[str, float]:
        return {role: spent * 1e6 / tasks for role, spent in self.seconds().items()}


def cpu_markdown(measured: Mapping[str, Mapping[str, list[dict[str, Any]]]], cpus: int) -> str:
    """A table of the median CPU per task of each role, for rpc and fire, with the rate all
    three allow on ``cpus`` cores and the broker ceiling (also as a multiple of raw's rate)."""
    lines: list[str] = []
    for workload in ("rpc", "fire"):
        raw_rates = [r["rate"] for r in measured.get(workload, {}).get("raw", []) if "rate" in r]
        raw_rate = statistics.median(raw_rates) if raw_rates else None
        for system, runs in measured.get(workload, {}).items():
            splits = [r["cpu_us"] for r in runs if "cpu_us" in r]
            if not splits:
                continue
            us = {
                role: statistics.median(s[role] for s in splits)
                for role in ROLES
                if all(role in s for s in splits)
            }
            total = sum(us.values())
            broker = us.get("broker")
            ceiling = cpus * 1e6 / broker if broker else None
            cells = [_us(us.get(role)) for role in ROLES]
            cells.append(_us(total))
            cells.append(f"{cpus * 1e6 / total:,.0f}" if total and len(us) == 3 else "—")
            if ceiling is None:
                cells.append("—")
            elif raw_rate:
                cells.append(f"{ceiling:,.0f} ({ceiling / raw_rate:.1f}x raw)")
            else:
                cells.append(f"{ceiling:,.0f}")
            lines.append(f"| {workload} | {system} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = (
        f"CPU per task, µs (medians; {cpus} cores shared by all three). Rate all three allow:"
        " cores / total. Broker ceiling: cores / the broker's CPU per task, the most any client"
        " could reach at this broker cost.\n\n"
        "| workload | system | broker | worker | producer | total | rate all three allow, "
        "tasks/s | broker ceiling, tasks/s |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    return head + "\n" + "\n".join(lines)


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"
