"""A worker app that traces: ``python -m aioqueue.worker tests.apps.traced:app``.

It configures its tracer provider when imported, as the docs tell users to, before the worker
connects; each finished span goes as one JSON line to ``$AIOQUEUE_TEST_DIR/spans.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from aioqueue import App

SPANS = Path(os.environ.get("AIOQUEUE_TEST_DIR", ".")) / "spans.jsonl"


class _Lines(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with SPANS.open("a") as out:
            for span in spans:
                assert span.context is not None
                record = {
                    "name": span.name,
                    "trace_id": span.context.trace_id,
                    "span_id": span.context.span_id,
                    "parent_id": span.parent.span_id if span.parent else None,
                    "attributes": dict(span.attributes or {}),
                }
                out.write(json.dumps(record) + "\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(_Lines()))
trace.set_tracer_provider(provider)

app = App("tests", default_queue=os.environ.get("AIOQUEUE_TEST_QUEUE", "default"))


@app.task(name="tests.traced.add")
async def add(x: int, y: int) -> int:
    return x + y
