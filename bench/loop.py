"""The event loop every benchmark process runs on: uvloop when installed, as in production."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from aioqueue.cli.common import run as aioqueue_run

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop when installed, exactly as aioqueue's CLIs do."""
    return aioqueue_run(main)


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: what `run` uses here."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
