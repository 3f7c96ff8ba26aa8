"""What a handler sees: the request ``Exchange``, what it may answer, and the ``Router`` that finds it.

Theory of operation
-------------------
Rule 1: a handler takes an ``Exchange`` and returns (or awaits to) a
        ``Response`` or an ``EventStream``, or raises ``HTTPError``; it never
        touches a connection. The server turns each into bytes (server Rule 2).
Rule 2: every route is registered on one ``Router`` with a one-line
        description, so the list of routes (``GET /api``) is the registry itself.
Rule 3: a ``{name}`` in a pattern matches one non-empty path segment while
        it is still %-encoded, and is decoded after, so an encoded ``/`` never
        splits a segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, NamedTuple, Union
from urllib.parse import unquote

from . import http11
from .hub import Backlog
from .jsontext import dumps


class HTTPError(Exception):
    """Answer the request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(value: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, dumps(value).encode(), "application/json", list(headers))


@dataclass(slots=True)
class EventStream:
    """What a handler returns to open an event stream on its connection.

    ``prepare`` runs after the response head is sent and does whatever must
    be awaited (SQLite reads); it returns ``start``, which the hub calls in
    the step that attaches the stream to build its backlog (hub Rule 3), so
    nothing published in between is missed or sent twice. ``on_close`` runs
    once, whatever ends the stream.
    """

    topics: list[str]
    prepare: Callable[[], Awaitable[Callable[[], Backlog]]] | None = None
    on_close: Callable[[], object] | None = None
    cap_bytes: int | None = None   # bytes it may have unsent; None: the server's --stream-buffer


Result = Union[Response, EventStream]
Handler = Callable[["Exchange"], Union[Result, Awaitable[Result]]]


@dataclass(slots=True)
class Exchange:
    """One request, its path parameters and who sent it."""

    request: http11.Request
    params: dict[str, str]
    client: str


class Route(NamedTuple):
    """One registered route, as ``GET /api`` lists it."""

    method: str
    path: str
    description: str


class Router:
    """Method + path pattern → handler; ``{name}`` matches one non-empty path segment."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        self._described: dict[tuple[str, str], str] = {}

    def add(self, method: str, pattern: str, handler: Handler, description: str) -> None:
        """Route ``method pattern`` to ``handler``; ``description`` says what it does, in a line."""
        self._described[(method, pattern)] = description
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        for existing, methods in self._routes:
            if existing.pattern == regex.pattern:
                methods[method] = handler
                return
        self._routes.append((regex, {method: handler}))

    def describe(self, method: str, pattern: str, description: str) -> None:
        """List a route the server answers itself, before routing (the CORS preflight)."""
        self._described[(method, pattern)] = description

    def description(self, method: str, pattern: str) -> str:
        """What a route does, as it was added."""
        return self._described[(method, pattern)]

    def routes(self) -> list[Route]:
        """Every route, in the order they were added."""
        return [Route(method, path, text) for (method, path), text in self._described.items()]

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for regex, methods in self._routes:
            m = regex.match(path)
            if m is None:
                continue
            handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
            if handler is None:
                allow = ", ".join(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()) | {"OPTIONS"}))
                raise HTTPError(405, f"method {method} is not allowed here", [("Allow", allow)])
            return handler, {name: unquote(value, errors="strict") for name, value in m.groupdict().items()}
        raise HTTPError(404, "no such resource")


def raw_path(target: str) -> str:
    """The still-encoded path of a request-target, absolute-form reduced as http11 does (RFC 9112 §3.2.2)."""
    path = target.partition("?")[0]
    if path.startswith("/") or path == "*":
        return path
    return "/" + path.partition("://")[2].partition("/")[2]
