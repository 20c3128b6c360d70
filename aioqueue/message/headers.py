"""Every header name and constant of aioqueue's wire format, in one place.

Header timestamps (``aioqueue-deadline``, ``aioqueue-scheduled-at``) are integer Unix
milliseconds: AMQP tables carry floats only as 32-bit, far too coarse for a time.
``aioqueue-dead-at`` is the one exception, an ISO-8601 string for people reading a dead letter.
docs/protocol.md describes each for producers and consumers in other languages.
"""

from __future__ import annotations

from typing import Final

PROTOCOL_VERSION: Final = 1
CONTENT_TYPE: Final = "application/json"

# -- a task message
H_TASK: Final = "aioqueue-task"
H_ATTEMPT: Final = "aioqueue-attempt"
H_PROTOCOL: Final = "aioqueue-protocol"
H_DEADLINE: Final = "aioqueue-deadline"
H_SCHEDULED_AT: Final = "aioqueue-scheduled-at"
H_STREAM_TO: Final = "aioqueue-stream-to"
H_EVENT: Final = "aioqueue-event"
H_SEQ: Final = "aioqueue-seq"

# -- a batch of task events on the stream ``aioqueue.events``: how many events its body holds
H_EVENTS: Final = "aioqueue-events"
# Set by the RabbitMQ frame reader on a delivery whose properties or headers could not be read
# (not UTF-8, a timestamp out of range, ...): a table of property name -> the raw bytes. Such a
# message is never run; consumers treat it as unreadable (the worker dead-letters it).
H_UNDECODABLE: Final = "aioqueue-undecodable"

# -- a signed message (``App(signing_keys=...)``, message/signing.py, docs/security.md): the
# key id, when the message is due (integer Unix ms; freshness counts from it), and the
# HMAC-SHA256 (hex) over the body, the properties and the headers listed in signing.py
H_KEY_ID: Final = "aioqueue-key-id"
H_DUE_AT: Final = "aioqueue-due-at"
H_SIGNATURE: Final = "aioqueue-signature"

# -- a dead letter (the copy in ``Q.dlq``): why, when, where from, by whom
H_DEAD_REASON: Final = "aioqueue-dead-reason"
H_DEAD_ERROR: Final = "aioqueue-dead-error"
H_DEAD_AT: Final = "aioqueue-dead-at"
H_DEAD_WORKER: Final = "aioqueue-dead-worker"
H_DEAD_QUEUE: Final = "aioqueue-dead-queue"
H_DEAD_TRACEBACK: Final = "aioqueue-dead-traceback"
DEAD_PREFIX: Final = "aioqueue-dead-"
# how many deliveries of a message on a classic queue killed a worker (poison detection)
H_DELIVERIES: Final = "aioqueue-deliveries"

# -- a rate-limited task (aioqueue.ratelimit): the work queue a message in a holding queue goes
# back to, and the mark the pacer puts on it when its turn came (a worker runs it then)
H_RATE_QUEUE: Final = "aioqueue-rate-queue"
H_PACED: Final = "aioqueue-paced"

# -- trace context, with the ``otel`` extra and a tracer provider (docs/observability.md): W3C
# Trace Context, written and read by OpenTelemetry's propagator (its configured one: the default
# also writes ``baggage``). Optional on every task message; a consumer that does not trace, or
# cannot read them, ignores them (a malformed one starts a new trace).
H_TRACEPARENT: Final = "traceparent"
H_TRACESTATE: Final = "tracestate"
