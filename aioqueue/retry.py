"""Retry policy as data, and the pure back-off function."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["NO_RETRY", "Retry", "RetryPolicy", "backoff", "next_delay"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how a failed task is tried again.

    Attributes:
        max_attempts: Total runs allowed, the first included (1 means never retry).
        backoff: Delay before the second attempt in seconds; doubles on each later one.
        max_delay: Cap on any single delay, in seconds.
        jitter: Fraction of the delay drawn at random (0.1 means up to ±10 %).
        retry_on: Exception types that cause a retry; anything else fails at once.
    """

    max_attempts: int = 3
    backoff: float = 1.0
    max_delay: float = 600.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff < 0 or self.max_delay < 0:
            raise ValueError("backoff and max_delay must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def delay_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before the attempt after ``attempt`` (which just failed)."""
        return backoff(attempt, base=self.backoff, cap=self.max_delay, jitter=self.jitter, rng=rng)


NO_RETRY = RetryPolicy(max_attempts=1)


def backoff(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Exponential back-off: ``base * 2**(attempt-1)``, capped, with symmetric jitter.

    >>> backoff(1, base=1.0, cap=60.0)
    1.0
    >>> backoff(4, base=1.0, cap=5.0)
    5.0
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    delay = min(cap, base * 2.0 ** min(attempt - 1, 64))
    if jitter:
        delay *= 1.0 + jitter * (2.0 * (rng or random).random() - 1.0)
    return max(0.0, min(cap, delay))


class Retry(Exception):
    """Raise inside a task to ask for another attempt (it uses one up).

    Granted whatever ``retry_on`` says, but only while the task's `RetryPolicy` has attempts
    left: under the default policy (``max_attempts=1``) the task fails at once.

    Args:
        delay: Seconds to wait first; None means the task's policy decides.
    """

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay


def next_delay(
    policy: RetryPolicy, attempt: int, exc: BaseException, rng: random.Random | None = None
) -> float | None:
    """Seconds to wait before retrying after ``attempt`` failed with ``exc``; None: no retry.

    `Retry` asks for another attempt whatever ``retry_on`` says (its own delay, else the
    policy's back-off), other exceptions only when they are instances of ``policy.retry_on``;
    either way only while attempts remain (``attempt < policy.max_attempts``).
    """
    if attempt >= policy.max_attempts:
        return None
    if isinstance(exc, Retry):
        return exc.delay if exc.delay is not None else policy.delay_for(attempt, rng)
    if isinstance(exc, policy.retry_on):
        return policy.delay_for(attempt, rng)
    return None
