"""Workflows on RabbitMQ alone: `chain`, `group` and `chord` of task signatures.

```python
h = await chain(add.s(1, 2), add.s(10), mul.s(3)).submit()    # 39
h = await group(add.s(i, i) for i in range(10)).submit()      # [0, 2, ..., 18]
h = await chord((add.s(i, i) for i in range(10)), total.s()).submit()   # 90
```
Every step is checked (signature, JSON) before anything is published. What the workflow still
has to do travels in its messages (`aioqueue.message.workflow`) and a group's or chord's
results wait in queues of its own (`aioqueue.topology.chord_queue_names`); workers move it on
(`aioqueue.worker.workflow`). The caller's handle gets the final outcome pushed, like any task's.
docs/workflows.md explains what each guarantees.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import AioqueueError, EncodeError
from .message import Envelope, check_json_native
from .message.workflow import MAX_MEMBERS, Step, Workflow, token_properties
from .results import ResultHandle
from .signature import Signature
from .topology import chord_queue_arguments, chord_queue_names

if TYPE_CHECKING:
    from .app import App

__all__ = ["Signature", "chain", "chord", "group"]

PUBLISH_BATCH = 256  # member messages awaiting their confirms at once, at most


class chain:
    """Steps run one after another; each result is the next step's first argument.

    ``await chain(add.s(1, 2), add.s(10)).submit()`` returns a handle whose result is the last
    step's. A failed step (after its retries) fails the chain with that step's error.
    """

    def __init__(self, *steps: Signature) -> None:
        if not steps:
            raise ValueError("a chain needs at least one step")
        self.steps = tuple(_signature(s, "a chain step") for s in steps)

    async def submit(self) -> ResultHandle[Any]:
        """Check every step, then publish the first (it carries the others); the handle once
        RabbitMQ confirmed it.

        Raises:
            TypeError: a step's arguments do not fit its task (each later step leaves room for
                the previous result as its first argument), or a step is not a signature.
            EncodeError: an argument is not JSON-native.
            PublishError: RabbitMQ did not confirm the message.
        """
        first, *rest = self.steps
        app = _app_of(self.steps)
        _check(first, room=False)
        for step in rest:
            _check(step, room=True)
        wid = uuid.uuid4().hex
        workflow = Workflow(wid, "chain", step=0, then=tuple(_step(s) for s in rest))
        envelope = _envelope(app, first, f"{wid}.0", workflow)
        submitting = _submitting(app, wid, "chain")
        async with submitting as reply_to:
            await _publish(app, [(envelope, first)], reply_to)
        assert submitting.handle is not None
        return submitting.handle


class group:
    """Members run in parallel; the result is the list of their results, in order.

    ``group(add.s(i, i) for i in range(10))`` or ``group(add.s(1, 1), add.s(2, 2))``.
    """

    def __init__(self, *members: Signature | chain | Iterable[Signature | chain]) -> None:
        self.members = _members(members)

    async def submit(self) -> ResultHandle[Any]:
        """Check every member, declare the group's queues, publish the members.

        Raises:
            TypeError, EncodeError, PublishError: as `chain.submit`.
        """
        return await _submit_members(self.members, None, "group")


class chord:
    """A group whose list of results is given to ``callback`` as its first argument, once
    every member succeeded; the result is the callback's."""

    def __init__(self, members: Iterable[Signature | chain], callback: Signature) -> None:
        self.members = _members((members,))
        self.callback = _signature(callback, "a chord's callback")

    async def submit(self) -> ResultHandle[Any]:
        """As `group.submit`, the callback checked too (its first argument left free)."""
        return await _submit_members(self.members, self.callback, "chord")


async def _submit_members(
    members: Sequence[tuple[Signature, ...]], callback: Signature | None, kind: str
) -> ResultHandle[Any]:
    app = _app_of([*(s for m in members for s in m), *([callback] if callback else [])])
    for first, *rest in members:  # a member is a signature, or a chain's steps
        _check(first, room=False)
        for step in rest:
            _check(step, room=True)
    if callback is not None:
        _check(callback, room=True)
    wid = uuid.uuid4().hex
    results, gate, claim = chord_queue_names(wid)
    size = len(members)
    then = None if callback is None else _step(callback)
    submitting = _submitting(app, wid, kind)
    async with submitting as reply_to:
        broker = app.broker
        for queue in (results, gate, *([claim] if callback else [])):
            # on a channel of its own, not remembered for declaring again after a reconnect:
            # a long-lived caller submits many workflows, each with its own queues
            await broker.redeclare_queue(queue, chord_queue_arguments())
            if queue != results:
                await broker.publish(queue, b"{}", token_properties(wid))

        def batch(start: int) -> list[tuple[Envelope, Signature]]:
            return [
                (
                    _envelope(
                        app,
                        m[0],
                        f"{wid}.{i}",
                        Workflow(
                            wid,
                            "member",
                            then=tuple(_step(s) for s in m[1:]),
                            index=i,
                            size=size,
                            callback=then,
                        ),
                    ),
                    m[0],
                )
                for i, m in enumerate(members[start : start + PUBLISH_BATCH], start)
            ]

        for start in range(0, size, PUBLISH_BATCH):
            await _publish(app, batch(start), reply_to)
    assert submitting.handle is not None
    return submitting.handle


class _submitting:
    """Registers for the workflow's outcome before publishing; forgets it if publishing failed."""

    def __init__(self, app: App, wid: str, kind: str) -> None:
        self.app, self.wid, self.kind = app, wid, kind
        self.handle: ResultHandle[Any] | None = None

    async def __aenter__(self) -> str:
        replies = self.app._replies
        if replies is None:
            raise AioqueueError(f"{self.app!r} is not connected: use `async with app:` first")
        await replies.ensure_started()
        future, _sink = replies.expect(self.wid)
        self.handle = ResultHandle(self.wid, self.kind, future, canceller=self.app.cancel)
        return replies.queue

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and self.app._replies is not None:
            self.app._replies.forget(self.wid)


async def _publish(app: App, batch: list[tuple[Envelope, Signature]], reply_to: str) -> None:
    """Publish each envelope to its task's queue, confirmed, a batch at once."""
    async with asyncio.TaskGroup() as tasks:
        for envelope, sig in batch:
            addressed = replace(envelope, reply_to=reply_to)
            tasks.create_task(app.producer.publish(addressed, sig.task.options.queue))


def _envelope(app: App, sig: Signature, task_id: str, workflow: Workflow) -> Envelope:
    envelope = Envelope(
        id=task_id, task=sig.task.name, args=tuple(sig.args), kwargs=sig.kwargs, workflow=workflow
    )
    size = len(envelope.encode())
    if size > app.settings.max_message_size:
        raise EncodeError(
            f"the message of {sig!r} would be {size} bytes, over the limit of "
            f"{app.settings.max_message_size} (a long chain carries its later steps)"
        )
    return envelope


def _step(sig: Signature) -> Step:
    return Step(sig.task.name, tuple(sig.args), dict(sig.kwargs), sig.task.options.queue)


def _signature(value: Any, what: str) -> Signature:
    if isinstance(value, Signature):
        return value
    if isinstance(value, chain | group | chord):
        raise TypeError(
            f"{what} is a {type(value).__name__}: nested workflows are not supported; "
            "use task signatures (task.s(...)) only"
        )
    raise TypeError(f"{what} must be a task signature (task.s(...)), not {type(value).__name__}")


def _members(
    given: tuple[Signature | chain | Iterable[Signature | chain], ...],
) -> list[tuple[Signature, ...]]:
    """Each member's steps: one signature, or a chain's (a chain inside a group works; a
    group or chord inside one is refused)."""
    if len(given) == 1 and not isinstance(given[0], Signature | chain):
        if isinstance(given[0], group | chord):
            _signature(given[0], "a member")
        given = tuple(given[0])
    members = [m.steps if isinstance(m, chain) else (_signature(m, "a member"),) for m in given]
    if not members:
        raise ValueError("a group or chord needs at least one member")
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"a group or chord has at most {MAX_MEMBERS} members")
    return members


def _app_of(signatures: Sequence[Signature]) -> App:
    app = signatures[0].task.app
    if any(s.task.app is not app for s in signatures):
        raise ValueError("every task of a workflow must belong to the same App")
    return app


def _check(sig: Signature, *, room: bool) -> None:
    """`TypeError` unless the arguments fit (with room for a previous result); `EncodeError`
    unless they are JSON-native."""
    sig.task.bind(((None, *sig.args) if room else tuple(sig.args)), sig.kwargs)
    check_json_native(list(sig.args), f"{sig!r} args")
    check_json_native(dict(sig.kwargs), f"{sig!r} kwargs")
