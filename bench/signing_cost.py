"""CPU per message of signed messages: ``python -m bench.signing_cost``.

In one process, without a broker: a task message built and its properties encoded as the
publish side does (`task_message`, pamqp's frame), then decoded and verified as the consume
side does, unsigned and signed; the best of 7 repeats of 2,000 each, in microseconds. A round
trip pays each side twice (the task message and its reply). ``python -m bench --signing``
measures the same end to end, against RabbitMQ, which a busy machine makes noisy.
"""

from __future__ import annotations

import time
import timeit
import uuid

from pamqp import frame
from pamqp.header import ContentHeader

from aioqueue import SigningKeys
from aioqueue.message import Envelope
from aioqueue.message.properties import task_message
from aioqueue.message.signing import verify

KEYS = SigningKeys({"bench2": b"b2" * 16, "bench1": b"b1" * 16})
ENVELOPE = Envelope(id=uuid.uuid4().hex, task="bench.noop", args=(1,), reply_to="aioqueue.reply.x")


def _publish(keys: SigningKeys | None) -> tuple[bytes, bytes]:
    body, properties = task_message(ENVELOPE, keys, due_at=time.time())
    return frame.marshal(ContentHeader(properties=properties, body_size=len(body)), 1), body


def _consume(raw: bytes, body: bytes, keys: SigningKeys | None) -> None:
    properties = frame.unmarshal(raw)[2].properties
    if keys is not None:
        verify(properties, body, keys)


def main() -> None:
    for keys, label in ((None, "unsigned"), (KEYS, "signed")):
        raw, body = _publish(keys)
        for side, call in (
            ("publish", lambda k=keys: _publish(k)),
            ("consume", lambda r=raw, b=body, k=keys: _consume(r, b, k)),
        ):
            best = min(timeit.repeat(call, number=2000, repeat=7)) / 2000 * 1e6
            print(f"{side} side, {label}: {best:6.1f} µs per message")


if __name__ == "__main__":
    main()
