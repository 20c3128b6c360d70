"""Workflows (chain, group, chord) on RabbitMQ and on the in-memory broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioqueue import App, DecodeError, EncodeError, RetryPolicy, TaskError, chain, chord, group
from aioqueue.errors import TaskCancelledError
from aioqueue.message import (
    H_DEAD_ERROR,
    H_DEAD_REASON,
    H_PROTOCOL,
    H_TASK,
    Envelope,
    dumps,
    task_properties,
)
from aioqueue.topology import dlq_name
from tests.conftest import running_worker, wait_until


def tasks(app: App) -> dict[str, Any]:
    @app.task(name="wf.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="wf.mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="wf.total")
    async def total(values: list[int]) -> int:
        return sum(values)

    @app.task(name="wf.fail", retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=False))
    async def fail(x: int) -> int:
        raise ValueError(f"no {x}")

    return {"add": add, "mul": mul, "total": total, "fail": fail}


async def test_the_issue_examples(make_any_app: Callable[..., App]) -> None:
    # Given a worker with add, mul and total
    app = make_any_app()
    t = tasks(app)
    add, mul, total = t["add"], t["mul"], t["total"]
    async with app, running_worker(app):
        # When the issue's three workflows are submitted, Then each gives the issue's value
        h = await chain(add.s(1, 2), add.s(10), mul.s(3)).submit()
        assert await h.result(timeout=30) == 39
        h = await group(add.s(i, i) for i in range(10)).submit()
        assert await h.result(timeout=30) == [2 * i for i in range(10)]
        h = await chord((add.s(i, i) for i in range(10)), total.s()).submit()
        assert await h.result(timeout=30) == 90


async def test_a_failed_member_fails_the_chord_and_the_callback_does_not_run(
    make_any_app: Callable[..., App],
) -> None:
    app = make_any_app()
    t = tasks(app)
    ran: list[Any] = []

    @app.task(name="wf.record")
    async def record(values: list[int]) -> int:
        ran.append(values)
        return 0

    async with app, running_worker(app):
        members = [t["add"].s(1, 1), t["fail"].s(7), t["add"].s(2, 2)]
        h = await chord(members, record.s()).submit()
        with pytest.raises(TaskError) as caught:
            await h.result(timeout=30)
        assert caught.value.type_name == "ValueError" and "no 7" in caught.value.message
        assert caught.value.task_name == "wf.fail" and caught.value.task_id == h.id
        # a failed chain step fails the chain with its error too
        h = await chain(t["add"].s(1, 1), t["fail"].s()).submit()
        with pytest.raises(TaskError, match="no 2"):
            await h.result(timeout=30)
    assert ran == []


async def test_wrong_steps_publish_nothing(
    make_any_app: Callable[..., App], queue_name: str
) -> None:
    app = make_any_app()
    t = tasks(app)
    add, total = t["add"], t["total"]
    async with app:
        with pytest.raises(TypeError, match=r"wf\.add"):
            await chain(add.s(1, 2), add.s(1, 2)).submit()  # no room for the previous result
        with pytest.raises(TypeError):
            await group(add.s(1, 1), add.s(1)).submit()
        with pytest.raises(EncodeError):
            await chord([add.s(1, 1), add.s(object(), 1)], total.s()).submit()
        with pytest.raises(TypeError, match="nested workflows are not supported"):
            chain(add.s(1, 2), group(add.s(1, 1)))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="nested workflows are not supported"):
            group(group(add.s(1, 2)))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="nested workflows are not supported"):
            chord([add.s(1, 1)], chain(add.s(1, 2)))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"wf\.add"):  # a member chain's step without room
            await group(chain(add.s(1, 2), add.s(1, 2))).submit()
        with pytest.raises(ValueError):
            group([])
        # Then nothing was published: the work queue is empty (or was never declared)
        async with app.broker.hold(queue_name, 0) as queue:
            assert queue is None or queue.ready == 0


async def test_chains_inside_a_group_and_a_chord(make_any_app: Callable[..., App]) -> None:
    # Given members that are chains (add, then mul) beside a plain member
    app = make_any_app()
    t = tasks(app)
    add, mul, total = t["add"], t["mul"], t["total"]
    async with app, running_worker(app):
        members = [chain(add.s(i, i), mul.s(10)) for i in range(4)]
        # Then each member's result is its chain's last result, in order
        h = await group(*members, add.s(100, 0)).submit()
        assert await h.result(timeout=30) == [0, 20, 40, 60, 100]
        h = await chord(members, total.s()).submit()
        assert await h.result(timeout=30) == 120
        h = await group(chain(add.s(1, 1))).submit()  # one member, a chain of one step
        assert await h.result(timeout=30) == [2]
        # and a member chain that fails fails the group with its step's error
        h = await group(chain(add.s(1, 1), t["fail"].s()), add.s(1, 1)).submit()
        with pytest.raises(TaskError, match="no 2"):
            await h.result(timeout=30)


async def test_cancel_stops_a_running_step_and_the_rest(make_any_app: Callable[..., App]) -> None:
    app = make_any_app()
    t = tasks(app)
    started = asyncio.Event()
    after: list[int] = []

    @app.task(name="wf.hang")
    async def hang(x: int) -> int:
        started.set()
        await asyncio.Event().wait()  # until cancelled
        return x

    @app.task(name="wf.after")
    async def after_step(x: int) -> int:
        after.append(x)
        return x

    async with app, running_worker(app):
        # Given a group whose chain member's first step is running
        h = await group(chain(hang.s(1), after_step.s()), t["add"].s(1, 1)).submit()
        await asyncio.wait_for(started.wait(), 30)
        # When the workflow is cancelled, Then the running step stops and the rest never runs
        await h.cancel()
        with pytest.raises(TaskCancelledError):
            await h.result(timeout=30)
    assert after == []


async def test_cancel_stops_the_steps_not_started(make_any_app: Callable[..., App]) -> None:
    app = make_any_app()
    t = tasks(app)
    add = t["add"]
    async with app:
        h = await chain(add.s(1, 2), add.s(3)).submit()
        await h.cancel()
        async with running_worker(app):
            with pytest.raises(TaskCancelledError):
                await h.result(timeout=30)


FORGED: list[Any] = [
    "not an object",
    {"id": "../../x", "kind": "callback"},
    {"id": "a" * 65, "kind": "callback"},
    {"id": "w1", "kind": "teleport"},
    {"id": "w1", "kind": "callback", "extra": 1},
    {"id": "w1", "kind": "member", "index": 3, "size": 3, "callback": None},
    {"id": "w1", "kind": "member", "index": 0, "size": 0, "callback": None},
    {"id": "w1", "kind": "member", "index": 0, "size": 10**9, "callback": None},
    {"id": "w1", "kind": "member", "index": True, "size": 2, "callback": None},
    {"id": "w1", "kind": "member", "index": 0, "size": 2, "callback": {"task": "x"}},
    {"id": "w1", "kind": "chain", "step": 0, "then": "everything"},
    {"id": "w1", "kind": "chain", "step": -1, "then": []},
    {"id": "w1", "kind": "chain", "step": 0, "then": [
        {"task": "wf.add", "args": [], "kwargs": {}, "queue": "amq.rabbitmq.reply-to"}
    ]},
    {"id": "w1", "kind": "chain", "step": 0, "then": [
        {"task": "", "args": [], "kwargs": {}, "queue": "q"}
    ]},
    {"id": "w1", "kind": "chain", "step": 0, "then": [[1, 2, 3]]},
]  # fmt: skip


async def test_a_forged_workflow_is_dead_lettered_with_its_reason(
    make_any_app: Callable[..., App], queue_name: str
) -> None:
    # Given a worker, and task messages whose "workflow" object is forged
    app = make_any_app()
    t = tasks(app)
    async with app, running_worker(app):
        for n, forged in enumerate(FORGED):
            envelope = Envelope(id=f"forged-{n}", task="wf.add")
            body = dumps({"args": [1, 2], "kwargs": {}, "workflow": forged})
            await app.broker.publish(queue_name, body, task_properties(envelope))

        # Then each is dead-lettered with the reason "decode" and what was wrong
        async def dead() -> list[Any]:
            async with app.broker.hold(dlq_name(queue_name), 0) as queue:
                return [] if queue is None or queue.ready < len(FORGED) else [queue.ready]

        await wait_until(dead, what="every forged message dead-lettered")
        async with app.broker.hold(dlq_name(queue_name), len(FORGED)) as queue:
            assert queue is not None
            for message in queue.messages:
                headers = message.properties.headers or {}
                assert headers[H_DEAD_REASON] == "decode"
                assert "workflow" in headers[H_DEAD_ERROR]
        # and the worker still runs workflows
        h = await chain(t["add"].s(1, 2), t["add"].s(3)).submit()
        assert await h.result(timeout=30) == 6


async def test_hold_counts_holds_and_gives_back(make_any_app: Callable[..., App]) -> None:
    from aioqueue.message.workflow import token_properties
    from aioqueue.topology import chord_queue_arguments

    app = make_any_app()
    async with app:
        broker = app.broker
        name = f"aioqueue.chord.hold{uuid.uuid4().hex[:8]}"
        # a queue that does not exist: None, for a count and for a hold
        async with broker.hold(name, 0) as missing:
            assert missing is None
        async with broker.hold(name, 5) as missing:
            assert missing is None
        await broker.declare_queue(name, chord_queue_arguments())
        for _ in range(3):
            await broker.publish(name, b"{}", token_properties("w"))
        async with broker.hold(name, 0) as counted:
            assert counted is not None and counted.ready == 3 and not counted.messages
        # Given two of three held, one acked: Then the other goes back
        async with broker.hold(name, 2) as held:
            assert held is not None and len(held.messages) == 2
            await held.messages[0].ack()
        await wait_until(lambda: _ready(app, name), what="the held message back")
        async with broker.hold(name, 0) as counted:
            assert counted is not None and counted.ready == 2
        await broker.delete_queue(name)
        async with broker.hold(name, 0) as gone:
            assert gone is None


async def _ready(app: App, name: str) -> bool:
    async with app.broker.hold(name, 0) as counted:
        return counted is not None and counted.ready == 2


async def test_replaying_a_failed_member_completes_the_chord(
    make_app: Callable[..., App], queue_name: str
) -> None:
    from aioqueue.cli.dlq import rabbit_of, replay_message
    from aioqueue.rabbit.admin import held_messages

    app = make_app()
    t = tasks(app)
    fixed: list[bool] = []
    ran: list[list[int]] = []

    @app.task(name="wf.flaky")
    async def flaky(x: int) -> int:
        if not fixed:
            raise RuntimeError("not yet")
        return x

    @app.task(name="wf.record")
    async def record(values: list[int]) -> int:
        ran.append(values)
        return sum(values)

    async with app, running_worker(app):
        # Given a chord whose member 1 failed: the caller got the failure
        h = await chord([t["add"].s(1, 1), flaky.s(5)], record.s()).submit()
        with pytest.raises(TaskError, match="not yet"):
            await h.result(timeout=30)
        # When the member is fixed and replayed from the dead-letter queue
        fixed.append(True)
        async with held_messages(rabbit_of(app), dlq_name(queue_name), 10) as held:
            assert held is not None and len(held) == 1
            await replay_message(rabbit_of(app), held[0], queue_name)
        # Then the join fires and the callback runs, once
        await wait_until(lambda: ran, what="the callback")
    assert ran == [[2, 5]]


async def test_a_group_of_ten_thousand_on_the_memory_broker(queue_name: str) -> None:
    app = App("tests", broker_url=f"memory://{queue_name}", default_queue=queue_name)
    add = tasks(app)["add"]
    async with app, running_worker(app):
        h = await group(add.s(i, i) for i in range(10_000)).submit()
        assert await h.result(timeout=120) == [2 * i for i in range(10_000)]


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(["id", "kind", "step", "then", "index", "size", "callback", "x"])
_workflowish = st.dictionaries(
    _keys, _json | st.sampled_from(["chain", "member", "callback", "w1"])
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, _workflowish))
def test_any_workflow_object_decodes_or_is_a_decode_error(value: Any) -> None:
    # Given any JSON value as a message's "workflow" object
    body = dumps({"args": [], "kwargs": {}, "workflow": value})
    try:
        envelope = Envelope.decode(
            body,
            message_id="m",
            headers={H_TASK: "t", H_PROTOCOL: 1},
            max_size=1 << 20,
        )
    except DecodeError:
        return  # Then it is refused with a DecodeError (dead-lettered by a worker) ...
    # ... or it is a well-formed workflow that encodes back to the same object
    assert envelope.workflow is not None
    assert orjson.loads(envelope.encode())["workflow"] == envelope.workflow.to_json()


async def test_with_signing_a_forged_result_does_not_count(
    make_any_app: Callable[..., App],
) -> None:
    from aioqueue.message.workflow import result_properties
    from aioqueue.topology import chord_queue_names

    # Given an app that signs its messages, and a chord submitted before any worker runs
    app = make_any_app(signing_keys={"k1": b"s" * 32})
    t = tasks(app)
    async with app:
        h = await chord([t["add"].s(i, i) for i in range(4)], t["total"].s()).submit()
        # When someone publishes an unsigned result for member 0 into the chord's queue
        forged = dumps({"index": 0, "value": 1000})
        results = chord_queue_names(h.id)[0]
        await app.broker.publish(results, forged, result_properties(h.id, 0))
        # Then the workers' join drops it: the callback gets the real results
        async with running_worker(app):
            assert await h.result(timeout=30) == 12
