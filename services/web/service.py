"""The HTTP API: submit a task, read its outcome, or follow it as server-sent events.

- ``POST /tasks/{name}`` with ``{"args": [...], "kwargs": {...}, "countdown": seconds}`` (each
  optional; an empty body is ``{}``) → 202 ``{"id": ..., "task": ...}`` once RabbitMQ confirmed
  the message; 400 for bad JSON (nested too deeply included) or arguments that do not fit the
  task, 404 for a task name this service does not know, 413 for a body over the server's
  ``client_max_size`` (1 MiB by default), 503 when RabbitMQ did not confirm in time or too many
  tasks are pending. Every error answer is JSON: ``{"error": {"type", "message"}}``.
- ``GET /tasks/{id}`` → ``{"id", "task", "status": "pending" | "succeeded" | "failed"}`` plus
  ``"result"`` or ``"error": {"type", "message"}``; 404 for an id this process does not hold.
- ``GET /health`` → 200 ``{"status": "ok"}`` while the service is connected to RabbitMQ, else
  503 ``{"status": "unavailable"}``: for a container's or a load balancer's health check.
- ``GET /tasks/{id}/events`` → ``text/event-stream``: a ``progress`` event ``{"seq", "data"}``
  per ``await task_context().progress(data)`` of the task (read from ``handle.events()`` when
  handles have it; else the stream waits on ``handle.result()``), then one ``outcome`` event
  whose data is what ``GET /tasks/{id}`` returns.

Only the public API is used: ``aioqueue`` and ``aioqueue.contrib.aiohttp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from aiohttp import web

from aioqueue import (
    AioqueueError,
    App,
    BrokerConnectionError,
    PublishError,
    ResultHandle,
    TaskError,
)
from aioqueue.contrib.aiohttp import get_app, setup

from .handles import HandleStore

__all__ = ["HANDLES", "KEEPALIVE", "create_app"]

HANDLES = web.AppKey("handles", HandleStore)
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)
KEEPALIVE = 15.0  # seconds between keep-alive comments on an idle event stream
BODY_KEYS = frozenset({"args", "kwargs", "countdown"})
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


def create_app(
    aq_app: App,
    *,
    max_handles: int = 10_000,
    worker: bool = False,
    worker_options: Mapping[str, Any] | None = None,
    scheduler: bool = False,
) -> web.Application:
    """The web application, submitting to ``aq_app``'s tasks.

    Args:
        aq_app: The aioqueue app whose registered tasks can be submitted.
        max_handles: Most handles kept in memory (see `HandleStore`).
        worker: Also run a worker for ``aq_app`` in this process.
        worker_options: Keyword arguments of the worker (e.g. ``{"concurrency": 50}``).
        scheduler: Also run ``aq_app``'s scheduler in this process.
    """
    web_app = web.Application()
    web_app[HANDLES] = HandleStore(max_handles)
    web_app[SHUTDOWN] = asyncio.Event()
    setup(web_app, aq_app, worker=worker, worker_options=worker_options, scheduler=scheduler)
    web_app.on_shutdown.append(_on_shutdown)
    web_app.router.add_post("/tasks/{name}", submit)
    web_app.router.add_get("/tasks/{id}", status)
    web_app.router.add_get("/tasks/{id}/events", events)
    web_app.router.add_get("/health", health)
    return web_app


async def _on_shutdown(web_app: web.Application) -> None:
    web_app[SHUTDOWN].set()  # ends open event streams before aiohttp waits for handlers


# -- handlers ----------------------------------------------------------------------------------


async def submit(request: web.Request) -> web.Response:
    """``POST /tasks/{name}``: submit the task, answer 202 with its id."""
    aq_app = get_app(request)
    name = request.match_info["name"]
    task = aq_app.tasks.get(name)
    if task is None:
        return _error(404, "UnknownTask", f"no task named {name!r}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # aiohttp's own answer is text/plain
        limit = request.client_max_size
        return _error(413, "PayloadTooLarge", f"the body is over the limit of {limit} bytes")
    try:
        args, kwargs, countdown = _parse_body(raw)
    except ValueError as exc:
        return _error(400, "BadRequest", str(exc))
    if task.options.ignore_result:  # no outcome will come: nothing to keep
        handle = await _submit(aq_app, name, args, kwargs, countdown)
        return _accepted(handle, ignore_result=True)
    store = request.app[HANDLES]
    if not store.reserve():
        return _error(503, "Busy", "too many tasks pending in this process", retry_after=1)
    try:
        handle = await _submit(aq_app, name, args, kwargs, countdown)
    except BaseException:
        store.release()
        raise
    store.add(handle)
    return _accepted(handle)


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 while connected to RabbitMQ, else 503."""
    try:
        connected = get_app(request).broker.connected
    except AioqueueError:  # not connected yet, or closed
        connected = False
    if connected:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unavailable"}, status=503)


async def status(request: web.Request) -> web.Response:
    """``GET /tasks/{id}``: the task's status, with its result or error once it finished."""
    handle = request.app[HANDLES].get(request.match_info["id"])
    if handle is None:
        return _unknown(request.match_info["id"])
    return web.json_response(await describe(handle))


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /tasks/{id}/events``: server-sent events until the task's outcome arrives."""
    handle = request.app[HANDLES].get(request.match_info["id"])
    if handle is None:
        return _unknown(request.match_info["id"])
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        finished = await _pump(response, _handle_events(handle), request.app[SHUTDOWN])
        if not finished:
            message = "the server is shutting down; the outcome will not be sent"
            await response.write(_sse("shutdown", {"id": handle.id, "message": message}))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: nothing to tell it
    return response


# -- helpers -----------------------------------------------------------------------------------


def _parse_body(raw: bytes) -> tuple[list[Any], dict[str, Any], float | None]:
    """``args``, ``kwargs`` and ``countdown`` from the request body; ValueError if malformed."""
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise ValueError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # json parses nested arrays and objects recursively
        raise ValueError("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(body) - BODY_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; expected args, kwargs, countdown")
    args, kwargs, countdown = body.get("args", []), body.get("kwargs", {}), body.get("countdown")
    if not isinstance(args, list):
        raise ValueError('"args" must be a list')
    if not isinstance(kwargs, dict):
        raise ValueError('"kwargs" must be an object')
    if countdown is not None and (
        isinstance(countdown, bool) or not isinstance(countdown, int | float)
    ):
        raise ValueError('"countdown" must be a number of seconds')
    return args, kwargs, countdown


async def _submit(
    aq_app: App, name: str, args: list[Any], kwargs: dict[str, Any], countdown: float | None
) -> ResultHandle[Any]:
    """Submit, turning the caller's mistakes into 400 and the broker's trouble into 503."""
    try:
        return await aq_app.submit_with_options(name, args=args, kwargs=kwargs, countdown=countdown)
    except (TypeError, ValueError) as exc:  # TypeError includes EncodeError
        raise _http_error(web.HTTPBadRequest, type(exc).__name__, str(exc)) from None
    except (PublishError, BrokerConnectionError) as exc:
        raise _http_error(web.HTTPServiceUnavailable, type(exc).__name__, exc.message) from None


async def describe(handle: ResultHandle[Any]) -> dict[str, Any]:
    """What ``GET /tasks/{id}`` answers for ``handle`` (never blocks)."""
    body: dict[str, Any] = {"id": handle.id, "task": handle.task_name}
    if not handle.done():
        return {**body, "status": "pending"}
    try:
        value = await handle.result()  # done: returns at once
    except TaskError as exc:  # the task raised (or exceeded its own timeout)
        return {**body, "status": "failed", "error": _error_info(exc.type_name, exc.message)}
    except AioqueueError as exc:  # not found, dead-lettered, undecodable, app closed
        return {**body, "status": "failed", "error": _error_info(type(exc).__name__, exc.message)}
    return {**body, "status": "succeeded", "result": value}


async def _handle_events(handle: ResultHandle[Any]) -> AsyncGenerator[tuple[str, Any], None]:
    """``progress`` events if the handle offers ``events()``, then the ``outcome`` event.

    ``handle.events()`` yields progress updates (``seq``, ``data``), then the final result (a
    ``value``), or raises the task's error; the outcome event describes either, like GET.
    """
    progress = getattr(handle, "events", None)
    try:
        if callable(progress):
            async with contextlib.aclosing(progress()) as updates:
                async for event in updates:
                    if not _is_final(event):
                        yield "progress", _jsonable(event)
        else:
            await handle.result()
    except AioqueueError:
        pass  # the task failed: described below
    yield "outcome", await describe(handle)


def _is_final(event: Any) -> bool:
    """Whether an item of ``handle.events()`` is its last one, the result (not progress)."""
    return hasattr(event, "value") and not hasattr(event, "data")


async def _pump(
    response: web.StreamResponse,
    source: AsyncGenerator[tuple[str, Any], None],
    shutdown: asyncio.Event,
) -> bool:
    """Write ``source``'s events as they come, with keep-alive comments while it is quiet.

    Returns:
        True once ``source`` is exhausted; False if the server began shutting down first.
    """
    stop = asyncio.ensure_future(shutdown.wait())
    pending: asyncio.Future[tuple[str, Any] | None] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(_next(source))
            while not pending.done():
                either: set[asyncio.Future[Any]] = {pending, stop}
                await asyncio.wait(either, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
                if stop.done() and not pending.done():
                    return False
                if not pending.done():
                    await response.write(b": keep-alive\n\n")  # also notices a gone client
            event = pending.result()
            if event is None:
                return True
            await response.write(_sse(*event))
    finally:
        stop.cancel()
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await source.aclose()


async def _next(source: AsyncGenerator[tuple[str, Any], None]) -> tuple[str, Any] | None:
    try:
        return await anext(source)
    except StopAsyncIteration:
        return None


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _jsonable(event: Any) -> Any:
    """A progress event as JSON data: mappings and dataclasses as objects, else ``{"value"}``."""
    if isinstance(event, Mapping):
        return dict(event)
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        return dataclasses.asdict(event)
    return {"value": event}


def _accepted(handle: ResultHandle[Any], *, ignore_result: bool = False) -> web.Response:
    if ignore_result:
        return web.json_response(
            {"id": handle.id, "task": handle.task_name, "ignore_result": True}, status=202
        )
    return web.json_response(
        {"id": handle.id, "task": handle.task_name},
        status=202,
        headers={"Location": f"/tasks/{handle.id}"},
    )


def _error_info(type_name: str, message: str) -> dict[str, str]:
    return {"type": type_name, "message": message}


def _error(
    status: int, type_name: str, message: str, *, retry_after: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(
        {"error": _error_info(type_name, message)}, status=status, headers=headers
    )


def _http_error(cls: type[web.HTTPException], type_name: str, message: str) -> web.HTTPException:
    return cls(
        text=json.dumps({"error": _error_info(type_name, message)}), content_type="application/json"
    )


def _unknown(task_id: str) -> web.Response:
    message = f"no task {task_id!r} in this process (never submitted here, or evicted)"
    return _error(404, "UnknownTask", message)
