"""A small HTTP/1.1 client for a relay's upstream: requests forwarded, and event streams read.

The upstream is another monkestream, at ``http://HOST:PORT``, ``https://HOST:PORT``
or ``unix:/PATH`` (the workers of one machine), so this client speaks only the
HTTP that server speaks: bodies with Content-Length or chunked, keep-alive.

Theory of operation
-------------------
Rule 1: a request is sent on an idle kept-alive connection when there is one,
        else on a new one. Only a failure before any byte of the answer, on a
        reused connection, is retried (once, on a new one): the upstream
        closed an idle connection, and never saw the request.
Rule 2: every step has a deadline (``timeout``); a connection that fails or
        times out is closed, never reused. Failures raise ``UpstreamError``.
Rule 3: an event stream's body is read as it arrives, chunk by chunk, on a
        connection of its own that is never reused; ``split_frames`` reads
        its frames, with the fields a relay needs (``topic``, ``keep``).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import AsyncIterator, NamedTuple
from urllib.parse import urlsplit

from .clock import AsyncioScheduler, Scheduler, within

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
IDLE_KEPT = 8                    # idle connections kept for forwarded requests
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"})


class UpstreamError(Exception):
    """The upstream could not be reached, or answered with broken HTTP."""


class Answer(NamedTuple):
    """A response read whole."""

    status: int
    headers: list[tuple[str, str]]   # names in lower case
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class Upstream:
    """Where a relay's events come from and its writes go."""

    def __init__(self, url: str, *, timeout: float = 10.0, scheduler: Scheduler | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.timeout = timeout
        self.scheduler: Scheduler = scheduler if scheduler is not None else AsyncioScheduler()
        self.unix_path: str | None = None
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "unix":
            self.unix_path = parts.path
            self.host, self.port = "localhost", 0
            self.authority = "localhost"
        elif parts.scheme in ("http", "https") and parts.hostname:
            self.host = parts.hostname
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
            self.authority = parts.netloc
            if parts.scheme == "https":
                self.ssl = ssl.create_default_context()
        else:
            raise ValueError(f"{url!r} is not http://HOST:PORT, https://HOST:PORT or unix:/PATH")
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self.unix_path is not None:
                opening = asyncio.open_unix_connection(self.unix_path, limit=MAX_HEAD_BYTES)
            else:
                opening = asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=MAX_HEAD_BYTES)
            return await within(self.scheduler, self.timeout, opening)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from None

    def _head(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.authority}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP_BY_HOP]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes = b"") -> Answer:
        """Send one request and read its whole answer (Rules 1 and 2)."""
        data = self._head(method, target, headers, body) + body
        while True:
            reused = bool(self._idle)
            reader, writer = self._idle.pop() if reused else await self._connect()
            try:
                writer.write(data)
                answer, keep = await within(self.scheduler, self.timeout, self._read_answer(reader, method))
            except _NothingRead:
                writer.close()
                if reused:
                    continue  # the upstream had closed it while idle (Rule 1)
                raise UpstreamError(f"{self.url} closed the connection without an answer") from None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, UpstreamError) as exc:
                writer.close()
                raise UpstreamError(f"{self.url}: {exc or type(exc).__name__}") from None
            except BaseException:  # cancelled: the answer is unread, the connection unusable
                writer.close()
                raise
            if keep and len(self._idle) < IDLE_KEPT:
                self._idle.append((reader, writer))
            else:
                writer.close()
            return answer

    async def _read_answer(self, reader: asyncio.StreamReader, method: str) -> tuple[Answer, bool]:
        status, headers = await _read_head(reader)
        fields = dict(headers)
        keep = fields.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return Answer(status, headers, b""), keep
        if "chunked" in fields.get("transfer-encoding", "").lower():
            parts = [part async for part in _chunks(reader)]
            return Answer(status, headers, b"".join(parts)), keep
        if "content-length" in fields:
            length = int(fields["content-length"])
            if not 0 <= length <= MAX_BODY_BYTES:
                raise UpstreamError(f"a body of {length} bytes")
            return Answer(status, headers, await reader.readexactly(length)), keep
        return Answer(status, headers, await reader.read(MAX_BODY_BYTES)), False

    async def stream(self, target: str, headers: list[tuple[str, str]]) -> EventBody:
        """Open an event stream (Rule 3): its status and headers are read; its body is read by iterating."""
        reader, writer = await self._connect()
        try:
            writer.write(self._head("GET", target, [*headers, ("Accept", "text/event-stream")], b""))
            status, fields = await within(self.scheduler, self.timeout, _read_head(reader))
        except _NothingRead:
            writer.close()
            raise UpstreamError(f"{self.url} closed the connection without an answer") from None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, UpstreamError) as exc:
            writer.close()
            raise UpstreamError(f"{self.url}: {exc or type(exc).__name__}") from None
        return EventBody(status, fields, reader, writer)

    def close(self) -> None:
        for _reader, writer in self._idle:
            writer.close()
        self._idle.clear()


class EventBody:
    """An open event stream's answer; iterate it for the body's bytes as they arrive."""

    def __init__(self, status: int, headers: list[tuple[str, str]],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer
        fields = dict(headers)
        self._chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        length = fields.get("content-length", "")
        # an answer that is not a stream (an error) ends at its length, not when the upstream closes
        self._length = int(length) if length.isdigit() and not self._chunked else None

    async def read_all(self, limit: int = MAX_BODY_BYTES) -> bytes:
        """The whole body, for an answer that is not a stream (an error)."""
        parts: list[bytes] = []
        size = 0
        async for part in self:
            parts.append(part)
            size += len(part)
            if size > limit:
                break
        return b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._chunked:
            return _chunks(self._reader)
        return _until_eof(self._reader) if self._length is None else _sized(self._reader, self._length)

    def close(self) -> None:
        self._writer.close()


class Frame(NamedTuple):
    """One frame of an event stream, with the fields a relay reads."""

    raw: bytes
    id: str | None
    event: str | None
    data: str | None
    topic: str | None
    keep: bool


def split_frames(buffer: bytes) -> tuple[list[Frame], bytes]:
    """The complete frames at the start of ``buffer`` and what is left of it.

    The upstream is a monkestream, whose frames end their lines with LF only.
    """
    frames = []
    start = 0
    while (end := buffer.find(b"\n\n", start)) != -1:
        raw = buffer[start:end + 2]
        start = end + 2
        fields: dict[str, str] = {}
        data: list[str] = []
        for line in raw[:-2].decode("utf-8", "replace").split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
        if data or "id" in fields:
            frames.append(Frame(raw, fields.get("id"), fields.get("event"), "\n".join(data) if data else None,
                                fields.get("topic"), fields.get("keep") != "0"))
    return frames, buffer[start:]


class _NothingRead(Exception):
    """The connection ended before the first byte of an answer."""


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]]]:
    try:
        first = await reader.readexactly(1)
    except (asyncio.IncompleteReadError, ConnectionError):  # an end or a reset before any byte (Rule 1)
        raise _NothingRead() from None
    head = first + await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise UpstreamError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise UpstreamError(f"a broken header line: {line[:60]!r}")
        headers.append((name.strip().lower(), value.strip()))
    return int(rest[:3]), headers


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A chunked body's data, chunk by chunk (RFC 9112 §7.1), until the last chunk."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the end
                pass
            return
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise ValueError("a chunk does not end with CRLF")
        yield data[:-2]


async def _sized(reader: asyncio.StreamReader, length: int) -> AsyncIterator[bytes]:
    while length > 0:
        data = await reader.read(min(length, 65536))
        if not data:
            return
        length -= len(data)
        yield data


async def _until_eof(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(65536):
        yield data
