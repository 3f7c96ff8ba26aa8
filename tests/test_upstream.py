"""upstream: the relay's HTTP/1.1 client, against real servers on ephemeral ports and Unix sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
from pathlib import Path
from typing import Awaitable, Callable, NamedTuple

import pytest

from monkestream.http11 import chunk
from monkestream.upstream import Upstream, UpstreamError

OUTER_S = 10.0   # a test's own guard: a hang fails the test instead of stalling the run


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Seen(NamedTuple):
    """A request as the origin read it: on which connection (1, 2, ...), and what it was."""

    conn: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Origin:
    """A real HTTP/1.1 server in this loop; ``handle(n, reader, writer)`` serves its n-th connection.

    ``async with Origin(handle) as origin``: ``origin.url`` is where it listens (TCP on an
    ephemeral port, or ``unix:PATH`` when ``unix_path`` is given).
    """

    def __init__(self, handle: Handler, unix_path: str | None = None) -> None:
        self.handle = handle
        self.unix_path = unix_path
        self.connections = 0
        self.requests: list[Seen] = []
        self.ended: dict[int, asyncio.Event] = {}   # set once the client closed connection n
        self._tasks: set[asyncio.Task] = set()
        self.url = ""

    async def __aenter__(self) -> Origin:
        if self.unix_path is not None:
            self.server = await asyncio.start_unix_server(self._serve, self.unix_path)
            self.url = f"unix:{self.unix_path}"
        else:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    def ended_event(self, n: int) -> asyncio.Event:
        return self.ended.setdefault(n, asyncio.Event())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        n = self.connections
        try:
            await self.handle(n, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def read_request(self, n: int, reader: asyncio.StreamReader) -> Seen | None:
        """The next request on connection ``n``; None when the client closed it."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended_event(n).set()
            return None
        line, *fields = head[:-4].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        method, target, _version = line.split(" ")
        seen = Seen(n, method, target, headers, body)
        self.requests.append(seen)
        return seen

    async def until_closed(self, n: int, reader: asyncio.StreamReader) -> None:
        """Read connection ``n`` until the client closes it (then ``ended[n]`` is set)."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.ended_event(n).set()


def ok(body: bytes = b"ok", *headers: str) -> bytes:
    head = "HTTP/1.1 200 OK\r\n" + "".join(h + "\r\n" for h in headers) + f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def keep_answering(origin_ref: list[Origin]) -> Handler:
    """Answer every request with ``METHOD TARGET #n``, n the connection's number."""
    async def handle(n, reader, writer):
        while (seen := await origin_ref[0].read_request(n, reader)) is not None:
            writer.write(ok(f"{seen.method} {seen.target} #{n}".encode()))
            await writer.drain()
    return handle


async def within(awaitable, seconds: float = OUTER_S):
    return await asyncio.wait_for(awaitable, seconds)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Make closing this connection send a RST, not a FIN (SO_LINGER 0)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- Rule 1: keep-alive, and the one retry --------------------------------------------------


def test_upstream_rule_1_requests_reuse_an_idle_kept_alive_connection():
    async def main():
        ref: list[Origin] = []
        async with Origin(keep_answering(ref)) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            a = await within(up.request("GET", "/one", [("X-Test", "1"), ("Connection", "close"), ("Host", "evil")]))
            b = await within(up.request("POST", "/two", [("Content-Type", "application/json")], b'{"a":1}'))
            c = await within(up.request("DELETE", "/three", []))
            assert [(x.status, x.body) for x in (a, b, c)] == [
                (200, b"GET /one #1"), (200, b"POST /two #1"), (200, b"DELETE /three #1")]
            assert origin.connections == 1
            first, second, _ = origin.requests
            assert first.headers["host"] == origin.url.removeprefix("http://")  # its own, not the caller's
            assert first.headers["x-test"] == "1" and "connection" not in first.headers  # hop-by-hop: not passed on
            assert second.body == b'{"a":1}' and second.headers["content-length"] == "7"
            assert a.header("content-length") == "11"
            up.close()
            await within(origin.ended_event(1).wait())  # close() ends the idle connection
    run(main())


@pytest.mark.parametrize("ending", ["fin", "reset"])
def test_upstream_rule_1_a_request_on_an_idle_connection_the_server_closed_is_retried_once_on_a_new_one(ending):
    async def main():
        ref: list[Origin] = []
        close_now, closed = asyncio.Event(), asyncio.Event()
        answer = keep_answering(ref)

        async def handle(n, reader, writer):
            if n > 1:
                return await answer(n, reader, writer)
            seen = await ref[0].read_request(n, reader)
            writer.write(ok(f"{seen.method} {seen.target} #{n}".encode()))
            await writer.drain()
            await close_now.wait()   # idle now: the server's keep-alive timeout closes it
            if ending == "reset":
                reset_on_close(writer)
            writer.close()
            await writer.wait_closed()
            closed.set()

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            assert (await within(up.request("GET", "/first", []))).body == b"GET /first #1"
            close_now.set()
            await within(closed.wait())
            again = await within(up.request("POST", "/second", [], b"x"))
            assert again.body == b"POST /second #2"
            assert origin.connections == 2
            assert [(s.conn, s.target) for s in origin.requests] == [(1, "/first"), (2, "/second")]
            # the new connection is the one kept now
            assert (await within(up.request("GET", "/third", []))).body == b"GET /third #2"
            assert origin.connections == 2
            up.close()
    run(main())


def test_upstream_rule_1_the_retry_is_made_once_and_a_failure_on_it_is_raised():
    async def main():
        ref: list[Origin] = []
        close_now, closed = asyncio.Event(), asyncio.Event()

        async def handle(n, reader, writer):
            await ref[0].read_request(n, reader)
            if n == 1:
                writer.write(ok(b"first"))
                await writer.drain()
                await close_now.wait()
                writer.close()
                await writer.wait_closed()
                closed.set()
            # and every later connection reads its request and closes without a word

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            assert (await within(up.request("GET", "/first", []))).body == b"first"
            close_now.set()
            await within(closed.wait())
            with pytest.raises(UpstreamError, match="without an answer"):
                await within(up.request("GET", "/second", []))
            assert origin.connections == 2   # the stale one, then one new one: no third try
            assert [(s.conn, s.target) for s in origin.requests] == [(1, "/first"), (2, "/second")]
            up.close()
    run(main())


def test_upstream_rule_1_a_failure_on_a_new_connection_is_not_retried():
    async def main():
        ref: list[Origin] = []

        async def handle(n, reader, writer):
            await ref[0].read_request(n, reader)   # then closes without an answer

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            with pytest.raises(UpstreamError, match="without an answer"):
                await within(up.request("PUT", "/x", [], b"body"))
            assert origin.connections == 1 and len(origin.requests) == 1
        with pytest.raises(UpstreamError, match="cannot connect"):
            await within(Upstream(f"http://127.0.0.1:{free_port()}", timeout=5).request("GET", "/", []))
    run(main())


@pytest.mark.parametrize("cut", [
    b"HTTP/1.1 200 OK\r\nContent-Le",                          # in the head
    b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\nabc",  # in the body
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",  # between chunks
])
def test_upstream_rule_1_a_post_whose_answer_was_started_then_cut_is_not_retried(cut):
    async def main():
        ref: list[Origin] = []
        answer = keep_answering(ref)

        async def handle(n, reader, writer):
            if n > 1:
                return await answer(n, reader, writer)
            await ref[0].read_request(n, reader)
            writer.write(ok(b"first"))             # the connection is kept, then reused for the POST
            await writer.drain()
            await ref[0].read_request(n, reader)
            writer.write(cut)
            await writer.drain()

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            assert (await within(up.request("GET", "/first", []))).body == b"first"
            with pytest.raises(UpstreamError):
                await within(up.request("POST", "/comments", [], b'{"text":"once"}'))
            assert [(s.conn, s.method) for s in origin.requests] == [(1, "GET"), (1, "POST")]  # posted once
            assert origin.connections == 1
            assert (await within(up.request("GET", "/after", []))).body == b"GET /after #2"  # not kept
            up.close()
    run(main())


# -- Rule 2: deadlines, and failed connections are closed ------------------------------------


def test_upstream_rule_2_a_server_that_never_answers_fails_at_the_deadline_and_its_connection_is_closed():
    async def main():
        ref: list[Origin] = []
        answer = keep_answering(ref)

        async def handle(n, reader, writer):
            if n > 1:
                return await answer(n, reader, writer)
            await ref[0].read_request(n, reader)
            writer.write(ok(b"first"))
            await writer.drain()
            await ref[0].read_request(n, reader)       # the second: never answered
            await ref[0].until_closed(n, reader)

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=0.3)
            assert (await within(up.request("GET", "/first", []))).body == b"first"
            with pytest.raises(UpstreamError):
                await within(up.request("GET", "/slow", []))   # its deadline, not the guard's
            await within(origin.ended_event(1).wait())        # the client closed it
            after = await within(up.request("GET", "/after", []))
            assert after.body == b"GET /after #2"              # on a new connection: it was not kept
            assert [(s.conn, s.target) for s in origin.requests] == [(1, "/first"), (1, "/slow"), (2, "/after")]
            up.close()
    run(main())


def test_upstream_rule_2_a_stream_whose_head_never_comes_fails_at_the_deadline():
    async def main():
        ref: list[Origin] = []

        async def handle(n, reader, writer):
            await ref[0].read_request(n, reader)
            await ref[0].until_closed(n, reader)

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=0.3)
            with pytest.raises(UpstreamError):
                await within(up.stream("/events?topic=*", []))
            await within(origin.ended_event(1).wait())
    run(main())


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"])
def test_upstream_rule_2_a_broken_answer_fails_and_its_connection_is_closed(garbage):
    async def main():
        ref: list[Origin] = []
        answer = keep_answering(ref)

        async def handle(n, reader, writer):
            if n > 2:
                return await answer(n, reader, writer)
            await ref[0].read_request(n, reader)
            writer.write(garbage)
            await writer.drain()
            await ref[0].until_closed(n, reader)

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            with pytest.raises(UpstreamError):
                await within(up.request("GET", "/x", []))
            await within(origin.ended_event(1).wait())
            with pytest.raises(UpstreamError):
                await within(up.stream("/events?topic=*", []))
            await within(origin.ended_event(2).wait())   # closed at once, not left for the collector
            assert (await within(up.request("GET", "/y", []))).body == b"GET /y #3"
            up.close()
    run(main())


# -- Rule 3: event streams ---------------------------------------------------------------------


def stream_server(ref: list[Origin], go_on: asyncio.Event) -> Handler:
    """Connection 1 is an event stream written one chunk at a time; the others answer requests."""
    answer = keep_answering(ref)

    async def handle(n, reader, writer):
        if n > 1:
            return await answer(n, reader, writer)
        await ref[0].read_request(n, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunk(b"id: 1-1\ndata: a\n\n"))
        await writer.drain()
        await go_on.wait()   # the next chunk only once the client has read the first
        writer.write(chunk(b"id: 1-2\ndata: b\n\n") + b"0\r\n\r\n")
        await writer.drain()
        await answer(n, reader, writer)   # and it could serve requests after: it is never asked to
        ref[0].ended_event(n).set()
    return handle


async def follow_a_stream(origin: Origin, go_on: asyncio.Event, up: Upstream) -> None:
    body = await within(up.stream("/events?topic=*", [("Last-Event-ID", "1-0"), ("Connection", "close")]))
    assert body.status == 200 and ("content-type", "text/event-stream") in body.headers
    seen = origin.requests[0]
    assert seen.target == "/events?topic=*" and seen.headers["accept"] == "text/event-stream"
    assert seen.headers["last-event-id"] == "1-0" and "connection" not in seen.headers
    parts = aiter(body)
    assert await within(anext(parts)) == b"id: 1-1\ndata: a\n\n"   # before the server wrote the next
    go_on.set()
    assert await within(anext(parts)) == b"id: 1-2\ndata: b\n\n"
    with pytest.raises(StopAsyncIteration):
        await within(anext(parts))
    # a request after it goes on a connection of its own: the stream's is never reused
    assert (await within(up.request("GET", "/after", []))).body.endswith(b" #2")
    body.close()
    await within(origin.ended_event(1).wait())


def test_upstream_rule_3_a_stream_yields_each_chunk_as_it_arrives():
    async def main():
        ref: list[Origin] = []
        go_on = asyncio.Event()
        async with Origin(stream_server(ref, go_on)) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            await follow_a_stream(origin, go_on, up)
            assert origin.connections == 2
            up.close()
    run(main())


def test_upstream_rule_3_a_unix_socket_upstream():
    async def main():
        with tempfile.TemporaryDirectory(prefix="ms-up") as folder:   # short: a socket path has a limit
            path = str(Path(folder) / "origin.sock")
            ref: list[Origin] = []
            go_on = asyncio.Event()
            async with Origin(stream_server(ref, go_on), unix_path=path) as origin:
                ref.append(origin)
                up = Upstream(f"unix:{path}", timeout=5)
                await follow_a_stream(origin, go_on, up)
                assert origin.requests[0].headers["host"] == "localhost"
                again = await within(up.request("POST", "/more", [], b"1"))
                assert again.body == b"POST /more #2"   # kept alive on the socket too
                assert origin.connections == 2
                up.close()
    run(main())


def test_upstream_rule_3_a_stream_answered_with_an_error_ends_at_its_length():
    """An error answer (a 401, a 503) is read whole and ends, though the upstream keeps the connection."""
    async def main():
        ref: list[Origin] = []
        error = b'{"error": "a valid bearer token is required"}'

        async def handle(n, reader, writer):
            await ref[0].read_request(n, reader)
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(error) + error)
            await writer.drain()
            await ref[0].until_closed(n, reader)   # kept alive: no end of the body by a close

        async with Origin(handle) as origin:
            ref.append(origin)
            body = await within(Upstream(origin.url, timeout=5).stream("/events?topic=*", []))
            assert body.status == 401
            assert await within(body.read_all(4096), 5) == error
            body.close()
            await within(origin.ended_event(1).wait())
    run(main())


# -- bodies ----------------------------------------------------------------------------------


def test_upstream_content_length_and_chunked_bodies_with_trailers_are_read_whole():
    big = bytes(range(256)) * 1024   # 256 kB: many reads

    async def main():
        ref: list[Origin] = []

        async def handle(n, reader, writer):
            while (seen := await ref[0].read_request(n, reader)) is not None:
                if seen.target == "/big":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
                    for i in range(0, len(big), 10000):
                        writer.write(big[i:i + 10000])
                        await writer.drain()
                elif seen.target == "/chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n")
                    writer.write(b"5;ext=1\r\nhello\r\n")
                    await writer.drain()
                    writer.write(b"1\r\n \r\nA\r\n0123456789\r\n")
                    writer.write(b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")
                elif seen.target == "/empty":
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                elif seen.target == "/head":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
                elif seen.target == "/last":
                    writer.write(ok(b"bye", "Connection: close"))
                    await writer.drain()
                    return
                await writer.drain()

        async with Origin(handle) as origin:
            ref.append(origin)
            up = Upstream(origin.url, timeout=5)
            assert (await within(up.request("GET", "/big", []))).body == big
            chunked = await within(up.request("GET", "/chunked", []))
            assert chunked.body == b"hello 0123456789"
            assert chunked.header("transfer-encoding") == "chunked"
            empty = await within(up.request("DELETE", "/empty", []))
            assert (empty.status, empty.body) == (204, b"")
            head = await within(up.request("HEAD", "/head", []))
            assert (head.status, head.body) == (200, b"")
            # each body was read exactly to its end: every one of these was on the first connection
            assert origin.connections == 1
            last = await within(up.request("GET", "/last", []))
            assert last.body == b"bye"
            assert (await within(up.request("GET", "/big", []))).body == big   # "Connection: close": not kept
            assert origin.connections == 2
            up.close()
    run(main())


def test_upstream_urls():
    assert (Upstream("http://example.org").host, Upstream("http://example.org").port) == ("example.org", 80)
    assert Upstream("https://example.org").port == 443 and Upstream("https://example.org").ssl is not None
    assert Upstream("http://[::1]:8080").host == "::1" and Upstream("http://[::1]:8080").authority == "[::1]:8080"
    assert Upstream("unix:/run/monkestream.sock").unix_path == "/run/monkestream.sock"
    for bad in ["ftp://x", "example.org:80", "http://", ""]:
        with pytest.raises(ValueError):
            Upstream(bad)
