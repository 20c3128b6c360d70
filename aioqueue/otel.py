"""OpenTelemetry spans and W3C trace context for aioqueue (the ``otel`` extra).

Imported only by `aioqueue.tracing.detect`, and only used when the user configured a tracer
provider: see `aioqueue.tracing` for where each span starts, and docs/observability.md.

Attribute names follow the OpenTelemetry semantic conventions for messaging spans and their
RabbitMQ page, version 1.44.0 (status "development"): ``messaging.system`` = ``rabbitmq``,
``messaging.operation.type`` (``send`` / ``process``), ``messaging.operation.name``
(``publish`` / ``process``), ``messaging.destination.name`` (the exchange: ``""``, the default
exchange, for a task message), ``messaging.rabbitmq.destination.routing_key`` (the queue),
``messaging.destination.subscription.name`` (the queue a worker consumes),
``messaging.message.id`` and ``messaging.message.conversation_id`` (the task id), and
``messaging.rabbitmq.message.delivery_tag``. What is aioqueue's own is under ``aioqueue.``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from .topology import dlq_name

if TYPE_CHECKING:
    from .broker import Delivery
    from .message import Envelope
    from .worker.events import RunResult, Verdict

__all__ = ["OtelTracing", "SpanObserver", "extract"]

_TRACER = "aioqueue"


class _Headers(Getter[Mapping[str, Any]]):
    """Reads a propagator's fields from AMQP headers: only string values count (a message may
    carry anything under any name; a propagator gets nothing else to parse)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


_GETTER = _Headers()


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context a message's headers carry, or None (none, or unreadable: a malformed
    ``traceparent`` starts a new trace, it never fails the delivery)."""
    if not headers or not isinstance(headers, Mapping):
        return None
    try:
        context = propagate.extract(headers, getter=_GETTER)
    except Exception:  # a propagator's bug on hostile input must not touch the task
        return None
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def _messaging(operation: str, kind: str) -> dict[str, AttributeValue]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": kind,
        "messaging.operation.name": operation,
    }


class OtelTracing:
    """`aioqueue.tracing.Tracing` on the OpenTelemetry API, with the user's tracer provider."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    @classmethod
    def configured(cls) -> OtelTracing | None:
        """Tracing with the global tracer provider, or None if the user set none."""
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        return cls(provider.get_tracer(_TRACER))

    @contextmanager
    def publishing(self, envelope: Envelope, queue: str) -> Iterator[partial[Any]]:
        attributes = _messaging("publish", "send")
        attributes.update(_message(envelope))
        attributes["messaging.destination.name"] = ""  # the default exchange
        attributes["messaging.rabbitmq.destination.routing_key"] = queue
        with self._tracer.start_as_current_span(
            f"publish {queue}", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            yield partial(self._waiting, envelope, span.get_span_context())

    def _waiting(
        self, envelope: Envelope, submitted: trace.SpanContext
    ) -> AbstractContextManager[trace.Span]:
        return self._tracer.start_as_current_span(
            f"wait {envelope.task}",
            kind=SpanKind.INTERNAL,
            links=[Link(submitted)],
            attributes={"aioqueue.task.name": envelope.task, "aioqueue.task.id": envelope.id},
        )

    def stamp(self, envelope: Envelope) -> Envelope:
        if not trace.get_current_span().get_span_context().is_valid:
            return envelope
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return replace(envelope, trace=carrier) if carrier else envelope

    def consuming(self, delivery: Delivery) -> AbstractContextManager[trace.Span]:
        props = delivery.properties
        parent = extract(props.headers)
        attributes = _messaging("process", "process")
        attributes["messaging.destination.subscription.name"] = delivery.queue
        attributes["aioqueue.queue"] = delivery.queue
        attributes["messaging.rabbitmq.message.delivery_tag"] = delivery.delivery_tag
        if isinstance(props.message_id, str) and props.message_id:
            attributes["messaging.message.id"] = props.message_id
        if isinstance(props.correlation_id, str) and props.correlation_id:
            attributes["messaging.message.conversation_id"] = props.correlation_id
        links = [] if parent is None else [Link(trace.get_current_span(parent).get_span_context())]
        return self._tracer.start_as_current_span(
            f"process {delivery.queue}",
            context=Context() if parent is None else parent,  # none in the message: a new trace
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )

    def observer(self) -> SpanObserver:
        return SpanObserver()

    @contextmanager
    def firing(
        self, schedule: str, slot: datetime, envelope: Envelope, queue: str
    ) -> Iterator[Envelope]:
        attributes = _messaging("publish", "send")
        attributes.update(_message(envelope))
        attributes["messaging.destination.name"] = ""
        attributes["messaging.rabbitmq.destination.routing_key"] = queue
        attributes["aioqueue.schedule.name"] = schedule
        attributes["aioqueue.schedule.slot"] = slot.isoformat()
        with self._tracer.start_as_current_span(
            f"schedule {schedule}", context=Context(), kind=SpanKind.PRODUCER, attributes=attributes
        ):
            yield self.stamp(envelope)


def _message(envelope: Envelope) -> dict[str, AttributeValue]:
    return {
        "messaging.message.id": envelope.id,
        "messaging.message.conversation_id": envelope.id,
        "aioqueue.task.name": envelope.task,
        "aioqueue.task.id": envelope.id,
    }


def _span() -> trace.Span | None:
    span = trace.get_current_span()
    return span if span.is_recording() else None


class SpanObserver:
    """A worker observer that writes what became of a delivery onto its consumer span (the
    current span: observers are called in the delivery's own task)."""

    def received(
        self, task: str, task_id: str, attempt: int, queue: str, args: Any, kwargs: Any
    ) -> None:
        span = _span()
        if span is not None:
            span.set_attributes(
                {"aioqueue.task.name": task, "aioqueue.task.id": task_id,
                 "aioqueue.task.attempt": attempt}
            )  # fmt: skip

    def started(self, task: str, task_id: str, attempt: int) -> None:
        return None

    def finished(
        self, task: str, task_id: str, attempt: int, outcome: RunResult, duration: float
    ) -> None:
        return None

    def outcome(
        self, task: str, task_id: str, attempt: int, verdict: Verdict, duration: float, _: Any
    ) -> None:
        span = _span()
        if span is None:
            return
        span.set_attribute("aioqueue.task.outcome", verdict.result)
        if verdict.retry_delay is not None:
            span.add_event(
                "retry",
                {
                    "aioqueue.retry.attempt": attempt + 1,
                    "aioqueue.retry.delay": verdict.retry_delay,
                },
            )
        elif verdict.error is not None:
            error = verdict.error
            span.set_attribute("error.type", error.type_name)
            span.set_status(Status(StatusCode.ERROR, f"{error.type_name}: {error.message}"))

    def dead_lettered(self, queue: str, task: str, task_id: str, reason: str) -> None:
        span = _span()
        if span is None:
            return
        span.add_event(
            "dead_letter",
            {"aioqueue.dead_letter.reason": reason, "aioqueue.dead_letter.queue": dlq_name(queue)},
        )
        # a task that ran and failed says "failed" or "timeout" right after (`outcome`)
        span.set_attribute("aioqueue.task.outcome", "dead_lettered")
        span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason}"))
        if task:
            span.set_attribute("aioqueue.task.name", task)
        if task_id:
            span.set_attribute("aioqueue.task.id", task_id)

    def cancelled(self, task: str, task_id: str, attempt: int) -> None:
        span = _span()
        if span is not None:
            span.add_event("cancelled", {"aioqueue.task.attempt": attempt})
