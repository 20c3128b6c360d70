"""The benchmark's tracer provider (``python -m bench --otel``): spans made and exported.

A real SDK provider with the usual batching processor, exporting to nowhere: the cost
measured is aioqueue's spans and trace-context headers plus the SDK's own work, without a
collector's network traffic.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class _Discard(SpanExporter):
    """Takes every batch and keeps nothing."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def configure_tracing() -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    trace.set_tracer_provider(provider)
