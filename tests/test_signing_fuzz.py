"""The fuzz corpus (tests/fuzz_messages.py) thrown at a signing worker (issue 19).

Each random message — valid, or broken in one known way — is also signed properly, left
unsigned, forged (signed, then its body changed), signed with a key the worker does not have,
or (a valid one) signed and published twice. All are published raw, below aioqueue's client.
Then every message is accounted for:

- a properly signed valid message runs exactly once with its payload (a replay's second copy
  is dead-lettered, reason ``signature``);
- a properly signed broken message is dead-lettered once with the reason its breakage implies,
  or ``signature`` when the breakage itself touches what the signature covers (e.g. a header
  value that does not survive the trip through RabbitMQ unchanged);
- any other message is dead-lettered once with the reason ``signature`` and never runs;
- the worker is still alive and a normal submit still returns its result.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from aioqueue import SigningKeys
from aioqueue.message.signing import sign
from tests.conftest import wait_until
from tests.fuzz_messages import KINDS, TASK, Built, Spec, build, raw_publish, specs
from tests.rabbit import RabbitNode
from tests.test_fuzz import Env, dlq_depth, drain_dlq, fuzz_env

KEYS = {"k2": b"2" * 32, "k1": b"1" * 32}
MODES = ["signed", "signed", "signed", "unsigned", "forged", "unknown_key", "replayed"]
BATCH = 10  # messages per example


@pytest.fixture
async def env(rabbit: RabbitNode) -> AsyncIterator[Env]:
    async with fuzz_env(
        rabbit, "sigfuzz", settings={"signature_window": 300.0}, signing_keys=KEYS
    ) as env:
        yield env


def _apply(mode: str, message: Built) -> Built:
    """``message`` signed (or not) as ``mode`` says; the message id stays as built."""
    message_id = message.properties.message_id
    keys = {
        "signed": SigningKeys(KEYS),
        "replayed": SigningKeys(KEYS),
        "forged": SigningKeys(KEYS),
        "unknown_key": SigningKeys({"k9": b"9" * 32}),
    }.get(mode)
    if keys is not None:
        sign(message.properties, message.body, keys, due_at=time.time())
        message.properties.message_id = message_id  # (sign gives one to a message without)
    if mode == "forged":
        message.body = message.body + b" "
    return message


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(st.tuples(specs(), st.sampled_from(MODES)), min_size=BATCH, max_size=BATCH))
@pytest.mark.timeout(600)
async def test_a_signing_worker_accounts_for_every_random_message(
    env: Env, batch: list[tuple[Spec, str]]
) -> None:
    # Given random messages, each signed, unsigned, forged, foreign-keyed or replayed
    tag = uuid.uuid4().hex[:6]
    messages: list[tuple[Built, str]] = []
    for i, (spec_, mode) in enumerate(batch):
        if mode == "replayed" and spec_.kind != "valid":
            mode = "signed"
        messages.append((_apply(mode, build(spec_, f"{tag}-{i}")), mode))
    runs_expected = {m.fid: m for m, mode in messages if m.kind == "valid" and _good(mode)}
    dead_expected = Counter(
        m.fid
        for m, mode in messages
        if mode == "replayed" or not (m.kind == "valid" and _good(mode))
    )
    env.calls.clear()
    # When they are published raw (a replayed one once, and again after it ran)
    for message, _ in messages:
        await env.raw.write_queue.put(raw_publish(env.raw, env.queue, message))
    await wait_until(lambda: len(env.calls) >= len(runs_expected), timeout=60, what="the runs")
    for message, mode in messages:
        if mode == "replayed":
            await env.raw.write_queue.put(raw_publish(env.raw, env.queue, message))
    await wait_until(
        lambda: _settled(env, sum(dead_expected.values())),
        timeout=60,
        what=f"{len(runs_expected)} runs and {sum(dead_expected.values())} dead letters",
    )
    # Then exactly the properly signed valid ones ran, once each, with their payload
    assert Counter(key for key, _ in env.calls) == Counter(list(runs_expected))
    for key, payload in env.calls:
        assert payload == runs_expected[key].payload
    # and every other message (and every replay) is in the DLQ once, with a fitting reason
    dead = await drain_dlq(env)  # type: ignore[arg-type]
    assert Counter(fid for fid, _ in dead) == dead_expected
    kinds = {m.fid: (m.kind, mode) for m, mode in messages}
    for fid, reason in dead:
        kind, mode = kinds[fid]
        allowed = (
            {"signature"} if not _good(mode) or kind == "valid" else {"signature", KINDS[kind]}
        )
        assert reason in allowed, (kind, mode, reason)
    # and the worker lives on and still serves normal (signed) submits
    assert not env.worker._stop.is_set()
    handle = await env.app.submit(TASK, "probe", None)
    assert await handle.result(timeout=30) == "probe"


def _good(mode: str) -> bool:
    return mode in ("signed", "replayed")


async def _settled(env: Env, dead: int) -> bool:
    if await dlq_depth(env) < dead:  # type: ignore[arg-type]
        return False
    ok = await env.raw.queue_declare(env.queue, passive=True)
    return not ok.message_count and env.worker.statistics().in_hand == 0
