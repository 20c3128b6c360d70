"""Signed messages: HMAC-SHA256 over a message's body and the parts that carry meaning.

With ``App(..., signing_keys={"k2": secret2, "k1": secret1})`` every task message, reply,
task event batch and dead-letter replay carries three headers (names in `headers`):

- ``aioqueue-key-id``: which key signed it (the first of the app's keys; all of them verify,
  so keys can rotate: add the new one first, deploy everywhere, then drop the old one);
- ``aioqueue-due-at``: integer Unix milliseconds from which the message counts as fresh — its
  publish time, or the end of its delay for a delayed task or a retry;
- ``aioqueue-signature``: the hex HMAC-SHA256, with the key, over `canonical` — the scheme,
  the key id, the due time, the message id, correlation id, reply-to and content type, the
  headers in `SIGNED_HEADERS` (name and value, in that order), then the body.

Headers that change on the way without changing what the message asks for are not signed:
RabbitMQ's ``x-*`` records, the dead-letter copy's ``aioqueue-dead-*`` notes, and other
applications' headers (e.g. a trace context). A dead letter keeps its signature, so
``aioqueue dlq replay`` can check it before signing the replay anew.

Secrets never appear in a repr, a log line or an error (`SigningKeys`). The checks a worker
makes with these (freshness, the replay guard) are in `aioqueue.worker.signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pamqp import commands as spec

from ..errors import SignatureError
from .headers import (
    H_ATTEMPT,
    H_DEADLINE,
    H_DELIVERIES,
    H_DUE_AT,
    H_EVENT,
    H_EVENTS,
    H_KEY_ID,
    H_PACED,
    H_PROTOCOL,
    H_SCHEDULED_AT,
    H_SEQ,
    H_SIGNATURE,
    H_STREAM_TO,
    H_TASK,
)

__all__ = [
    "MIN_KEY_BYTES",
    "SIGNED_HEADERS",
    "Signed",
    "SigningKeys",
    "canonical",
    "is_signed",
    "sign",
    "signed_due_at",
    "verify",
]

MIN_KEY_BYTES: Final = 32
SCHEME: Final = "aioqueue-hmac-sha256-v1"
# the headers that say what a message asks for; a change to any of them breaks the signature
SIGNED_HEADERS: Final = (
    H_TASK,
    H_ATTEMPT,
    H_PROTOCOL,
    H_DEADLINE,
    H_SCHEDULED_AT,
    H_STREAM_TO,
    H_EVENT,
    H_SEQ,
    H_EVENTS,
    H_DELIVERIES,
    H_PACED,  # the pacer's mark (aioqueue.ratelimit): added to a signed message, it breaks it
)
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class SigningKeys:
    """Key id → secret; the first entry signs, every entry verifies. Never shows a secret.

    Args:
        keys: At least one entry; ids of 1-64 letters, digits, ``.``, ``_`` or ``-``;
            secrets of at least 32 bytes (e.g. ``secrets.token_bytes(32)``).

    Raises:
        ValueError: no key, a bad id, or a secret shorter than 32 bytes (named by its id).
    """

    __slots__ = ("_macs", "signing_id")

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ValueError("signing_keys: give at least one key (id -> secret)")
        macs: dict[str, Any] = {}
        for key_id, secret in keys.items():
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                raise ValueError(
                    f"signing key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-'"
                )
            if not isinstance(secret, bytes | bytearray):
                raise TypeError(f"signing key {key_id!r}: the secret must be bytes")
            if len(secret) < MIN_KEY_BYTES:
                raise ValueError(
                    f"signing key {key_id!r} is too short: at least {MIN_KEY_BYTES} bytes "
                    "(e.g. secrets.token_bytes(32))"
                )
            macs[key_id] = hmac.new(bytes(secret), digestmod=hashlib.sha256)
        self._macs = macs
        self.signing_id: str = next(iter(macs))

    @classmethod
    def parse(cls, text: str, *, source: str = "$AIOQUEUE_SIGNING_KEYS") -> SigningKeys:
        """Keys from ``id:HEX,id:HEX`` (the first signs), as in ``$AIOQUEUE_SIGNING_KEYS``.

        Raises:
            ValueError: a malformed entry (named by its position and id, never its secret).
        """
        keys: dict[str, bytes] = {}
        for position, entry in enumerate(text.split(","), start=1):
            key_id, sep, hex_secret = entry.strip().partition(":")
            if not sep:
                raise ValueError(f"{source}: entry {position} is not id:HEX")
            try:
                secret = bytes.fromhex(hex_secret.strip())
            except ValueError:
                raise ValueError(
                    f"{source}: the secret of key {key_id!r} is not hexadecimal"
                ) from None
            if key_id in keys:
                raise ValueError(f"{source}: key {key_id!r} is given twice")
            keys[key_id] = secret
        return cls(keys)

    @property
    def ids(self) -> tuple[str, ...]:
        """The key ids, the signing one first."""
        return tuple(self._macs)

    def __repr__(self) -> str:
        return f"<SigningKeys signs with {self.signing_id!r}, accepts {list(self._macs)!r}>"

    def _digest(self, key_id: str, data: bytes, body: bytes) -> bytes | None:
        mac = self._macs.get(key_id)
        if mac is None:
            return None
        mac = mac.copy()  # the key's inner and outer pads are computed once
        mac.update(data)
        mac.update(body)
        return bytes(mac.digest())


def canonical(
    key_id: str, due_ms: int, properties: spec.Basic.Properties, headers: Mapping[str, Any]
) -> bytes:
    """What the signature covers besides the body: length-prefixed JSON of the scheme, key
    id, due time, message and correlation ids, reply-to, content type and signed headers."""
    signed = [[name, headers[name]] for name in SIGNED_HEADERS if name in headers]
    # an empty property is not sent at all (pamqp writes only set ones): "" and None are one
    parts = [
        SCHEME,
        key_id,
        due_ms,
        properties.message_id or None,
        properties.correlation_id or None,
        properties.reply_to or None,
        properties.content_type or None,
        signed,
    ]
    try:
        meta = orjson.dumps(parts, default=repr)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits in a forged header
        meta = repr(parts).encode()
    return struct.pack(">I", len(meta)) + meta


def sign(
    properties: spec.Basic.Properties, body: bytes, keys: SigningKeys, *, due_at: float
) -> spec.Basic.Properties:
    """Sign with the first key: set ``properties.headers``' key id, due time and signature
    (an earlier signature is replaced), and a message id if it has none (aiormq would add
    one after signing). ``due_at``: Unix seconds from which it is fresh."""
    if properties.message_id is None:  # aiormq would give it one after it was signed
        properties.message_id = uuid.uuid4().hex
    headers = {k: v for k, v in (properties.headers or {}).items() if k != H_SIGNATURE}
    due_ms = int(due_at * 1000)
    key_id = keys.signing_id
    headers[H_KEY_ID] = key_id
    headers[H_DUE_AT] = due_ms
    digest = keys._digest(key_id, canonical(key_id, due_ms, properties, headers), body)
    assert digest is not None
    headers[H_SIGNATURE] = digest.hex()
    properties.headers = headers
    return properties


def signed_due_at(headers: Mapping[str, Any] | None) -> float | None:
    """The due time (Unix seconds) a message's signature headers claim, if any."""
    due_ms = (headers or {}).get(H_DUE_AT)
    if isinstance(due_ms, int) and not isinstance(due_ms, bool):
        return due_ms / 1000
    return None


def is_signed(headers: Mapping[str, Any] | None) -> bool:
    """Whether a message carries a signature (of any validity)."""
    return bool(headers) and H_SIGNATURE in headers  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class Signed:
    """A verified signature: which key, when the message is due, and the digest itself (a
    replay of the message carries the same one)."""

    key_id: str
    due_at: float
    digest: bytes


def verify(properties: spec.Basic.Properties, body: bytes, keys: SigningKeys) -> Signed:
    """Check the signature of a message with ``keys`` (freshness is the caller's question).

    Raises:
        SignatureError: unsigned, an unknown key id, or a signature that does not match.
    """
    headers = properties.headers or {}
    signature, key_id, due_ms = (headers.get(h) for h in (H_SIGNATURE, H_KEY_ID, H_DUE_AT))
    if signature is None:
        raise SignatureError("the message is not signed")
    if (
        not isinstance(signature, str)
        or not isinstance(key_id, str)
        or not isinstance(due_ms, int)
        or isinstance(due_ms, bool)
    ):
        raise SignatureError("the message's signature headers are malformed")
    digest = keys._digest(key_id, canonical(key_id, due_ms, properties, headers), body)
    if digest is None:
        raise SignatureError(f"the message is signed with an unknown key id {key_id[:64]!r}")
    try:
        claimed = bytes.fromhex(signature)
    except ValueError:
        claimed = b""
    if not hmac.compare_digest(digest, claimed):
        raise SignatureError(f"bad signature (key id {key_id!r})")
    return Signed(key_id, due_ms / 1000, digest)
