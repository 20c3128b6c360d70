"""Who may see the dashboard and act through it.

- Bound to a loopback address, no credentials are needed (unless some are configured).
- Bound anywhere else, ``$AIOQUEUE_DASHBOARD_TOKEN`` (``Authorization: Bearer <token>``) or
  ``$AIOQUEUE_DASHBOARD_USER`` and ``$AIOQUEUE_DASHBOARD_PASSWORD`` (HTTP basic) must be set,
  else the dashboard refuses to start (`check_bind`).
- Every POST (the actions: cancel, replay, purge) must come from the dashboard's own pages: its
  ``Origin`` (or, without one, its ``Referer``) must be the dashboard's own origin, and it must
  carry the ``X-Aioqueue-Dashboard`` header that only our own script sets (a cross-site form
  cannot set a header, and a cross-site script cannot without a CORS pre-flight we never grant).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["ACTION_HEADER", "Credentials", "check_bind", "is_loopback"]

ACTION_HEADER = "X-Aioqueue-Dashboard"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request must present; neither set means open (loopback only)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        env = os.environ if environ is None else environ
        user, password = env.get("AIOQUEUE_DASHBOARD_USER"), env.get("AIOQUEUE_DASHBOARD_PASSWORD")
        return cls(
            token=env.get("AIOQUEUE_DASHBOARD_TOKEN") or None,
            user=user if user and password else None,
            password=password if user and password else None,
        )

    @property
    def configured(self) -> bool:
        return self.token is not None or self.user is not None

    def who(self, request: web.Request) -> str | None:
        """The authenticated user (``"token"`` for the bearer), ``"local"`` when open, or None."""
        if not self.configured:
            return "local"
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token is not None:
            if hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return "token"
        elif scheme == "basic" and self.user is not None and self.password is not None:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            ok_user = hmac.compare_digest(user.encode(), self.user.encode())
            ok_password = hmac.compare_digest(password.encode(), self.password.encode())
            if ok_user and ok_password:
                return user
        return None

    def challenge(self) -> str:
        return 'Basic realm="aioqueue"' if self.user is not None else "Bearer"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, credentials: Credentials) -> str | None:
    """Why ``host`` must not be served with these credentials, or None when it may."""
    if is_loopback(host) or credentials.configured:
        return None
    return (
        f"refusing to serve the dashboard on {host} without authentication: set "
        "$AIOQUEUE_DASHBOARD_TOKEN (bearer) or $AIOQUEUE_DASHBOARD_USER and "
        "$AIOQUEUE_DASHBOARD_PASSWORD (basic), or bind to 127.0.0.1"
    )


def same_origin(request: web.Request) -> bool:
    """Whether a POST comes from the dashboard's own pages (see the module doc)."""
    if request.headers.get(ACTION_HEADER) != "1":
        return False
    # the host (and port) only: behind a TLS-terminating proxy the scheme differs
    source = request.headers.get("Origin") or request.headers.get("Referer") or ""
    try:
        netloc = urlsplit(source).netloc
    except ValueError:  # e.g. "http://[": not a URL at all
        return False
    return bool(request.host) and netloc == request.host
