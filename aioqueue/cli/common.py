"""Shared pieces of the command-line programs: loading ``module:app``, logging, the event loop."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from ..app import App
from ..errors import AioqueueError
from ..transports import check_broker_url

T = TypeVar("T")

__all__ = ["app_from_args", "load_app", "run", "setup_logging"]


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


def app_from_args(args: argparse.Namespace) -> App | None:
    """Load ``args.app`` and apply ``--broker-url`` / ``--connect-timeout`` if the command has
    them; None (after printing why) when the app cannot be loaded."""
    try:
        app = load_app(args.app)
    except (AioqueueError, ImportError) as exc:
        print(f"error: cannot load {args.app}: {exc}", file=sys.stderr)
        return None
    if getattr(args, "broker_url", None):
        try:
            app.broker_url = check_broker_url(args.broker_url)
        except ValueError as exc:
            print(f"error: --broker-url: {exc}", file=sys.stderr)
            return None
    if getattr(args, "connect_timeout", None) is not None:
        app.settings = replace(app.settings, connect_timeout=args.connect_timeout)
    return app


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (``aioqueue-rabbit[fast]``), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
