"""Shared pieces of the command-line programs: loading ``module:app``, logging, the event loop."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from .app import App
from .errors import AioqueueError

__all__ = ["load_app", "run", "setup_logging"]


def load_app(spec: str) -> App:
    """Import ``"package.module:attribute"`` and return the `App` it names."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AioqueueError(f"expected MODULE:APP (e.g. shop.tasks:app), got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise AioqueueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(app, App):
        raise AioqueueError(f"{spec} is a {type(app).__name__}, not an aioqueue App")
    return app


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when it is installed (``aioqueue[fast]``), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
