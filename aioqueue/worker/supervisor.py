"""``aioqueue worker module:app --processes N``: N worker processes under one supervisor.

Each child is an ordinary ``python -m aioqueue.worker`` process with its own event loop and
connection, started with the supervisor's own command line plus ``--processes 1
--process-index I``. The supervisor

- restarts a child that exits on its own, after a back-off that doubles with each exit in a
  row (1 s, 2 s, 4 s ... at most 30 s) and starts again from 1 s once a child has run for a
  minute; a child that exits with 2 (a usage error: a bad app spec, a bad option) is not
  restarted: the supervisor stops the others and exits 2;
- forwards SIGTERM and SIGINT to every child: the first drains them (each finishes its running
  tasks within ``--shutdown-timeout``), a second returns their running tasks now; it exits 0
  when every child exited 0;
- reports their health: a line per start and exit (pid, exit code or signal, the next
  restart), and the pids in its banner. Each child publishes its own heartbeats, so
  ``aioqueue inspect`` and the dashboard list every process as a worker (``host:pid``).

Children ask the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG`` on Linux),
so a supervisor killed with SIGKILL leaves no worker behind: each drains as on a SIGTERM.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["INDEX_ENV", "Supervisor", "child_argv"]

log = logging.getLogger("aioqueue.worker.supervisor")

INDEX_ENV = "AIOQUEUE_WORKER_PROCESS"  # "I/N" in each child's environment
USAGE_ERROR = 2
_PR_SET_PDEATHSIG = 1


def child_argv(argv: Sequence[str], index: int) -> list[str]:
    """The command line of child ``index``: the supervisor's own, made single-process (argparse
    takes the last occurrence of an option, so appending overrides)."""
    return [*argv, "--processes", "1", "--process-index", str(index)]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(name, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    exits_in_a_row: int = 0
    codes: list[int] = field(default_factory=list)


class Supervisor:
    """Run ``processes`` children of ``argv`` (the worker's arguments, without the program)."""

    def __init__(
        self,
        argv: Sequence[str],
        processes: int,
        *,
        first_backoff: float = 1.0,
        max_backoff: float = 30.0,
        stable_after: float = 60.0,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.argv = list(argv)
        self.children = [_Child(i) for i in range(processes)]
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.env = dict(env or {})  # more for every child's environment (its replay guard)
        self.pass_fds = tuple(pass_fds)  # open files every child inherits (its replay guard)
        self.restarts = 0
        self._stopping = asyncio.Event()
        self._signals: list[signal.Signals] = []
        self._fatal: int | None = None

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Forward ``sig`` to every child; the first call also ends the restarts."""
        self._signals.append(sig)
        self._stopping.set()
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.send_signal(sig)

    async def run(self) -> int:
        """Supervise until stopped and every child exited; the exit code for the command."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            for child in self.children:
                await self._start(child)
            print(self.banner(), file=sys.stderr, flush=True)
            await asyncio.gather(*(self._watch(child) for child in self.children))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self._fatal is not None:
            return self._fatal
        codes = [c.codes[-1] for c in self.children if c.codes]
        return 0 if all(code == 0 for code in codes) else 1

    def banner(self) -> str:
        pids = ", ".join(str(pid) for pid in self.pids)
        return (
            f"aioqueue supervisor {os.getpid()}: {len(self.children)} worker processes "
            f"(pids {pids}); SIGTERM drains them all"
        )

    def _on_signal(self, sig: signal.Signals) -> None:
        again = "again: children return running tasks now" if self._signals else "draining"
        log.warning("supervisor received %s, %s", sig.name, again)
        self.stop(sig)

    async def _start(self, child: _Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aioqueue.worker",
            *child_argv(self.argv, child.index),
            env={**os.environ, **self.env, INDEX_ENV: f"{child.index}/{len(self.children)}"},
            preexec_fn=_die_with_parent,
            pass_fds=self.pass_fds,
        )
        child.started = time.monotonic()
        log.info("worker process %d started: pid %d", child.index, child.proc.pid)
        if self._signals:  # a signal came while it was starting: it missed the forward
            child.proc.send_signal(self._signals[-1])

    async def _watch(self, child: _Child) -> None:
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            child.codes.append(code)
            if self._stopping.is_set():
                log.info(
                    "worker process %d (pid %d) exited: %s",
                    child.index,
                    child.proc.pid,
                    _describe(code),
                )
                return
            if code == USAGE_ERROR:
                log.error(
                    "worker process %d (pid %d) exited with 2 (a usage error): not restarted; "
                    "stopping the others",
                    child.index,
                    child.proc.pid,
                )
                self._fatal = USAGE_ERROR
                self.stop()
                return
            ran = time.monotonic() - child.started
            child.exits_in_a_row = 1 if ran >= self.stable_after else child.exits_in_a_row + 1
            delay = min(self.max_backoff, self.first_backoff * 2 ** (child.exits_in_a_row - 1))
            log.error(
                "worker process %d (pid %d) exited: %s after %.1f s; restarting in %.0f s",
                child.index,
                child.proc.pid,
                _describe(code),
                ran,
                delay,
            )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                return  # stopped during the back-off
            except TimeoutError:
                pass
            self.restarts += 1
            await self._start(child)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
