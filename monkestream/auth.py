"""The publish token: who may publish prices and delete any comment.

The token is compared in constant time and never logged. With no token set
anyone may publish, and nobody carries it.
"""

from __future__ import annotations

import hmac

from .http11 import Request
from .routing import HTTPError

CHALLENGE = ("WWW-Authenticate", 'Bearer realm="monkestream"')


class BearerToken:
    """``Authorization: Bearer TOKEN`` checked against the configured token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def carried_by(self, request: Request) -> bool:
        """Whether the request carries the token (False when none is set)."""
        if not self._token:
            return False
        scheme, _, credentials = (request.header("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)

    def require(self, request: Request) -> None:
        """HTTPError 401 unless no token is set or the request carries it."""
        if self._token and not self.carried_by(request):
            raise HTTPError(401, "a valid bearer token is required", [CHALLENGE])
