"""Random bodies, headers and properties thrown at a worker (hypothesis).

The messages (tests/fuzz_messages.py) are valid task messages with random extra headers and
properties, or broken in one known way each. They are published raw — below aio-pika and
aiormq, which would add a ``message_id`` — to a queue that an in-process worker consumes. Then:

- a task runs exactly once for each valid message, with exactly the payload sent, and never
  for a broken one;
- every broken message is in ``Q.dlq`` exactly once, with the reason its breakage implies;
- the worker is still alive and a normal submit still returns its result.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec

from aioqueue import App, Settings
from aioqueue.topology import dlq_name
from aioqueue.worker import Worker
from tests.conftest import running_worker, wait_until
from tests.fuzz_messages import KINDS, MAX_SIZE, TASK, Built, Spec, build, raw_publish, specs
from tests.rabbit import RabbitNode

BATCH = 10  # messages per example; 20 examples

# -- the test -----------------------------------------------------------------------------


@dataclass
class Env:
    app: App
    worker: Worker
    raw: aiormq.Channel
    queue: str
    calls: list[tuple[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def fuzz_env(rabbit: RabbitNode, prefix: str, **app_options: Any) -> AsyncIterator[Env]:
    """A worker of ``TASK`` (recording its calls) on its own queue ``<prefix>.<hex>``, and a
    raw aiormq channel to publish below the client; ``app_options`` go to the `App`."""
    queue = f"{prefix}.{uuid.uuid4().hex[:8]}"
    settings = Settings(max_message_size=MAX_SIZE, **app_options.pop("settings", {}))
    app = App(prefix, broker_url=rabbit.url, default_queue=queue, settings=settings, **app_options)
    calls: list[tuple[str, Any]] = []

    @app.task(name=TASK)
    async def record(key: str, payload: Any = None) -> str:
        calls.append((key, payload))
        return key

    async with app, running_worker(app) as worker, await aio_pika.connect(rabbit.url) as conn:
        channel = await conn.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        yield Env(app, worker, raw, queue, calls)


@pytest.fixture
async def env(rabbit: RabbitNode) -> AsyncIterator[Env]:
    async with fuzz_env(rabbit, "fuzz") as env:
        yield env


async def drain_dlq(env: Env) -> list[tuple[str, str]]:
    """(fuzz id, dead reason) of every message in the DLQ, which is left empty."""
    found: list[tuple[str, str]] = []
    while True:
        message = await env.raw.basic_get(dlq_name(env.queue), no_ack=True)
        if message.body is None or not isinstance(message.delivery, spec.Basic.GetOk):
            return found
        hdrs = message.header.properties.headers or {}
        found.append((str(hdrs.get("fuzz-id")), str(hdrs.get("aioqueue-dead-reason"))))


async def dlq_depth(env: Env) -> int:
    ok = await env.raw.queue_declare(dlq_name(env.queue), passive=True)
    return ok.message_count or 0


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
    ],
)
@given(batch=st.lists(specs(), min_size=BATCH, max_size=BATCH))
@pytest.mark.timeout(600)
async def test_random_messages_never_run_what_they_should_not_and_never_kill_the_worker(
    env: Env, batch: list[Spec]
) -> None:
    # Given a batch of messages, valid or broken in known ways
    tag = uuid.uuid4().hex[:6]
    messages = [build(s, f"{tag}-{i}") for i, s in enumerate(batch)]
    valid = {m.fid: m for m in messages if m.kind == "valid"}
    broken = {m.fid: m for m in messages if m.kind != "valid"}
    env.calls.clear()
    # When they are published raw to the worker's queue
    for message in messages:
        await env.raw.write_queue.put(raw_publish(env.raw, env.queue, message))
    await wait_until(
        lambda: _settled(env, len(valid), len(broken)),
        timeout=30,
        what=f"{len(valid)} runs and {len(broken)} dead letters",
    )
    # Then exactly the valid ones ran, once each, with their payload
    runs = Counter(key for key, _ in env.calls)
    assert runs == Counter(list(valid)), _explain(runs, messages)
    for key, payload in env.calls:
        assert payload == valid[key].payload
    # and every broken one is in the DLQ once, with the reason its breakage implies
    dead = await drain_dlq(env)
    assert Counter(fid for fid, _ in dead) == Counter(list(broken)), _explain(
        Counter(dead), messages
    )
    for fid, reason in dead:
        assert reason == KINDS[broken[fid].kind], (broken[fid].kind, reason)
    # and the worker lives on and still serves normal submits
    assert not env.worker._stop.is_set()
    handle = await env.app.submit(TASK, "probe", None)
    assert await handle.result(timeout=30) == "probe"


async def _settled(env: Env, runs: int, dead: int) -> bool:
    if len(env.calls) < runs or await dlq_depth(env) < dead:
        return False
    ok = await env.raw.queue_declare(env.queue, passive=True)
    return not ok.message_count and env.worker.statistics().in_hand == 0


def _explain(counts: Counter[Any], messages: list[Built]) -> str:
    kinds = {m.fid: m.kind for m in messages}
    return "\n".join(f"{k}: {kinds.get(str(k))} x{n}" for k, n in counts.items())


async def test_a_double_header_pamqp_cannot_write_back_still_reaches_the_dlq(env: Env) -> None:
    # Given a malformed message from a client that writes 64-bit floats (too big for 32 bits)
    spec_ = Spec("body_not_json", None, False, {"h-big": 1e300, "h-n": [2.5e-300]}, {}, {})
    message = build(spec_, f"{uuid.uuid4().hex[:6]}-double")
    message.body = b"not json"
    # When the worker dead-letters it (a copy with the same headers)
    await env.raw.write_queue.put(raw_publish(env.raw, env.queue, message))
    await wait_until(lambda: _settled(env, 0, 1), timeout=30, what="the dead letter")
    # Then it is in the DLQ once (the unwritable values as text), and nothing ran
    assert await drain_dlq(env) == [(message.fid, "decode")]
    assert env.calls == []
