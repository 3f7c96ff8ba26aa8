"""The few exceptions monkestream raises, all under one root."""

from __future__ import annotations


class MonkestreamError(Exception):
    """Root of every error monkestream raises on purpose."""


class ProtocolError(MonkestreamError):
    """A peer broke HTTP/1.1; ``status_hint`` is the status to answer with.

    After a ProtocolError the connection's framing is in doubt, so the server
    answers (when it can) and closes: no byte left over is read as a request.
    """

    def __init__(self, message: str, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class ConfigError(MonkestreamError):
    """A setting is out of bounds; the message names the flag."""


class Unavailable(MonkestreamError):
    """Something a request needs is failing for now (the database); answered 503 with ``retry_after``.

    Whoever raises it has reported the failure already, so it is not logged again.
    """

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after
