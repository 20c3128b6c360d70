"""`Signature`: a task with (some of) its arguments, a step of a workflow (`aioqueue.workflow`).

Made with ``task.s(*args, **kwargs)``; a frozen value, checked only when its workflow is
submitted (against the function's signature, and for JSON).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import Task

__all__ = ["Signature"]


@dataclass(frozen=True, slots=True)
class Signature:
    """A task and the arguments it is given in a workflow (``add.s(1, 2)``).

    In a chain, each step after the first gets the previous step's result as its first
    argument; a chord's callback gets the list of its members' results.
    """

    task: Task[Any, Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        arguments = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task.name}.s({', '.join(arguments)})"
