"""The ``aioqueue`` command: worker, scheduler, cancel, status, purge, dlq, inspect, dashboard.

One entry for every program, each subcommand handed to the parser that already exists for it:
``aioqueue worker`` is ``python -m aioqueue.worker``, ``aioqueue scheduler`` is
``python -m aioqueue.scheduler``, ``aioqueue cancel`` cancels tasks by id (`aioqueue.cli.cancel`),
``aioqueue inspect`` is `aioqueue.cli.inspect`, ``aioqueue dashboard`` is
`aioqueue.dashboard.cli`, and ``status``, ``purge`` and ``dlq`` are the administration commands
(`aioqueue.cli.dlq`).
``python -m aioqueue`` is this command too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..scheduler import cli as scheduler_cli
from ..worker import cli as worker_cli
from . import cancel, dlq, inspect

__all__ = ["PROGRAMS", "main"]

# Subcommands that are whole programs of their own, with their own options.
PROGRAMS: dict[str, Callable[..., int]] = {
    "worker": worker_cli.main,
    "scheduler": scheduler_cli.main,
    "cancel": cancel.main,
    "inspect": inspect.main,
    "dashboard": lambda argv, prog: _dashboard(argv, prog=prog),
}


def _dashboard(argv: list[str], *, prog: str) -> int:
    """``aioqueue dashboard``: imported only when asked for (it needs the aiohttp extra)."""
    try:
        from ..dashboard import cli as dashboard_cli
    except ImportError as exc:
        print(f"error: the dashboard needs aioqueue-rabbit[aiohttp]: {exc}", file=sys.stderr)
        return 2
    return dashboard_cli.main(argv, prog=prog)


def main(argv: list[str] | None = None, *, prog: str = "aioqueue") -> int:
    """Run the subcommand ``argv[0]`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PROGRAMS:
        return PROGRAMS[args[0]](args[1:], prog=f"{prog} {args[0]}")
    return dlq.main(args, prog=prog)
