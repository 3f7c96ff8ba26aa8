"""The HTTP/1.1 server: one ``asyncio.Protocol`` per connection, answering through the router, and event streams.

Theory of operation
-------------------
Rule 1: this is the only module that touches transports. Bytes go into the
        sans-IO parser (``http11``); requests come out and are answered in
        order, one at a time per connection, so pipelined requests keep their
        order even when a handler awaits.
Rule 2: exceptions become responses in exactly one place (``_answer``): an
        ``HTTPError`` is its status with a JSON ``{"error": ...}`` body, a
        ``ProtocolError`` is its status hint and a closed connection, an
        ``Unavailable`` is a 503 with Retry-After (reported where it was
        raised), and anything else is a 500 that is logged once and counted.
Rule 3: a live event stream costs no task and no timer of its own: the hub writes
        to its transport, ``pause_writing``/``resume_writing`` drive the
        slow-consumer policy, and one shared tick sends heartbeats and closes
        streams that stalled or reached their maximum age.
Rule 4: every connection is bounded in time: a request's head and body must
        arrive within the header timeout (else 408), and an idle keep-alive
        connection closes after its timeout.
Rule 5: one clock. Every time the server reads and every timer it sets (the
        tick, connection timeouts, the shutdown grace) go through its
        ``Scheduler``, the hub's unless told otherwise, so the hub's
        ``paused_at`` and ``last_publish`` compare with the server's own times
        and tests run all of it on virtual time. (The TLS handshake timeout is
        asyncio's own; the ``Date`` header reads the wall clock.)
Rule 6: a full server sends browsers back later, not away. A stream request
        turned away (``--max-streams`` reached, shutting down, or no
        descriptor left: ``limits`` Rule 3) gets 503 with Retry-After, except
        from an EventSource (``Accept: text/event-stream``): any status but
        200 ends an EventSource for good (WHATWG HTML §9.2), so it gets a
        200 stream carrying only a ``retry:`` hint, and is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import heapq
import logging
import os
import random
import socket
import time
import weakref
from typing import Any, Awaitable, Callable, Iterable, cast

from . import http11
from .accesslog import AccessLog
from .clientaddr import UNIX_PEER, TrustedProxies
from .clock import Handle, Scheduler
from .config import Config
from .errors import ProtocolError, Unavailable
from .hub import CloseReason, Hub, Stream
from .jsontext import dumps
from .limits import Acceptor, listen, listen_unix
from .routing import EventStream, Exchange, HTTPError, Response, Result, Router, raw_path
from .sse import encode_comment, encode_retry

log = logging.getLogger("monkestream")

TICK_S = 0.5                 # the shared timer's longest period (heartbeats, stalls, max age)
MAX_STREAM_INPUT_BYTES = 64 * 1024   # what a streaming client may send before it is cut off
SHUTDOWN_GRACE_S = 5.0
LISTEN_BACKLOG = 4096
FULL_RETRY_JITTER = 3.0      # a full server's reconnection hint is --full-retry-ms times 1 to this
CATCH_UP_RETRY_MS = (100, 500)   # the reconnection hint for a stream closed with part of its backlog

SSE_HEADERS = (
    ("Cache-Control", "no-cache"),
    ("Content-Type", "text/event-stream"),
    ("Connection", "keep-alive"),
)
HEARTBEAT = encode_comment()
CORS_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Delete-Key"


class _Clock:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._text = ""

    def date(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._text = email.utils.formatdate(now, usegmt=True)
        return self._text


class Server:
    """Listens, answers requests through the router, and keeps the streams.

    ``scheduler`` is the clock and timers (Rule 5), the hub's by default;
    ``rng`` the jitter of reconnection hints and maximum ages.
    """

    def __init__(self, config: Config, hub: Hub, router: Router, *,
                 scheduler: Scheduler | None = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.hub = hub
        self.router = router
        self.scheduler: Scheduler = scheduler if scheduler is not None else hub.scheduler
        self.rng = rng if rng is not None else random.Random()
        self.connections: set[Connection] = set()
        self.connections_total = 0
        self.streams: set[Connection] = set()
        self.streams_by_client: dict[str, int] = {}
        self.requests_by_status: dict[int, int] = {}
        self.errors = 0
        self.turned_away = {"retry": 0, "503": 0}   # stream requests refused for want of room, by answer
        self.accepting = False
        self.acceptor: Acceptor | None = None
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._tick: Handle | None = None
        self._last_heartbeat = 0.0
        self.paused: set[Connection] = set()   # streams whose transport is full
        self._deadlines: list[tuple[float, int, weakref.ref[Connection]]] = []  # max age, lazily pruned
        self._tick_s = min(TICK_S, config.heartbeat / 2, config.stall_timeout / 2)
        self._clock = _Clock()
        self._origins = config.allowed_origins
        self.proxies = TrustedProxies.parse(config.trusted_proxies, relay_token=config.token,
                                            unix=bool(config.unix_socket))
        self.ssl_context: Any = None
        self.access_log: AccessLog | None = None   # set when --access-log is given
        router.describe("OPTIONS", "*", f"CORS preflight, on any path (allowed: {CORS_HEADERS})")

    # -- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        sockets = await listen(config.host, config.port, LISTEN_BACKLOG, reuse_port=config.reuse_port)
        if config.unix_socket:
            sockets.append(listen_unix(config.unix_socket, LISTEN_BACKLOG))
        self.acceptor = Acceptor(sockets, self._accepted, self.refusal, self.scheduler)
        self.acceptor.start()
        self.accepting = True
        self._last_heartbeat = self.scheduler.now()
        self._tick = self.scheduler.call_later(self._tick_s, self._on_tick)

    def _accepted(self, sock: socket.socket) -> None:
        """Make a transport for an accepted connection, as the loop's own server would (limits Rule 2)."""
        loop = asyncio.get_running_loop()
        tls = self.ssl_context
        setup = loop.connect_accepted_socket(
            lambda: Connection(self), sock, ssl=tls,
            ssl_handshake_timeout=self.config.header_timeout if tls is not None else None)
        task = loop.create_task(setup)
        self._handshakes.add(task)
        task.add_done_callback(self._set_up)

    def _set_up(self, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a connection failed to set up: %s", task.exception())  # a failed TLS handshake

    @property
    def port(self) -> int:
        assert self.acceptor is not None
        return self.acceptor.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, end every stream, let in-flight requests finish (bounded), close all."""
        self.accepting = False
        if self.acceptor is not None:
            self.acceptor.close()
            if self.config.unix_socket:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.unix_socket)
        for task in list(self._handshakes):
            task.cancel()
        if self._tick is not None:
            self._tick.cancel()
        self.hub.close_all_streams(CloseReason.SHUTDOWN)
        scheduler = self.scheduler
        deadline = scheduler.now() + SHUTDOWN_GRACE_S
        while any(c.busy for c in self.connections) and scheduler.now() < deadline:
            await scheduler.sleep(0.01)
        for conn in list(self.connections):
            conn.close()

    # -- the shared tick: heartbeats, stalled streams, maximum age -------------

    def _on_tick(self) -> None:
        """Run a heartbeat round once ``heartbeat`` has passed since the last; close stalled and aged streams.

        A round sends a comment line to every stream that is not paused and
        that opened, and last had an event of its topics, more than
        ``heartbeat`` seconds before it.
        """
        now = self.scheduler.now()
        config = self.config
        if now - self._last_heartbeat >= config.heartbeat:
            quiet_since = now - config.heartbeat
            for conn in list(self.streams):
                stream = conn.stream
                if stream is None or stream.paused:
                    continue
                if all(self.hub.topics[t].last_publish < quiet_since if t in self.hub.topics else True
                       for t in stream.topics) and conn.stream_started < quiet_since:
                    conn.send(HEARTBEAT)
            self._last_heartbeat = now
        for conn in list(self.paused):
            stream = conn.stream
            if stream is not None and stream.paused and now - stream.paused_at > config.stall_timeout:
                self.hub.close_stream(stream, CloseReason.PEER_GONE)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            conn = heapq.heappop(deadlines)[2]()
            if conn is not None and conn.stream is not None:
                self.hub.close_stream(conn.stream, CloseReason.MAX_AGE)
        self._tick = self.scheduler.call_later(self._tick_s, self._on_tick)

    # -- helpers for connections -----------------------------------------------

    def cors_origin(self, request: http11.Request | None) -> str | None:
        if "*" in self._origins:
            return "*"
        origin = request.header("origin") if request is not None else None
        return origin if origin in self._origins else None

    def count(self, status: int) -> None:
        self.requests_by_status[status] = self.requests_by_status.get(status, 0) + 1

    def render(self, status: int, body: bytes, content_type: str | None,
               headers: Iterable[tuple[str, str]], request: http11.Request | None,
               keep_alive: bool, head_only: bool = False) -> bytes:
        fields = [("Date", self._clock.date()), ("Server", "monkestream")]
        if content_type is not None:
            fields.append(("Content-Type", content_type))
        if status not in (204, 304) and not (100 <= status < 200):
            fields.append(("Content-Length", str(len(body))))
        origin = self.cors_origin(request)
        if origin is not None:
            fields.append(("Access-Control-Allow-Origin", origin))
            if origin != "*":
                fields.append(("Vary", "Origin"))
        fields.extend(headers)
        if not keep_alive:
            fields.append(("Connection", "close"))
        self.count(status)
        head = http11.response_head(status, fields)
        return head if head_only or status in (204, 304) else head + body

    def error_bytes(self, status: int, message: str, request: http11.Request | None,
                    keep_alive: bool, headers: Iterable[tuple[str, str]] = ()) -> bytes:
        body = dumps({"error": message}).encode()
        head_only = request is not None and request.method == "HEAD"
        return self.render(status, body, "application/json", headers, request, keep_alive, head_only)

    def admit_stream(self, client: str) -> None:
        """Raise HTTPError when one more stream would pass a limit (TurnedAway: Rule 6)."""
        if not self.accepting:
            raise TurnedAway("the server is shutting down", 1, int(self.config.retry_ms * self.rng.uniform(1.0, 1.5)))
        if len(self.streams) >= self.config.max_streams:
            raise TurnedAway("too many open streams", self.rng.randint(1, 5), self.full_retry_ms())
        per_client = self.config.max_streams_per_client
        if per_client and self.streams_by_client.get(client, 0) >= per_client:
            raise HTTPError(429, "too many open streams from this address", [("Retry-After", "5")])

    def full_retry_ms(self) -> int:
        return int(self.config.full_retry_ms * self.rng.uniform(1.0, FULL_RETRY_JITTER))

    def come_back_later(self, request: http11.Request, retry_ms: int) -> bytes:
        """A whole event stream of one ``retry:`` hint: an EventSource reconnects after it by itself (Rule 6)."""
        body = encode_comment("no room for a stream now: come back later") + encode_retry(retry_ms)
        return self.render(200, body, "text/event-stream", [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")],
                           request, False, request.method == "HEAD")

    def refusal(self, data: bytes) -> bytes:
        """The answer for a connection refused for want of a descriptor, from what it sent (limits Rule 3)."""
        parser = http11.RequestParser(max_body_bytes=self.config.max_body)
        try:
            parser.feed(data)
            request = parser.next_request()
        except ProtocolError:
            return b""
        if request is None:
            return b""  # nothing to answer yet: the close is the refusal (an EventSource retries after it)
        if wants_event_stream(request):
            return self.come_back_later(request, self.full_retry_ms())
        return self.error_bytes(503, "the server is at its open-file limit", request, False,
                                [("Retry-After", str(self.rng.randint(1, 5)))])

    def stream_opened(self, conn: Connection) -> None:
        self.streams.add(conn)
        self.streams_by_client[conn.client] = self.streams_by_client.get(conn.client, 0) + 1
        if self.config.max_stream_age > 0:
            age = self.config.max_stream_age * self.rng.uniform(0.8, 1.0)
            heapq.heappush(self._deadlines, (self.scheduler.now() + age, id(conn), weakref.ref(conn)))

    def stream_closed(self, conn: Connection) -> None:
        self.paused.discard(conn)
        if conn in self.streams:
            self.streams.discard(conn)
            left = self.streams_by_client.get(conn.client, 1) - 1
            if left:
                self.streams_by_client[conn.client] = left
            else:
                self.streams_by_client.pop(conn.client, None)


class TurnedAway(HTTPError):
    """No room for one more stream: 503 with Retry-After, or come back later for an EventSource (Rule 6)."""

    def __init__(self, message: str, retry_after_s: int, retry_ms: int) -> None:
        super().__init__(503, message, [("Retry-After", str(retry_after_s))])
        self.retry_ms = retry_ms


def wants_event_stream(request: http11.Request) -> bool:
    """Whether the request comes from an EventSource (or a client that reads like one)."""
    return "text/event-stream" in (request.header("accept") or "").lower()


def _discard(result: object) -> None:
    """An event stream that will never open gives back what its handler took (its reserved topics)."""
    if isinstance(result, EventStream) and result.on_close is not None:
        result.on_close()


class Connection(asyncio.Protocol):
    """One client connection: parses requests, writes responses, or carries one event stream."""

    __slots__ = ("server", "transport", "parser", "client", "busy", "closing", "stream",
                 "stream_started", "chunked", "_started", "_timer", "_task", "_reading_paused", "_on_close",
                 "_stream_input", "_awaiting_head", "_eof", "__weakref__")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser: http11.RequestParser | None = http11.RequestParser(max_body_bytes=server.config.max_body)
        self.client = ""
        self.busy = False
        self.closing = False
        self.stream: Stream | None = None
        self.stream_started = 0.0
        self.chunked = True
        self._started = server.scheduler.now()   # when the request being answered arrived
        self._timer: Handle | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._on_close: Callable[[], object] | None = None
        self._stream_input = 0
        self._awaiting_head = False
        self._eof = False

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else str(peer or UNIX_PEER)
        self.server.connections.add(self)
        self.server.connections_total += 1
        if not self.server.accepting:
            transport.abort()
            return
        self._arm(self.server.config.header_timeout, self._header_timeout)
        self._awaiting_head = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self._disarm()
        if self.stream is not None:
            self.server.hub.close_stream(self.stream, CloseReason.CLIENT)
        elif self in self.server.streams:
            self._stream_ended()  # opened but not live yet: _go_live may be cancelled before it runs
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.stream is not None or self.closing:
            self._stream_input += len(data)
            if self._stream_input > MAX_STREAM_INPUT_BYTES:
                self.close()
            return
        try:
            parser.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc, None)
            return
        self._process()

    def eof_received(self) -> bool | None:
        # No more requests will come. A stream's peer is gone (browsers never
        # half-close); a request in progress is still answered, then we close.
        self._eof = True
        if self.busy and self.stream is None and self not in self.server.streams:
            return True
        self.close()
        return False

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.server.paused.add(self)
            self.server.hub.pause(self.stream)
        elif self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.server.paused.discard(self)
            self.server.hub.resume(self.stream)
        elif self.transport is not None and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- timers -------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._awaiting_head = False
        self._timer = self.server.scheduler.call_later(delay, callback)

    def _disarm(self) -> None:
        self._awaiting_head = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_timeout(self) -> None:
        self._timer = None
        if not self.busy and self.stream is None:
            self.close()

    def _header_timeout(self) -> None:
        self._timer = None
        if not self.busy and self.stream is None and self.transport is not None:
            self._respond(None, self.server.error_bytes(408, "the request took too long to arrive", None, False))
            self.close()

    # -- requests -----------------------------------------------------------------

    def _process(self) -> None:
        """Answer every complete request buffered, in order, until one must wait."""
        server = self.server
        parser = self.parser
        while parser is not None and not self.busy and not self.closing and self.stream is None:
            try:
                request = parser.next_request()
            except ProtocolError as exc:
                self._protocol_error(exc, None)
                return
            if request is None:
                if parser.wants_continue and self.transport is not None:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    parser.continue_sent()
                if parser.in_progress:
                    if not self._awaiting_head:
                        self._arm(server.config.header_timeout, self._header_timeout)
                        self._awaiting_head = True
                else:
                    self._arm(server.config.keepalive_timeout, self._idle_timeout)
                return
            self._disarm()
            self._dispatch(request)

    def _dispatch(self, request: http11.Request) -> None:
        server = self.server
        self._started = server.scheduler.now()
        if request.method == "OPTIONS":
            self._preflight(request)
            return
        try:
            handler, params = server.router.match(request.method, raw_path(request.target))
            result = handler(Exchange(request, params, server.proxies.client(self.client, request)))
        except Exception as exc:  # noqa: BLE001 - translated to a response in one place
            self._answer(request, exc)
            return
        if isinstance(result, (Response, EventStream)):
            self._answer(request, result)
            return
        self.busy = True
        self._task = asyncio.ensure_future(self._finish(request, result))

    async def _finish(self, request: http11.Request, pending: Awaitable[Result]) -> None:
        try:
            result: Result | BaseException = await pending
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated to a response in one place
            result = exc
        self.busy = False
        self._task = None
        if self.closing:
            _discard(result)
            return
        self._answer(request, result)
        if not self.closing and self.stream is None:
            self._process()

    def _answer(self, request: http11.Request, result: Result | BaseException) -> None:
        """Write the response for ``result``; the one place exceptions become responses."""
        transport = self.transport
        if transport is None or self.closing:
            _discard(result)
            return
        server = self.server
        keep_alive = request.keep_alive and server.accepting
        if isinstance(result, EventStream):
            client = server.proxies.client(self.client, request)
            try:
                server.admit_stream(client)
            except HTTPError as exc:
                _discard(result)
                result = exc
                if isinstance(exc, TurnedAway):
                    keep_alive = False   # a descriptor is what a full server is short of
                    if wants_event_stream(request):
                        server.turned_away["retry"] += 1
                        self._respond(request, server.come_back_later(request, exc.retry_ms))
                        self.close()
                        return
                    server.turned_away["503"] += 1
            else:
                self.client = client  # no request follows a stream: it counts against its client's cap
                self._open_stream(request, result)
                return
        if isinstance(result, Response):
            data = server.render(result.status, result.body, result.content_type, result.headers,
                                 request, keep_alive, request.method == "HEAD")
        elif isinstance(result, HTTPError):
            data = server.error_bytes(result.status, result.message, request, keep_alive, result.headers)
        elif isinstance(result, ProtocolError):
            self._protocol_error(result, request)
            return
        elif isinstance(result, Unavailable):
            data = server.error_bytes(503, str(result), request, keep_alive, [("Retry-After", str(result.retry_after))])
        else:
            server.errors += 1
            log.error("error answering %s %s", request.method, request.path, exc_info=result)
            data = server.error_bytes(500, "internal error", request, keep_alive)
        self._respond(request, data)
        if not keep_alive or self._eof:
            self.close()

    def _respond(self, request: http11.Request | None, data: bytes) -> None:
        """Write a whole response, or a stream's head, and note it in the access log."""
        assert self.transport is not None
        self.transport.write(data)
        access = self.server.access_log
        if access is not None:
            client = self.client if request is None else self.server.proxies.client(self.client, request)
            access.response(client, request, data, self.server.scheduler.now() - self._started)

    def _preflight(self, request: http11.Request) -> None:
        server = self.server
        headers = [("Allow", CORS_METHODS)]
        if server.cors_origin(request) is not None:
            headers += [
                ("Access-Control-Allow-Methods", CORS_METHODS),
                ("Access-Control-Allow-Headers", CORS_HEADERS),
                ("Access-Control-Max-Age", "86400"),
            ]
        keep_alive = request.keep_alive and server.accepting
        assert self.transport is not None
        self._respond(request, server.render(204, b"", None, headers, request, keep_alive))
        if not keep_alive:
            self.close()

    def _protocol_error(self, exc: ProtocolError, request: http11.Request | None) -> None:
        if self.transport is not None and not self.closing:
            self._respond(request, self.server.error_bytes(exc.status_hint, str(exc), request, False))
        self.close()

    # -- event streams --------------------------------------------------------------

    def _open_stream(self, request: http11.Request, spec: EventStream) -> None:
        server = self.server
        self.chunked = request.version == "1.1"
        fields = [*SSE_HEADERS]
        origin = server.cors_origin(request)
        if origin is not None:
            fields.append(("Access-Control-Allow-Origin", origin))
            if origin != "*":
                fields.append(("Vary", "Origin"))
        fields.append(("X-Accel-Buffering", "no"))
        if self.chunked:
            fields.append(("Transfer-Encoding", "chunked"))
        server.count(200)
        self._respond(request, http11.response_head(200, fields))
        if request.method == "HEAD":
            _discard(spec)
            self.close()
            return
        self._on_close = spec.on_close
        self.busy = True
        server.stream_opened(self)
        self.stream_started = server.scheduler.now()
        if server.access_log is not None:
            server.access_log.stream_opened(self, self.client, request, self.stream_started)
        retry_ms = int(server.config.retry_ms * server.rng.uniform(1.0, 1.5))
        self.send(encode_retry(retry_ms))
        self._task = asyncio.ensure_future(self._go_live(spec))

    async def _go_live(self, spec: EventStream) -> None:
        try:
            start = await spec.prepare() if spec.prepare is not None else None
            failed = False
        except asyncio.CancelledError:
            self._stream_ended()
            raise
        except Exception:  # noqa: BLE001 - a task root: counted and logged
            self.server.errors += 1
            log.exception("error preparing a stream")
            start, failed = None, True
        self.busy = False
        self._task = None
        if self.closing or failed:
            self._stream_ended("error" if failed else CloseReason.CLIENT.value)
            self.close()
            return
        transport = self.transport
        assert transport is not None
        cap = spec.cap_bytes or self.server.config.stream_buffer
        transport.set_write_buffer_limits(high=cap // 2)
        stream = Stream(spec.topics, self, send_framed=transport.write if self.chunked else None,
                        cap_bytes=cap)
        self.stream = stream
        self.parser = None  # no request follows an event stream on its connection
        try:
            self.server.hub.open_stream(stream, start)
        except Exception:  # noqa: BLE001 - a task root: counted and logged
            self.server.errors += 1
            log.exception("error starting a stream")
            self.stream = None
            self._stream_ended("error")
            self.close()

    # -- hub.Sink ---------------------------------------------------------------------

    def send(self, frames: bytes) -> None:
        """Write SSE frames, chunk-framed on HTTP/1.1."""
        if self.transport is not None and not self.closing:
            self.transport.write(http11.chunk(frames) if self.chunked else frames)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def hub_closed(self, reason: CloseReason) -> None:
        log.debug("stream from %s closed: %s", self.client, reason.value)
        self._stream_ended(reason.value)
        if reason is CloseReason.CATCH_UP:  # the rest of its backlog is owed at once
            self.send(encode_retry(self.server.rng.randint(*CATCH_UP_RETRY_MS)))
        if reason is not CloseReason.CLIENT and self.transport is not None and not self.closing:
            if self.chunked:
                self.transport.write(http11.LAST_CHUNK)
            self.close()

    def _stream_ended(self, reason: str = CloseReason.CLIENT.value) -> None:
        self.server.stream_closed(self)
        if self.server.access_log is not None:
            self.server.access_log.stream_closed(self, reason, self.server.scheduler.now())
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            try:
                on_close()
            except Exception:  # noqa: BLE001 - a callback root: counted and logged
                self.server.errors += 1
                log.exception("error closing a stream")

    def close(self) -> None:
        if self.closing and self.transport is None:
            return
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()
            if self.transport.get_write_buffer_size():
                # close() waits for the buffer to drain: a peer that stopped reading
                # would keep the socket and its buffer forever
                self._timer = self.server.scheduler.call_later(self.server.config.stall_timeout, self.transport.abort)
