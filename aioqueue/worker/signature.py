"""A signing worker's first step: refuse what is unsigned, forged, stale or replayed.

With ``App(signing_keys=...)`` every delivery passes `SignatureCheck.admit` before it is even
decoded. It is refused — dead-lettered to ``Q.dlq`` with the reason ``signature`` and acked,
the worker going on — when it is:

- unsigned (a Celery protocol-2 message too, which cannot be signed, unless
  ``Settings.accept_unsigned_celery``), signed with a key id this worker does not have, or
  with a signature that does not match the body, properties and meaningful headers;
- stale: due (published, or at the end of its delay) longer ago than
  ``Settings.signature_window``. Retries are signed anew when published, due when their
  delay ends, so only time spent waiting in a queue counts;
- a replay: a copy of a message this worker already accepted within the window. The replay
  guard keys on the signature itself: a copy carries the same one, while a retry, a
  re-counted redelivery or a dead-letter replay is signed anew. RabbitMQ's own redelivery of a
  message (``redelivered``: it was in a consumer's hands, unsettled) is not a replay.

Only a stale message's caller is told (it is authentic, its caller may be waiting): a worker
never publishes a reply to a ``reply_to`` it cannot trust, so an unsigned or forged message
cannot make it sign a reply of the attacker's choosing; a replay's caller got (or will get)
the outcome of the original.

The replay guard is in memory, bounded (``Settings.replay_guard_size``; past it the oldest
entries go first, counted and logged) and scoped to what shares one `SeenMessages` — today one
worker process. A supervisor of several processes shares it by handing each the same
implementation of the protocol (e.g. backed by shared memory or by its own process); workers
on other hosts do not share it (docs/security.md).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Protocol

from ..app import App
from ..broker import Delivery
from ..errors import SignatureError
from ..message import H_TASK, ErrorInfo
from ..message.celery import is_celery
from ..message.signing import SigningKeys, is_signed, verify
from .handoff import Handoff

__all__ = ["ReplayGuard", "SeenMessages", "SignatureCheck"]

log = logging.getLogger("aioqueue.worker")

LOG_EVERY = 60.0  # seconds between two warnings of a full replay guard


class SeenMessages(Protocol):
    """The replay guard's memory: what every process of one worker shares."""

    def add(self, key: bytes, expires_at: float, now: float) -> bool:
        """Remember ``key`` until ``expires_at``; False if it is remembered already."""
        ...


class ReplayGuard:
    """The signatures of accepted messages, each until its freshness ends; bounded.

    Keys are the first 8 bytes of the signature (a collision among a few million live
    entries has odds of about 1 in 10^7). Past ``max_entries`` the oldest are dropped early
    (`evicted`): a replay of one of those would then be accepted, so size it over tasks per
    second times the window.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("replay_guard_size must be at least 1")
        self.max_entries = max_entries
        self._seen: OrderedDict[int, float] = OrderedDict()
        self.evicted = 0
        self._last_warning = -LOG_EVERY

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: bytes, expires_at: float, now: float) -> bool:
        seen = self._seen
        while seen:  # entries arrive roughly in the order they expire
            first, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[first]
        short = int.from_bytes(key[:8], "big")
        known = seen.get(short)
        if known is not None and known > now:
            return False
        seen[short] = expires_at
        if len(seen) > self.max_entries:
            seen.popitem(last=False)
            self.evicted += 1
            if time.monotonic() - self._last_warning >= LOG_EVERY:
                self._last_warning = time.monotonic()
                log.warning(
                    "the replay guard is full (%d messages): forgetting the oldest early "
                    "(%d so far); raise Settings.replay_guard_size or lower signature_window",
                    self.max_entries,
                    self.evicted,
                )
        return True


class SignatureCheck:
    """Admits a delivery only when it is signed, authentic, fresh and not a replay."""

    def __init__(
        self, app: App, keys: SigningKeys, handoff: Handoff, guard: SeenMessages | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.handoff = handoff
        self.window = app.settings.signature_window
        if guard is None:  # (not `guard or ...`: an empty ReplayGuard is falsy)
            guard = ReplayGuard(app.settings.replay_guard_size)
        self.guard: SeenMessages = guard
        self.refused = 0

    async def admit(self, delivery: Delivery) -> bool:
        """True if the delivery may go on; else it was dead-lettered (reason ``signature``)."""
        problem, authentic = self._problem(delivery)
        if problem is None:
            return True
        self.refused += 1
        props = delivery.properties
        headers = props.headers or {}
        name = headers.get(H_TASK)
        task_id = props.correlation_id or props.message_id or ""
        await self.handoff.dead_letter(
            delivery,
            reason="signature",
            error=ErrorInfo("dead_lettered", "signature", problem),
            task_id=task_id,
            task_name=name if isinstance(name, str) else "",
            reply_to=props.reply_to if authentic else None,
        )
        return False

    def _problem(self, delivery: Delivery) -> tuple[str | None, bool]:
        """What is wrong with the delivery's signature, if anything, and whether the message
        is authentic nevertheless (stale: its caller may be told)."""
        props = delivery.properties
        if not is_signed(props.headers) and is_celery(props.headers):
            if self.app.settings.accept_unsigned_celery:
                return None, False
            return "an unsigned Celery message (Settings.accept_unsigned_celery is off)", False
        try:
            signed = verify(props, delivery.body, self.keys)
        except SignatureError as exc:
            return exc.message, False
        now = self.app.broker.now()
        expires_at = signed.due_at + self.window
        if now > expires_at:
            age = now - signed.due_at
            return f"stale: due {age:.0f}s ago, over the {self.window:g}s window", True
        fresh = self.guard.add(signed.digest, expires_at, now)
        if not fresh and not delivery.redelivered:
            # (RabbitMQ's redelivery of a message it gave a consumer is not a copy)
            return "replayed: a copy of a message already accepted within the window", False
        return None, True
