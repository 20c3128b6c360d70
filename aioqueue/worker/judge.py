"""`judge`: the verdict on a finished run (succeeded, retried with its delay, failed, timeout),
made once and both handed off and told to observers."""

from __future__ import annotations

from dataclasses import replace

from ..message import Envelope, Outcome
from ..retry import Retry, RetryPolicy, next_delay
from .events import Verdict

__all__ = ["judge"]


def judge(
    envelope: Envelope, outcome: Outcome, exc: BaseException | None, policy: RetryPolicy
) -> Verdict:
    """The verdict on a run of ``envelope`` that ended in ``outcome`` (raising ``exc``)."""
    if outcome.error is None:
        return Verdict("succeeded")
    delay = None if exc is None else next_delay(policy, envelope.attempt, exc)
    if delay is not None:
        return Verdict("retried", retry_delay=delay)
    error = outcome.error
    if isinstance(exc, Retry) and exc.__cause__ is None:  # asked for an attempt not left
        error = replace(
            error,
            message=f"{error.message}, but attempt {envelope.attempt} was the last that "
            f"the task's retry policy allows (max_attempts={policy.max_attempts})",
        )
    return Verdict("timeout" if error.kind == "timeout" else "failed", error=error)
