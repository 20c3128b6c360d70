"""A workflow step's place in its workflow, as it travels in the task message's body.

A task message that belongs to a workflow (`aioqueue.workflow`: chain, group, chord) carries a
``"workflow"`` object beside ``"args"`` and ``"kwargs"``::

    {"id": "<workflow id>", "kind": "chain" | "member" | "callback",
     "step": 0,                     # chain: this step's number
     "then": [<step>, ...],         # chain: the steps after this one
     "index": 3, "size": 10,        # member: its place in its group or chord
     "callback": <step> | null}     # member of a chord: the callback; null for a group
    (a member that is a chain also has "step" and "then")
    <step> = {"task": "<name>", "args": [...], "kwargs": {...}, "queue": "<queue>"}

Everything the workflow still has to do travels in messages, never in a caller's memory. The
workflow id names the chord queues (``aioqueue.chord.<id>``), so it is checked as strictly as
a queue name: a forged object is a `DecodeError` and the message is dead-lettered.

A member's result goes to its chord queue as ``{"index": i, "value": v}``
(`aioqueue.worker.workflow`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pamqp import commands as spec

from ..errors import DecodeError
from .headers import CONTENT_TYPE

__all__ = [
    "MAX_MEMBERS",
    "Step",
    "Workflow",
    "decode_workflow",
    "result_properties",
    "token_properties",
]

MAX_MEMBERS: Final = 1_000_000
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_QUEUE = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]{1,251}")
Kind = Literal["chain", "member", "callback"]


@dataclass(frozen=True, slots=True)
class Step:
    """A task still to run: its name, its own arguments and its queue."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str = "default"

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "args": self.args, "kwargs": self.kwargs, "queue": self.queue}


@dataclass(frozen=True, slots=True)
class Workflow:
    """Where a task message stands in its workflow (see the module docstring)."""

    id: str
    kind: Kind
    step: int = 0
    then: tuple[Step, ...] = ()
    index: int = 0
    size: int = 0
    callback: Step | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind}
        if self.kind == "chain":
            out["step"] = self.step
            out["then"] = [step.to_json() for step in self.then]
        elif self.kind == "member":
            out["index"], out["size"] = self.index, self.size
            out["callback"] = None if self.callback is None else self.callback.to_json()
            if self.step or self.then:  # a member that is a chain: where in it
                out["step"] = self.step
                out["then"] = [step.to_json() for step in self.then]
        return out


def decode_workflow(value: Any) -> Workflow:
    """The body's ``"workflow"`` object, checked strictly; `DecodeError` for anything else."""
    if not isinstance(value, dict):
        raise DecodeError('"workflow" must be an object')
    wid, kind = value.get("id"), value.get("kind")
    if not isinstance(wid, str) or not _ID.fullmatch(wid):
        raise DecodeError(f"workflow id {str(wid)[:80]!r} is not 1-64 letters, digits, - or _")
    if kind == "chain":
        _keys(value, {"id", "kind", "step", "then"})
        step, then = _chain(value)
        return Workflow(wid, "chain", step=step, then=then)
    if kind == "member":
        member = {"id", "kind", "index", "size", "callback"}
        _keys(value, member | {"step", "then"} if "then" in value else member)
        size = _int(value["size"], "size", 1, MAX_MEMBERS)
        index = _int(value["index"], "index", 0, size - 1)
        raw = value["callback"]
        callback = None if raw is None else _step(raw)
        step, then = _chain(value) if "then" in value else (0, ())
        return Workflow(
            wid, "member", step=step, then=then, index=index, size=size, callback=callback
        )
    if kind == "callback":
        _keys(value, {"id", "kind"})
        return Workflow(wid, "callback")
    raise DecodeError(f"workflow kind {str(kind)[:40]!r} is not chain, member or callback")


def _chain(value: dict[str, Any]) -> tuple[int, tuple[Step, ...]]:
    then = value["then"]
    if not isinstance(then, list):
        raise DecodeError('workflow "then" must be an array of steps')
    return _int(value["step"], "step", 0, 1_000_000), tuple(_step(s) for s in then)


def _keys(value: dict[str, Any], keys: set[str]) -> None:
    if set(value) != keys:
        raise DecodeError(f"workflow object must have exactly the keys {sorted(keys)}")


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise DecodeError(f"workflow {what} {str(value)[:40]!r} is not an integer in {low}..{high}")
    return value


def _step(value: Any) -> Step:
    if not isinstance(value, dict) or set(value) != {"task", "args", "kwargs", "queue"}:
        raise DecodeError(
            'a workflow step must be an object with "task", "args", "kwargs", "queue"'
        )
    task, args, kwargs, queue = value["task"], value["args"], value["kwargs"], value["queue"]
    if not isinstance(task, str) or not task:
        raise DecodeError("a workflow step's task name must be a non-empty string")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise DecodeError('a workflow step\'s "args" must be an array and "kwargs" an object')
    if not isinstance(queue, str) or not _QUEUE.fullmatch(queue) or queue.startswith("amq."):
        raise DecodeError(f"a workflow step's queue {str(queue)[:80]!r} is not a queue name")
    return Step(task, tuple(args), kwargs, queue)


def token_properties(workflow_id: str) -> spec.Basic.Properties:
    """A workflow's gate or claim token: persistent, named by its workflow."""
    return spec.Basic.Properties(content_type=CONTENT_TYPE, delivery_mode=2, message_id=workflow_id)


def result_properties(workflow_id: str, index: int) -> spec.Basic.Properties:
    """A member's result in its chord queue: persistent, its message id the member's index."""
    return spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        message_id=str(index),
        correlation_id=workflow_id,
    )
