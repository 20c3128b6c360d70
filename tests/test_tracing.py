"""OpenTelemetry tracing (issue 19): spans and W3C trace context from submit to result.

The SDK's in-memory exporter records what a real broker hop, a retry, a dead letter, the
scheduler and an aiohttp request produce; malformed trace headers never break a worker; and
without a tracer provider, or without the packages, nothing is traced and nothing breaks.
"""

from __future__ import annotations

import decimal
import json
import random
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from aioqueue import App, Retry, RetryPolicy, TaskError, task_context
from aioqueue.broker import Delivery, settle
from aioqueue.contrib.aiohttp import get_app, setup
from aioqueue.message import Envelope
from aioqueue.message.celery import CeleryFields, encode_task
from aioqueue.message.headers import H_TRACEPARENT, H_TRACESTATE
from aioqueue.message.properties import task_properties
from aioqueue.otel import extract
from aioqueue.testing import VirtualClock, run_until_idle, running_worker, use_clock
from tests.conftest import ROOT, WorkerProcess, wait_until
from tests.schedules import START

Spans = Callable[[], Sequence[ReadableSpan]]


def _reset_global_provider() -> None:
    # the API lets a process set its tracer provider once; tests set one each (private API,
    # as OpenTelemetry's own test utilities do)
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """A tracer provider configured by "the user", recording every span in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_global_provider()
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    _reset_global_provider()


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


async def spans_named(
    exporter: InMemorySpanExporter, prefix: str, count: int = 1
) -> list[ReadableSpan]:
    """The finished spans whose name starts with ``prefix``, once there are ``count``."""
    return await wait_until(  # type: ignore[no-any-return]
        lambda: (found := named(exporter, prefix)) and len(found) >= count and found,
        timeout=30,
        what=f"{count} finished span(s) named {prefix}...",
    )


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


async def test_a_submit_and_its_run_are_one_trace_across_the_broker(
    exporter: InMemorySpanExporter, make_app: Callable[..., App], queue_name: str
) -> None:
    # Given an app connected after the user configured a tracer provider
    app = make_app()

    @app.task(name="otel.add")
    async def add(x: int, y: int) -> int:
        return x + y

    tracer = trace.get_tracer("tests")
    async with app, running_worker(app):
        assert app.tracing is not None
        # When a request (a span of the caller's) submits a task and waits for its result
        with tracer.start_as_current_span("request") as request:
            handle = await add.submit(2, 3)
            assert await handle.result(timeout=30) == 5
        (process,) = await spans_named(exporter, "process ")
    (publish,) = named(exporter, "publish ")
    (wait,) = named(exporter, "wait ")
    trace_id, request_id = request.get_span_context().trace_id, request.get_span_context().span_id

    # Then the producer span is the request's child, the consumer span the producer's: one trace
    assert publish.kind is SpanKind.PRODUCER and publish.name == f"publish {queue_name}"
    assert parent_of(publish) == request_id and ids(publish)[0] == trace_id
    assert process.kind is SpanKind.CONSUMER and process.name == f"process {queue_name}"
    assert ids(process)[0] == trace_id and parent_of(process) == ids(publish)[1]
    # and the caller's wait is in the request's trace, linked to the submit
    assert parent_of(wait) == request_id
    assert [link.context.span_id for link in wait.links] == [ids(publish)[1]]

    # And the spans follow the messaging conventions (RabbitMQ), with the task's own attributes
    assert publish.attributes is not None and process.attributes is not None
    assert {k: publish.attributes[k] for k in ("messaging.system", "messaging.operation.type")} == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
    }
    assert publish.attributes["messaging.destination.name"] == ""
    assert publish.attributes["messaging.rabbitmq.destination.routing_key"] == queue_name
    assert publish.attributes["messaging.message.id"] == handle.id
    expected = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.destination.subscription.name": queue_name,
        "messaging.message.id": handle.id,
        "aioqueue.task.name": "otel.add",
        "aioqueue.task.id": handle.id,
        "aioqueue.task.attempt": 1,
        "aioqueue.queue": queue_name,
        "aioqueue.task.outcome": "succeeded",
    }
    assert {k: process.attributes.get(k) for k in expected} == expected
    assert process.status.status_code is not StatusCode.ERROR


async def test_a_worker_process_continues_the_callers_trace(
    exporter: InMemorySpanExporter,
    make_app: Callable[..., App],
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    # Given a worker process whose app module configures a tracer provider (as documented)
    worker = spawn_worker(app_spec="tests.apps.traced:app")
    await worker.wait_ready()
    app = make_app()
    # When this process submits in a span of its own and waits for the result
    async with app:
        handle = await app.submit("tests.traced.add", 2, 3)
        assert await handle.result(timeout=30) == 5
    (publish,) = named(exporter, "publish ")

    # Then the worker's consumer span, in the other process, is the submit's child
    def exported() -> list[dict[str, Any]]:
        path = tmp_path / "spans.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    (process,) = await wait_until(exported, timeout=30, what="the worker's span")
    assert process["name"].startswith("process ")
    assert (process["trace_id"], process["parent_id"]) == ids(publish)
    assert process["attributes"]["aioqueue.task.name"] == "tests.traced.add"
    assert process["attributes"]["aioqueue.task.outcome"] == "succeeded"


async def test_signed_messages_carry_the_trace_too(
    exporter: InMemorySpanExporter, make_app: Callable[..., App]
) -> None:
    # Given an app that signs its messages (the trace headers are not among the signed ones)
    app = make_app(signing_keys={"k1": b"k" * 32})

    @app.task(name="otel.signed", retry=RetryPolicy(max_attempts=2, backoff=0.1, jitter=0))
    async def signed() -> int:
        if task_context().attempt == 1:
            raise Retry(delay=0.1)
        return task_context().attempt

    # When a task is submitted, retried once (re-signed, re-stamped) and finishes
    async with app, running_worker(app):
        assert await (await signed.submit()).result(timeout=30) == 2
        first, second = sorted(
            await spans_named(exporter, "process ", 2),
            key=lambda s: s.attributes["aioqueue.task.attempt"],  # type: ignore[index]
        )
    (publish,) = named(exporter, "publish ")
    # Then both attempts ran (nothing refused) in the submit's trace
    assert parent_of(first) == ids(publish)[1] and parent_of(second) == ids(first)[1]
    assert second.attributes is not None
    assert second.attributes["aioqueue.task.outcome"] == "succeeded"


async def test_a_retry_continues_the_trace_and_is_an_event(
    exporter: InMemorySpanExporter, make_app: Callable[..., App]
) -> None:
    # Given a task that asks for a second attempt once
    app = make_app()

    @app.task(name="otel.flaky", retry=RetryPolicy(max_attempts=3, backoff=0.1, jitter=0))
    async def flaky() -> int:
        if task_context().attempt == 1:
            raise Retry(delay=0.1)
        return task_context().attempt

    async with app, running_worker(app):
        # When it is submitted
        handle = await flaky.submit()
        assert await handle.result(timeout=30) == 2
        spans = await spans_named(exporter, "process ", 2)
    (publish,) = named(exporter, "publish ")
    first, second = sorted(spans, key=lambda s: s.attributes["aioqueue.task.attempt"])  # type: ignore[index]

    # Then the first attempt is the submit's child and says "retried", with a retry event
    assert parent_of(first) == ids(publish)[1]
    assert first.attributes is not None and first.attributes["aioqueue.task.outcome"] == "retried"
    (event,) = [e for e in first.events if e.name == "retry"]
    assert event.attributes is not None and event.attributes["aioqueue.retry.attempt"] == 2
    # and the second attempt continues the same trace, as the first one's child
    assert ids(second)[0] == ids(publish)[0] and parent_of(second) == ids(first)[1]
    assert second.attributes is not None
    assert second.attributes["aioqueue.task.outcome"] == "succeeded"


async def test_a_dead_letter_is_an_event_and_an_error(
    exporter: InMemorySpanExporter, make_app: Callable[..., App], queue_name: str
) -> None:
    # Given a task that always fails, with no retry left
    app = make_app()

    @app.task(name="otel.broken")
    async def broken() -> None:
        raise ValueError("no luck")

    dead: list[Delivery] = []

    async def take(delivery: Delivery) -> None:
        dead.append(delivery)
        await settle(delivery, ack=True)

    async with app, running_worker(app):
        handle = await broken.submit()
        with pytest.raises(TaskError):
            await handle.result(timeout=30)
        (process,) = await spans_named(exporter, "process ")
        reader = await app.broker.subscribe(f"{queue_name}.dlq", take, prefetch=1)
        await wait_until(lambda: dead, timeout=30, what="the dead letter")
        await reader.close()
    (publish,) = named(exporter, "publish ")
    (wait,) = named(exporter, "wait ")

    # Then the consumer span continues the trace, failed, with the dead letter as an event
    assert parent_of(process) == ids(publish)[1]
    assert process.attributes is not None
    assert process.attributes["aioqueue.task.outcome"] == "failed"
    assert process.attributes["error.type"] == "ValueError"
    assert process.status.status_code is StatusCode.ERROR
    (event,) = [e for e in process.events if e.name == "dead_letter"]
    assert event.attributes == {
        "aioqueue.dead_letter.reason": "failed",
        "aioqueue.dead_letter.queue": f"{queue_name}.dlq",
    }
    # and the caller's wait ended in the task's error
    assert wait.status.status_code is StatusCode.ERROR
    # and the dead letter keeps the submit's trace context (a replay continues that trace)
    headers = dead[0].properties.headers or {}
    trace_id, span_id = ids(publish)
    assert headers[H_TRACEPARENT].startswith(f"00-{trace_id:032x}-{span_id:016x}-")


async def test_an_unreadable_message_is_a_dead_lettered_consumer_span(
    exporter: InMemorySpanExporter, make_app: Callable[..., App], queue_name: str
) -> None:
    # Given a message no worker can read (no task name), carrying a caller's trace context
    app = make_app()
    tracer = trace.get_tracer("tests")
    async with app, running_worker(app):
        with tracer.start_as_current_span("foreign producer") as foreign:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        properties = task_properties(Envelope(id=uuid.uuid4().hex, task="x"))
        properties.headers = carrier  # no aioqueue header at all
        await app.broker.publish(queue_name, b"{}", properties)
        (process,) = await spans_named(exporter, "process ")
    # Then the worker's span continues that trace and tells the dead letter
    assert ids(process)[0] == foreign.get_span_context().trace_id
    assert process.attributes is not None
    assert process.attributes["aioqueue.task.outcome"] == "dead_lettered"
    assert [e.name for e in process.events] == ["dead_letter"]


async def test_a_celery_format_message_carries_the_trace_both_ways(
    exporter: InMemorySpanExporter, make_app: Callable[..., App], queue_name: str
) -> None:
    # Given a Celery protocol-2 message whose producer put a trace context in its headers
    app = make_app()

    @app.task(name="otel.celery.add")
    async def add(x: int, y: int) -> int:
        return x + y

    tracer = trace.get_tracer("tests")
    async with app, running_worker(app):
        with tracer.start_as_current_span("celery producer") as producer:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        envelope = Envelope(
            id=uuid.uuid4().hex, task="otel.celery.add", args=(2, 3), celery=CeleryFields(),
            trace=carrier,
        )  # fmt: skip
        body, properties = encode_task(envelope, expiration=False)
        assert properties.headers is not None and properties.headers[H_TRACEPARENT]
        # When an aioqueue worker runs it
        await app.broker.publish(queue_name, body, properties)
        (process,) = await spans_named(exporter, "process ")
    # Then its span continues the Celery producer's trace
    assert parent_of(process) == producer.get_span_context().span_id
    assert process.attributes is not None
    assert process.attributes["aioqueue.task.outcome"] == "succeeded"


async def test_a_plain_function_task_runs_in_the_consumer_span(
    exporter: InMemorySpanExporter, make_app: Callable[..., App]
) -> None:
    # Given a plain (thread) task that makes a span of its own
    app = make_app()
    tracer = trace.get_tracer("tests")

    @app.task(name="otel.sync")
    def sync() -> str:
        with tracer.start_as_current_span("inside the task"):
            return "done"

    async with app, running_worker(app):
        assert await (await sync.submit()).result(timeout=30) == "done"
        (process,) = await spans_named(exporter, "process ")
    # Then the task's span is the consumer span's child (the context reaches the thread)
    (inside,) = named(exporter, "inside the task")
    assert parent_of(inside) == ids(process)[1]


# A malformed trace context of every kind: wrong versions, lengths, cases, all-zero ids,
# non-strings and huge values. None may break a worker.
MALFORMED: list[Any] = [
    "",
    "garbage",
    "00-",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
    "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "\u00e9" * 3,
    "\x00" * 55,
    "-" * 10_000,
    bytearray(b"\xff\xfe"),
    decimal.Decimal("1.5"),
    datetime(2030, 1, 1, tzinfo=UTC),
    12345,
    -1,
    True,
    3.5,
    ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
    {"nested": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
]


def _near_valid(count: int, seed: int = 19) -> list[str]:
    """A valid ``traceparent`` with one to three characters replaced, cut or doubled."""
    valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        chars = list(valid)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(chars))
            action = rng.choice(("replace", "cut", "double"))
            if action == "replace":
                chars[at] = rng.choice("0f-Fg \x00\u00e9")
            elif action == "cut":
                del chars[at]
            else:
                chars.insert(at, chars[at])
        found.append("".join(chars))
    return found


MALFORMED += _near_valid(40)


async def test_malformed_trace_context_never_breaks_a_worker(
    exporter: InMemorySpanExporter, make_app: Callable[..., App], queue_name: str
) -> None:
    # Given a traced worker (started inside a span: a delivery must not become its child)
    app = make_app()
    ran: set[str] = set()

    @app.task(name="otel.record", ignore_result=True)
    async def record() -> None:
        ran.add(task_context().id)

    with trace.get_tracer("tests").start_as_current_span("worker start-up"):
        async with app, running_worker(app):
            # When messages arrive with malformed traceparent and tracestate headers
            sent = set()
            carried: dict[str, Any] = {}
            for i, value in enumerate(MALFORMED):
                envelope = Envelope(id=f"bad-{i}-{uuid.uuid4().hex[:6]}", task="otel.record")
                properties = task_properties(envelope)
                assert properties.headers is not None
                properties.headers[H_TRACEPARENT] = value
                properties.headers[H_TRACESTATE] = MALFORMED[-1 - i]
                await app.broker.publish(queue_name, envelope.encode(), properties)
                sent.add(envelope.id)
                carried[envelope.id] = value
            # Then every one of them runs, each in a consumer span of a trace of its own
            await wait_until(lambda: ran == sent, timeout=60, what="every task run")
            spans = await spans_named(exporter, "process ", len(sent))
    assert all(s.attributes and s.attributes["aioqueue.task.outcome"] == "succeeded" for s in spans)
    # (a changed character may leave a traceparent valid: only such a one may give a parent)
    for span in spans:
        assert span.attributes is not None
        value = carried[str(span.attributes["messaging.message.id"])]
        if span.parent is not None:
            parent = f"00-{span.parent.trace_id:032x}-{span.parent.span_id:016x}-"
            assert isinstance(value, str) and value.startswith(parent)
        assert (span.parent is None) == (extract({H_TRACEPARENT: value}) is None)
    assert sum(span.parent is None for span in spans) > len(MALFORMED) * 3 // 4


def test_extract_survives_any_headers() -> None:
    # Given any AMQP header table a broker may relay (hypothesis, strings and values of any kind)
    from hypothesis import given, settings
    from hypothesis import strategies as st

    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    )
    keys = st.sampled_from(["traceparent", "tracestate", "baggage"]) | st.text(max_size=10)

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(keys, values, max_size=5) | st.none())
    def check(headers: dict[str, Any] | None) -> None:
        # When the trace context is read from it, it is a context or None, never an error
        context = extract(headers)
        assert context is None or trace.get_current_span(context).get_span_context().is_valid

    check()


async def test_the_scheduler_starts_a_root_span_per_fired_slot(
    exporter: InMemorySpanExporter, aioqueue_memory_url: str
) -> None:
    # Given a periodic task, on the in-memory broker and its virtual clock
    clock = use_clock(aioqueue_memory_url, VirtualClock(START))
    assert isinstance(clock, VirtualClock)
    app = App("otel-sched", broker_url=aioqueue_memory_url, default_queue="ticks")

    @app.periodic(name="otel.tick", every=60)
    async def tick() -> None:
        return None

    tracer = trace.get_tracer("tests")
    # When two slots fire, the scheduler running inside a span of someone else's
    with tracer.start_as_current_span("unrelated"):
        async with app, running_worker(app), app.scheduler():
            await clock.advance(120)
            await run_until_idle(app)
            processes = await spans_named(exporter, "process ", 2)
    roots = named(exporter, "schedule ")
    # Then each slot is a root span, and its run is that trace's consumer span
    assert len(roots) == 2 and all(root.parent is None for root in roots)
    assert {(root.kind, root.name) for root in roots} == {(SpanKind.PRODUCER, "schedule otel.tick")}
    slots = {root.attributes["aioqueue.schedule.slot"] for root in roots}  # type: ignore[index]
    assert len(slots) == 2
    assert sorted(parent_of(p) or 0 for p in processes) == sorted(ids(r)[1] for r in roots)


async def test_an_aiohttp_request_that_submits_a_task_is_one_trace(
    exporter: InMemorySpanExporter, make_app: Callable[..., App]
) -> None:
    # Given a web application whose server continues the client's trace (as an HTTP
    # instrumentation does), with an embedded worker
    app = make_app()

    @app.task(name="otel.web.add")
    async def add(x: int, y: int) -> int:
        return x + y

    tracer = trace.get_tracer("tests")

    @web.middleware
    async def server_span(request: web.Request, handler: Any) -> web.StreamResponse:
        parent = propagate.extract(dict(request.headers))
        with tracer.start_as_current_span("GET /add", context=parent, kind=SpanKind.SERVER):
            return await handler(request)

    async def submit_add(request: web.Request) -> web.Response:
        handle = await get_app(request).submit("otel.web.add", 2, 3)
        return web.json_response({"result": await handle.result(timeout=30)})

    web_app = web.Application(middlewares=[server_span])
    setup(web_app, app, worker=True, worker_options={"concurrency": 5})
    web_app.router.add_get("/add", submit_add)

    async with TestClient(TestServer(web_app)) as client:
        # When a client, in a span of its own, calls the endpoint that submits the task
        with tracer.start_as_current_span("client", kind=SpanKind.CLIENT) as span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            response = await client.get("/add", headers=headers)
            assert response.status == 200 and await response.json() == {"result": 5}
        await spans_named(exporter, "process ")
        await spans_named(exporter, "GET /add")

    # Then client, server, submit, run and the wait for the result are one trace
    trace_id = span.get_span_context().trace_id
    by_name = {s.name.split(" ")[0]: s for s in exporter.get_finished_spans()}
    assert {"client", "GET", "publish", "process", "wait"} <= set(by_name)
    assert {ids(by_name[n])[0] for n in ("GET", "publish", "process", "wait")} == {trace_id}
    assert parent_of(by_name["GET"]) == ids(by_name["client"])[1]
    assert parent_of(by_name["publish"]) == ids(by_name["GET"])[1]
    assert parent_of(by_name["process"]) == ids(by_name["publish"])[1]


async def test_without_a_tracer_provider_nothing_is_traced(
    make_app: Callable[..., App], queue_name: str
) -> None:
    # Given the otel packages installed but no tracer provider configured
    _reset_global_provider()
    app = make_app()
    seen: list[dict[str, Any]] = []

    async with app:
        # Then the app does not trace (checked once, at connect)
        assert app.tracing is None
        with trace.get_tracer("tests").start_as_current_span("request"):
            await app.submit_with_options("otel.none", ignore_result=True)

        # and the message carries no trace context
        async def take(delivery: Delivery) -> None:
            seen.append(dict(delivery.properties.headers or {}))
            await settle(delivery, ack=True)

        consumer = await app.broker.subscribe(queue_name, take, prefetch=1)
        await wait_until(lambda: seen, timeout=30, what="the message")
        await consumer.close()
    assert H_TRACEPARENT not in seen[0]


def test_without_the_otel_packages_nothing_breaks() -> None:
    # Given a process in which no opentelemetry module can be imported
    script = textwrap.dedent(
        """
        import asyncio, sys
        from importlib.abc import MetaPathFinder

        class Blocked(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Blocked())
        from aioqueue import App
        from aioqueue.testing import running_worker

        app = App("no-otel", broker_url="memory://no-otel")

        @app.task(name="plain.add")
        async def add(x, y):
            return x + y

        async def main():
            async with app, running_worker(app), app.scheduler():
                assert app.tracing is None
                print(await (await add.submit(2, 3)).result(timeout=30))
            try:
                import aioqueue.otel
            except ImportError:
                print("no otel")
            assert not any(m.startswith("opentelemetry") for m in sys.modules)

        asyncio.run(main())
        """
    )
    # When an app submits and a worker runs a task there
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    # Then it works, untraced
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "no", "otel"]
