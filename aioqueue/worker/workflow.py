"""A worker moves a workflow on (`aioqueue.workflow`): after a step succeeded, before its ack.

- A chain step publishes the next step (confirmed), carrying the steps after it; the last step
  replies to the caller under the workflow's id.
- A group's or chord's member publishes its result to the workflow's results queue
  (confirmed), then tries to join: when the queue holds at least as many results as there are
  members, it takes the gate token (a message held unacked: one joiner at a time), holds every
  result, drops duplicates (a redelivered member publishes its result again), and when all
  members are there fires — the group's list to the caller, or the chord's callback — then
  deletes the gate and results queues. A joiner that found them incomplete looks again after
  letting go, so the last result is always seen by someone.
- A chord's callback runs only while its runner holds the claim token; the claim queue is
  deleted after the callback's outcome was handed off, so a second copy of the callback (the
  join fired again after a crash) finds no token and is dropped.

Every step acks its message last: a crash anywhere means a redelivery that does it again.
docs/workflows.md has the crash windows.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from ..app import App
from ..broker import Delivery, settle
from ..errors import DecodeError, PublishError, SignatureError, UnroutableError
from ..message import Envelope, Outcome, dumps, loads
from ..message.signing import sign, verify
from ..message.workflow import Step, Workflow, result_properties
from ..topology import chord_queue_names
from .handoff import Handoff, settle_after

__all__ = ["Workflows", "decode_result"]

log = logging.getLogger("aioqueue.worker")

MAX_JOIN_ROUNDS = 10_000  # a join looks again only when results arrived meanwhile


class Workflows:
    """What a worker does when a workflow step succeeded."""

    def __init__(self, app: App, handoff: Handoff) -> None:
        self.app = app
        self.handoff = handoff

    async def advance(self, delivery: Delivery, envelope: Envelope, outcome: Outcome) -> bool:
        """Move the workflow on after ``envelope`` succeeded, then ack; requeue if that could
        not be confirmed (the step runs again)."""
        workflow = envelope.workflow
        assert workflow is not None

        async def move_on() -> None:
            assert workflow is not None
            if workflow.then:  # a chain's, or a member chain's, next step
                await self._next_step(envelope, workflow, outcome.value)
            elif workflow.kind == "member":
                await self._member_done(envelope, workflow, outcome.value)
            else:
                await self._reply(envelope.reply_to, replace(outcome, task_id=workflow.id))
                if workflow.kind == "callback":  # ran: a second copy must not run it again
                    await self.app.broker.delete_queue(chord_queue_names(workflow.id)[2])

        # requeued on any error: a message that keeps failing ends up poison
        failure = (
            f"could not move workflow {workflow.id} on after task {envelope.task} id={envelope.id}"
        )
        return await settle_after(delivery, move_on(), failure, errors=(Exception,))

    async def run(
        self, delivery: Delivery, envelope: Envelope, run: Callable[[], Awaitable[bool]]
    ) -> None:
        """``run()`` (run the task, hand it off) — a chord's callback only while holding its
        claim token; without one (it ran, or a copy runs elsewhere) this copy is dropped."""
        if envelope.workflow is None or envelope.workflow.kind != "callback":
            await run()
            return
        claim = chord_queue_names(envelope.workflow.id)[2]
        async with self.app.broker.hold(claim, 1) as token:
            if token is not None and token.messages:
                if await run():
                    await self.ran(envelope)  # also after a failure: it ran
                return
        log.info("chord callback %s id=%s ran already: dropped", envelope.task, envelope.id)
        await settle(delivery, ack=True)

    async def ran(self, envelope: Envelope) -> None:
        """A chord's callback was handed off, whatever its outcome: delete its claim queue (a
        second copy then finds none). Logged, never raised: the message is settled."""
        assert envelope.workflow is not None
        try:
            await self.app.broker.delete_queue(chord_queue_names(envelope.workflow.id)[2])
        except Exception as exc:  # it expires anyway
            log.warning(
                "could not delete the claim queue of workflow %s: %r", envelope.workflow.id, exc
            )

    async def _reply(self, reply_to: str | None, outcome: Outcome) -> None:
        if not await self.handoff._reply(reply_to, outcome):
            raise PublishError(f"the outcome of workflow {outcome.task_id} was not confirmed")

    async def _next_step(self, envelope: Envelope, workflow: Workflow, value: Any) -> None:
        step = workflow.then[0]
        number = workflow.step + 1
        prefix = f"{workflow.id}.{workflow.index}" if workflow.kind == "member" else workflow.id
        then = replace(workflow, step=number, then=workflow.then[1:])
        await self._publish_step(step, f"{prefix}.{number}", value, envelope.reply_to, then)

    async def _publish_step(
        self, step: Step, task_id: str, first: Any, reply_to: str | None, workflow: Workflow
    ) -> None:
        """Publish ``step`` (a signature) as task ``task_id``, ``first`` its first argument."""
        nxt = Envelope(
            id=task_id,
            task=step.task,
            args=(first, *step.args),
            kwargs=step.kwargs,
            reply_to=reply_to,
            workflow=workflow,
        )
        await self.app.producer.publish(nxt, step.queue)

    async def _member_done(self, envelope: Envelope, workflow: Workflow, value: Any) -> None:
        results = chord_queue_names(workflow.id)[0]
        body = dumps({"index": workflow.index, "value": value})
        properties = result_properties(workflow.id, workflow.index)
        if self.app.signing is not None:  # the join then counts only results signed here
            sign(properties, body, self.app.signing, due_at=self.app.broker.now())
        try:
            await self.app.broker.publish(results, body, properties)
        except UnroutableError:
            log.info(
                "workflow %s has joined or expired: member %d's result is not needed",
                workflow.id,
                workflow.index,
            )
            return
        for _ in range(MAX_JOIN_ROUNDS):
            if not await self._join(envelope, workflow):
                return
        log.error("workflow %s: gave up joining after %d rounds", workflow.id, MAX_JOIN_ROUNDS)

    async def _join(self, envelope: Envelope, workflow: Workflow) -> bool:
        """One try at joining; True when it should look again (it let go of an incomplete set
        while more results may have arrived)."""
        broker = self.app.broker
        results, gate, _ = chord_queue_names(workflow.id)
        async with broker.hold(results, 0) as queue:
            if queue is None or queue.ready < workflow.size:
                return False
        async with broker.hold(gate, 1) as token:
            if token is None or not token.messages:
                return False  # joined already, or another joiner holds it and looks again
            async with broker.hold(results, 2**31) as queue:
                if queue is None:
                    return False
                values: dict[int, Any] = {}
                for message in queue.messages:
                    try:
                        if self.app.signing is not None:
                            verify(message.properties, message.body, self.app.signing)
                        index, value = decode_result(
                            message.body,
                            size=workflow.size,
                            max_size=self.app.settings.max_message_size,
                        )
                    except (DecodeError, SignatureError) as exc:
                        log.warning("dropped a message of %r: %s", results, exc)
                        await message.ack()
                        continue
                    if index in values:
                        await message.ack()  # a redelivered member's second result
                    else:
                        values[index] = value
                if len(values) < workflow.size:
                    return True
                await self._fire(envelope, workflow, [values[i] for i in range(workflow.size)])
                await broker.delete_queue(gate)  # fired: no joiner after this one
                await broker.delete_queue(results)
        return False

    async def _fire(self, envelope: Envelope, workflow: Workflow, values: list[Any]) -> None:
        callback = workflow.callback
        log.info("workflow %s joined its %d members", workflow.id, workflow.size)
        if callback is None:  # a group: its list is the outcome
            outcome = Outcome(workflow.id, envelope.task, value=values)
            await self._reply(envelope.reply_to, outcome)
            return
        await self._publish_step(
            callback,
            f"{workflow.id}.cb",
            values,
            envelope.reply_to,
            Workflow(workflow.id, "callback"),
        )


def decode_result(body: bytes, *, size: int, max_size: int) -> tuple[int, Any]:
    """(index, value) of a results queue's message; `DecodeError` unless it is one of ``size``
    members' (anyone may publish to the queue)."""
    payload = loads(body, max_size=max_size, what="workflow result")
    if not isinstance(payload, dict) or set(payload) != {"index", "value"}:
        raise DecodeError('a workflow result must be an object with "index" and "value"')
    index = payload["index"]
    if type(index) is not int or not 0 <= index < size:
        raise DecodeError(f"a workflow result's index {str(index)[:40]!r} is not in 0..{size - 1}")
    return index, payload["value"]
