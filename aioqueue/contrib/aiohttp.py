"""aiohttp integration: one `App` per web application, connected for the server's lifetime.

```python
from aiohttp import web
from aioqueue.contrib.aiohttp import get_app, setup
from shop.tasks import app, add

async def create(request: web.Request) -> web.Response:
    handle = await add.submit(2, 3)            # or: await get_app(request).submit("shop.add", 2, 3)
    return web.json_response({"id": handle.id}, status=202)

web_app = web.Application()
web_app.router.add_post("/add", create)
setup(web_app, app, worker=True)                # worker=True: also run the tasks in this process
web.run_app(web_app)
```

`setup` registers a cleanup context: at startup it connects the app, then starts the optional
`Worker` and scheduler in the server's event loop; at cleanup it stops them gracefully (the
scheduler first, then the worker, which lets running tasks finish within its
``shutdown_timeout``) and closes the app, which fails every still-pending handle with
`BrokerConnectionError` rather than leaving anyone waiting.

Handles keep their futures in this process's memory: results come back to the process that
submitted, so a handle is only useful in the web process that created it (see
``services/web/README.md`` for deployments with several web processes).

Needs the ``aiohttp`` extra: ``pip install aioqueue-rabbit[aiohttp]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

try:
    from aiohttp import web
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "aioqueue.contrib.aiohttp needs aiohttp: pip install aioqueue-rabbit[aiohttp]"
    ) from exc

from ..app import App
from ..errors import BrokerConnectionError
from ..scheduler import Scheduler
from ..worker import Worker

__all__ = ["AIOQUEUE_APP", "AIOQUEUE_EMBEDDED", "Embedded", "get_app", "setup"]

log = logging.getLogger("aioqueue.contrib.aiohttp")


@dataclass(slots=True)
class Embedded:
    """What `setup` runs beside the web application; filled at startup, emptied at cleanup.

    Attributes:
        worker: The in-process `Worker` while it runs (``setup(..., worker=True)``), else None.
        scheduler: The in-process `Scheduler` while it runs (``scheduler=True``), else None.
    """

    worker: Worker | None = None
    scheduler: Scheduler | None = None


AIOQUEUE_APP = web.AppKey("aioqueue_app", App)
"""The `App` that `setup` attached: ``request.app[AIOQUEUE_APP]`` (or `get_app`)."""

AIOQUEUE_EMBEDDED = web.AppKey("aioqueue_embedded", Embedded)
"""The worker and scheduler running inside the web application, e.g. for a health endpoint."""


def setup(
    web_app: web.Application,
    app: App,
    *,
    worker: bool = False,
    worker_options: Mapping[str, Any] | None = None,
    scheduler: bool = False,
) -> None:
    """Connect ``app`` for the lifetime of ``web_app``, optionally running a worker and scheduler.

    Args:
        web_app: The aiohttp application (not yet started).
        app: The aioqueue app; stored under `AIOQUEUE_APP`.
        worker: Also run a `Worker` for ``app`` in the server's event loop.
        worker_options: Keyword arguments of `Worker` (``concurrency``, ``queues``,
            ``shutdown_timeout``, ...); checked here, used at startup.
        scheduler: Also run ``app.scheduler()`` (periodic tasks) in the server's event loop;
            it campaigns for leadership with every other scheduler of the app.

    Raises:
        TypeError: ``worker_options`` do not fit `Worker`, or options without ``worker=True``.
        RuntimeError: ``setup`` was already called on ``web_app``.
    """
    options = dict(worker_options or {})
    if options and not worker:
        raise TypeError("worker_options given without worker=True")
    inspect.signature(Worker).bind(app, **options)  # a typo fails now, not at startup
    if AIOQUEUE_APP in web_app:
        raise RuntimeError("aioqueue is already set up on this web application")
    embedded = Embedded()
    web_app[AIOQUEUE_APP] = app
    web_app[AIOQUEUE_EMBEDDED] = embedded

    async def aioqueue_context(_: web.Application) -> AsyncIterator[None]:
        await app.connect()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if worker:
                    embedded.worker = await stack.enter_async_context(_running(app, options))
                if scheduler:
                    embedded.scheduler = await stack.enter_async_context(app.scheduler())
                yield
        finally:
            embedded.worker = embedded.scheduler = None
            await app.close()  # fails the handles still pending: nobody waits forever

    web_app.cleanup_ctx.append(aioqueue_context)


def get_app(source: web.Request | web.Application) -> App:
    """The `App` that `setup` attached to this web application (or to a parent of it).

    Raises:
        LookupError: `setup` was not called on the application.
    """
    mapping = source.config_dict if isinstance(source, web.Request) else source
    try:
        return mapping[AIOQUEUE_APP]
    except KeyError:
        raise LookupError(
            "no aioqueue App on this web application: call "
            "aioqueue.contrib.aiohttp.setup(web_app, app) first"
        ) from None


@contextlib.asynccontextmanager
async def _running(app: App, options: Mapping[str, Any]) -> AsyncIterator[Worker]:
    """Run a `Worker` on the connected ``app`` until the block ends, then stop it gracefully."""
    worker = Worker(app, **options)
    run = asyncio.ensure_future(worker.run())
    try:
        await _wait_ready(worker, run, app.settings.connect_timeout)
    except BaseException:
        worker.stop()
        worker.stop()  # a second stop returns whatever it holds to the queue at once
        await asyncio.gather(run, return_exceptions=True)
        raise
    run.add_done_callback(_log_crash)
    try:
        yield worker
    finally:
        if not run.done():  # else it crashed, and _log_crash said so
            run.remove_done_callback(_log_crash)
            worker.stop()
            await run


async def _wait_ready(worker: Worker, run: asyncio.Future[None], timeout: float) -> None:
    ready = asyncio.ensure_future(worker.ready.wait())
    either: set[asyncio.Future[Any]] = {run, ready}
    try:
        await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if run.done():
        run.result()  # the start-up error
    if not worker.ready.is_set():
        raise BrokerConnectionError(f"the worker did not start within {timeout:g}s")


def _log_crash(run: asyncio.Future[None]) -> None:
    if not run.cancelled() and run.exception() is not None:
        log.error("the embedded aioqueue worker stopped with an error", exc_info=run.exception())
