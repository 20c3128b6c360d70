"""The tracing seam: what the rest of aioqueue asks of OpenTelemetry, and nothing more.

`detect` is called once per connection (`App.connect`, the scheduler's start): it returns a
`Tracing` only when the ``otel`` extra is installed *and* the user configured a tracer
provider (``opentelemetry.trace.set_tracer_provider``); otherwise None, and every call site
is a single ``is None`` test — no import of OpenTelemetry, no span, no header. The
implementation lives in `aioqueue.otel` (imported here, lazily, and nowhere else).

Call sites, each one line or a ``with`` block:

- `aioqueue.producer`: a submit runs in `Tracing.publishing` (a PRODUCER span) and every task
  message published (submits, retries, the worker's ETA waits) is stamped with the current
  trace context (`Tracing.stamp`: W3C ``traceparent``/``tracestate`` in its headers);
- `aioqueue.worker.lifecycle`: each delivery runs in `Tracing.consuming` (a CONSUMER span,
  parent taken from the message) and `Tracing.observer` puts the task's name, id, attempt and
  outcome on it, retries and dead letters as span events;
- `aioqueue.results`: `ResultHandle.result` waits in a span linked to the submit's;
- `aioqueue.scheduler`: each fired slot is a root span (`Tracing.firing`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .broker import Delivery
    from .message import Envelope

__all__ = ["Tracing", "WaitSpan", "detect"]

# A handle's way to wait inside a span linked to its submit's (None without tracing)
WaitSpan = Callable[[], AbstractContextManager[Any]]


class Tracing(Protocol):
    """Spans and context propagation for one connection (`aioqueue.otel.OtelTracing`)."""

    def publishing(self, envelope: Envelope, queue: str) -> AbstractContextManager[WaitSpan]:
        """A PRODUCER span around one submit; gives the handle's `WaitSpan`."""
        ...

    def stamp(self, envelope: Envelope) -> Envelope:
        """``envelope`` carrying the current trace context (unchanged outside any span)."""
        ...

    def consuming(self, delivery: Delivery) -> AbstractContextManager[Any]:
        """A CONSUMER span around one delivery, continuing the trace its headers carry."""
        ...

    def observer(self) -> Any:
        """A worker observer (`aioqueue.worker.events`) that annotates the consumer span."""
        ...

    def firing(
        self, schedule: str, slot: datetime, envelope: Envelope, queue: str
    ) -> AbstractContextManager[Envelope]:
        """A root span for one fired slot; gives ``envelope`` stamped with it."""
        ...


def detect() -> Tracing | None:
    """A `Tracing` if the ``otel`` extra is installed and a tracer provider is configured."""
    try:
        from .otel import OtelTracing
    except ImportError:  # the extra is not installed: tracing off, for nothing
        return None
    return OtelTracing.configured()
