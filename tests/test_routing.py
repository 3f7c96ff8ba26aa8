"""What a handler sees and may answer, and the Router that finds it: on a real server, over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from helpers import AppThread, RouterServer, request
from monkestream.routing import EventStream, Exchange, HTTPError, Response, Router


def http(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def test_routing_rule_1_a_handler_gets_an_exchange_and_answers_with_a_value_or_an_httperror():
    seen: list[Exchange] = []

    def plain(ex: Exchange) -> Response:
        seen.append(ex)
        return Response(201, b'{"made":1}')

    async def awaited(ex: Exchange) -> Response:
        await asyncio.sleep(0)
        return Response(200, b'{"later":1}')

    def refused(ex: Exchange) -> Response:
        raise HTTPError(409, "taken", [("X-Why", "because")])

    def stream(ex: Exchange) -> EventStream:
        return EventStream(["t"])

    router = Router()
    router.add("POST", "/plain/{name}", plain, "a plain answer")
    router.add("GET", "/awaited", awaited, "an answer awaited")
    router.add("GET", "/refused", refused, "a refusal")
    router.add("GET", "/stream", stream, "an event stream")

    async def main() -> None:
        async with RouterServer(router) as srv:
            out = await srv.exchange(b"POST /plain/a%20b?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                     b"Connection: close\r\n\r\nhi")
            assert out.startswith(b"HTTP/1.1 201 ") and out.endswith(b'\r\n\r\n{"made":1}')
            out = await srv.exchange(http("GET", "/awaited"))
            assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b'{"later":1}')
            out = await srv.exchange(http("GET", "/refused"))
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 409 ") and b"\r\nX-Why: because" in head
            assert json.loads(body) == {"error": "taken"}
            out = await srv.exchange(http("GET", "/stream"), until=b"retry:")
            assert out.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/event-stream" in out

    asyncio.run(main())
    # what the handler was given: the request, its path parameters, who sent it; no connection
    assert [f.name for f in dataclasses.fields(Exchange)] == ["request", "params", "client"]
    (ex,) = seen
    assert (ex.request.body, ex.params, ex.request.query, ex.client) == (b"hi", {"name": "a b"}, "q=1", "127.0.0.1")


def test_routing_rule_2_every_route_has_a_one_line_description_and_api_lists_exactly_the_registry(tmp_path):
    with AppThread(tmp_path / "api.db") as s:
        status, _, body = request(s.port, "GET", "/api")
        listed = json.loads(body)["routes"]
        router = s.app.router
        assert status == 200 and listed == [route._asdict() for route in router.routes()]
        assert all(r["description"].strip() and "\n" not in r["description"] for r in listed)
        handled = sorted((method, regex.pattern) for regex, methods in router._routes for method in methods)
        described = sorted((r["method"], "^" + r["path"].replace("{", "(?P<").replace("}", ">[^/]+)") + "$")
                           for r in listed if r["path"] != "*")
        assert handled == described  # every handler is listed, and every listed route has a handler
        for route in listed:
            if route["path"] != "*":
                router.match(route["method"], route["path"].replace("{", "").replace("}", ""))  # no 404 or 405


def test_routing_rule_3_a_parameter_is_one_encoded_segment_decoded_after_the_match():
    router = Router()
    router.add("GET", "/room/{room}/comments/{comment_id}", lambda ex: Response(), "a comment")
    assert router.match("GET", "/room/a%2Fb/comments/7")[1] == {"room": "a/b", "comment_id": "7"}
    assert router.match("GET", "/room/%E2%82%AC%20x/comments/1")[1] == {"room": "\N{EURO SIGN} x", "comment_id": "1"}
    for path in ("/room/a/b/comments/7", "/room//comments/7", "/room/a/comments/", "/room/a/comments/7/"):
        with pytest.raises(HTTPError) as info:
            router.match("GET", path)
        assert info.value.status == 404, path
