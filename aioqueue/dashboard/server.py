"""The dashboard's web application: its pages, JSON API, live stream and actions.

```
GET  /                          the single page (overview, tasks, task, workers, queues, schedules)
GET  /static/<file>             its script, style and the vendored uPlot
GET  /api/overview | /api/tasks?name=&state=&queue=&since=&until=&limit= | /api/tasks/<id>
GET  /api/workers | /api/queues | /api/queues/<queue>/dead | /api/schedules
GET  /api/stream                server-sent events: changed tasks and workers
POST /api/tasks/<id>/cancel | /api/queues/<queue>/replay {"ids": [...]} | /api/queues/<queue>/purge
```
Authentication and the cross-site checks of the actions: `aioqueue.dashboard.security`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..app import App
from ..errors import AioqueueError
from . import queues, schedules
from .live import Feed
from .security import Credentials, same_origin
from .state import DashboardState

__all__ = ["create_app"]

log = logging.getLogger("aioqueue.dashboard")

STATIC = Path(__file__).parent / "static"
_ASSETS = {p.name for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else set()
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
KEEPALIVE = 15.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
APP_KEY = web.AppKey("aioqueue_app", App)
STATE_KEY = web.AppKey("dashboard_state", DashboardState)
FEED_KEY = web.AppKey("dashboard_feed", Feed)
CREDENTIALS_KEY = web.AppKey("dashboard_credentials", Credentials)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    credentials = request.app[CREDENTIALS_KEY]
    user = credentials.who(request)
    if user is None:
        return web.json_response(
            {"error": "authentication required"},
            status=401,
            headers={"WWW-Authenticate": credentials.challenge()},
        )
    if request.method not in ("GET", "HEAD") and not same_origin(request):
        return _error(403, "cross-site request refused: actions come from the dashboard's pages")
    try:
        response = await handler(request)
    except (TimeoutError, AioqueueError, ConnectionError) as exc:
        return _error(503, f"the broker could not answer: {exc}")
    if not response.prepared:  # the live stream has sent its headers already
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _user(request: web.Request) -> str:
    """Who asked (the guard let only authenticated requests through)."""
    return request.app[CREDENTIALS_KEY].who(request) or "?"


def _app(request: web.Request) -> App:
    return request.app[APP_KEY]


def _float(request: web.Request, key: str) -> float | None:
    text = request.query.get(key)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key} must be a number") from None
    if not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"{key} must be a number")
    return value


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html"})


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in _ASSETS:
        raise web.HTTPNotFound()
    content_type = _TYPES.get(Path(name).suffix, "text/plain")
    return web.FileResponse(STATIC / name, headers={"Content-Type": content_type})


async def overview(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    now = time.time()
    workers = state.worker_views(now)
    counts: dict[str, int] = {}
    for record in state.tasks.values():
        counts[record.state] = counts.get(record.state, 0) + 1
    return web.json_response(
        {
            "series": state.series(),
            "states": counts,
            "workers_online": sum(w["online"] for w in workers),
            "events_seen": state.events_seen,
            "max_tasks": state.max_tasks,
            "window_minutes": state.window_minutes,
        }
    )


async def tasks(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    limit = _float(request, "limit")
    rows = state.find_tasks(
        name=request.query.get("name") or None,
        state=request.query.get("state") or None,
        queue=request.query.get("queue") or None,
        since=_float(request, "since"),
        until=_float(request, "until"),
        limit=max(1, min(int(limit or 200), 1000)),
    )
    return web.json_response({"tasks": rows})


async def task(request: web.Request) -> web.StreamResponse:
    record = request.app[STATE_KEY].tasks.get(request.match_info["id"])
    if record is None:
        return _error(404, "no such task among the recent ones")
    detail = record.detail()
    detail["dead_letter"] = None
    if record.state == "dead-lettered" and record.queue:
        found = await queues.dead_letters(_app(request), record.queue, record.id)
        detail["dead_letter"] = found[0] if found else None
    return web.json_response(detail)


async def workers(request: web.Request) -> web.StreamResponse:
    return web.json_response({"workers": request.app[STATE_KEY].worker_views(time.time())})


async def queue_list(request: web.Request) -> web.StreamResponse:
    rows = await queues.queue_rows(_app(request), request.app[STATE_KEY])
    return web.json_response({"queues": rows})


def _known_queue(request: web.Request) -> str:
    name = request.match_info["queue"]
    if name not in queues.queue_names(_app(request), request.app[STATE_KEY]):
        raise web.HTTPNotFound(text="no such queue")
    return name


async def dead(request: web.Request) -> web.StreamResponse:
    letters = await queues.dead_letters(_app(request), _known_queue(request))
    return web.json_response({"dead_letters": letters})


async def schedule_list(request: web.Request) -> web.StreamResponse:
    return web.json_response(await schedules.schedule_rows(_app(request)))


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


async def replay(request: web.Request) -> web.StreamResponse:
    queue = _known_queue(request)
    ids = (await _json_body(request)).get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise web.HTTPBadRequest(text='give {"ids": ["<task id>", ...]}')
    replayed = await queues.replay_dead(_app(request), queue, ids[:1000])
    log.warning("dashboard: %s replayed %d dead letter(s) of %s", _user(request), replayed, queue)
    return web.json_response({"replayed": replayed})


async def purge(request: web.Request) -> web.StreamResponse:
    queue = _known_queue(request)
    await _json_body(request)
    purged = await queues.purge_dead(_app(request), queue)
    if purged is None:
        return _error(404, f"{queue} has no dead-letter queue")
    log.warning("dashboard: %s purged %d dead letter(s) of %s", _user(request), purged, queue)
    return web.json_response({"purged": purged})


async def cancel(request: web.Request) -> web.StreamResponse:
    task_id = request.match_info["id"]
    await _json_body(request)
    app = _app(request)
    cancel_task = getattr(app, "cancel", None)
    if cancel_task is None:
        return _error(404, "this version of aioqueue cannot cancel tasks")
    await cancel_task(task_id)
    log.warning("dashboard: %s cancelled task %s", _user(request), task_id)
    return web.json_response({"cancelled": task_id})


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    async with request.app[FEED_KEY].subscribe() as client:
        try:
            await response.write(b": connected\n\nretry: 2000\n\n")
            while True:
                try:
                    message = await asyncio.wait_for(client.get(), KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if message.get("closing"):
                    break
                await response.write(b"data: " + json.dumps(message).encode() + b"\n\n")
        except (ConnectionError, RuntimeError):  # the browser went away
            pass
    return response


async def _shutdown(web_app: web.Application) -> None:
    for client in list(web_app[FEED_KEY]._clients):
        while not client.empty():
            client.get_nowait()
        client.put_nowait({"closing": True})


def create_app(
    app: App,
    *,
    state: DashboardState | None = None,
    credentials: Credentials | None = None,
    feed: bool = True,
) -> web.Application:
    """The dashboard of ``app`` as an aiohttp application.

    Args:
        app: Whose tasks; connected while the application runs (if it is not already).
        state: Where the picture is kept (default: a `DashboardState` with its defaults).
        credentials: Who may use it (default: `Credentials.from_env`).
        feed: Read the event stream (tests of the pages alone pass False).
    """
    web_app = web.Application(middlewares=[_guard], client_max_size=1 << 20)
    state = state or DashboardState()
    web_app[APP_KEY] = app
    web_app[STATE_KEY] = state
    web_app[FEED_KEY] = Feed(app, state)
    web_app[CREDENTIALS_KEY] = credentials or Credentials.from_env()
    routes = web_app.router
    routes.add_get("/", index)
    routes.add_get("/static/{name}", static)
    routes.add_get("/api/overview", overview)
    routes.add_get("/api/tasks", tasks)
    routes.add_get("/api/tasks/{id}", task)
    routes.add_post("/api/tasks/{id}/cancel", cancel)
    routes.add_get("/api/workers", workers)
    routes.add_get("/api/queues", queue_list)
    routes.add_get("/api/queues/{queue}/dead", dead)
    routes.add_post("/api/queues/{queue}/replay", replay)
    routes.add_post("/api/queues/{queue}/purge", purge)
    routes.add_get("/api/schedules", schedule_list)
    routes.add_get("/api/stream", stream)
    web_app.on_shutdown.append(_shutdown)
    if feed:
        web_app.cleanup_ctx.append(_run_feed)
    return web_app


async def _run_feed(web_app: web.Application) -> AsyncIterator[None]:
    app = web_app[APP_KEY]
    own = app._broker is None
    if own:
        await app.connect()
    feed = web_app[FEED_KEY]
    await feed.start()
    yield
    await feed.close()
    if own:
        await app.close()
