"""The message room: aioqueue's wire format, and nothing else.

- `codec`: the task message (`Envelope`), the reply (`Outcome`), their strict JSON codec;
- `headers`: every header name (no other module spells an ``aioqueue-`` header);
- `properties`: the AMQP properties of every message we publish (task, reply, progress and
  stream events, the dead-letter copy).

docs/protocol.md describes the same for producers and consumers written in other languages.
"""

from .codec import (
    MAX_DEPTH,
    Envelope,
    ErrorInfo,
    Outcome,
    check_json_native,
    dumps,
    loads,
    new_id,
    refuse_unreadable,
)
from .headers import (
    CONTENT_TYPE,
    DEAD_PREFIX,
    H_ATTEMPT,
    H_DEAD_AT,
    H_DEAD_ERROR,
    H_DEAD_QUEUE,
    H_DEAD_REASON,
    H_DEAD_TRACEBACK,
    H_DEAD_WORKER,
    H_DEADLINE,
    H_DELIVERIES,
    H_EVENT,
    H_PACED,
    H_PROTOCOL,
    H_RATE_QUEUE,
    H_SCHEDULED_AT,
    H_SEQ,
    H_STREAM_TO,
    H_TASK,
    H_UNDECODABLE,
    PROTOCOL_VERSION,
)
from .properties import (
    TaskProperties,
    dead_letter_copy,
    encodable_headers,
    event_properties,
    replay_copy,
    reply_properties,
    task_properties,
)

__all__ = [
    "CONTENT_TYPE",
    "DEAD_PREFIX",
    "H_ATTEMPT",
    "H_DEADLINE",
    "H_DEAD_AT",
    "H_DEAD_ERROR",
    "H_DEAD_QUEUE",
    "H_DEAD_REASON",
    "H_DEAD_TRACEBACK",
    "H_DEAD_WORKER",
    "H_DELIVERIES",
    "H_EVENT",
    "H_PACED",
    "H_PROTOCOL",
    "H_RATE_QUEUE",
    "H_SCHEDULED_AT",
    "H_SEQ",
    "H_STREAM_TO",
    "H_TASK",
    "H_UNDECODABLE",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "Envelope",
    "ErrorInfo",
    "Outcome",
    "TaskProperties",
    "check_json_native",
    "dead_letter_copy",
    "dumps",
    "encodable_headers",
    "event_properties",
    "loads",
    "new_id",
    "refuse_unreadable",
    "replay_copy",
    "reply_properties",
    "task_properties",
]
