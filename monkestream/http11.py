"""Sans-IO HTTP/1.1: request parsing, response heads and chunked framing.

Theory of operation
-------------------
Bytes go in through ``RequestParser.feed()``; complete requests come out of
``RequestParser.next_request()``, one per call, in arrival order, and ``None``
means "feed me more". Nothing here reads a socket, keeps a clock or imports
asyncio; responses are built by the pure functions at the bottom.

Rule 1: a request comes out only whole. ``next_request()`` returns a
``Request`` once its head and its entire body are buffered; the bytes that
follow it stay buffered for the next call, so pipelined requests come out one
per call.

Rule 2: ambiguity is an error. Request smuggling lives in the gap between two
parsers that frame the same bytes differently (RFC 9112 §6.3, §11.2), so what
a lenient parser might read two ways is refused: bare CR or LF, obs-fold,
space before a colon, Content-Length together with Transfer-Encoding, several
Content-Length fields (even equal ones), Content-Length lists, any transfer
coding other than a lone ``chunked``, several Host fields.

Rule 3: a ProtocolError poisons the parser. Every later ``feed()`` and
``next_request()`` raises the same error, so no byte left over after a
framing error is ever read as a request.

Rule 4: every buffer has a bound, checked as soon as the bytes that break it
are buffered rather than when the terminator finally arrives: request line
(414), head and field count (431), declared or decoded body (413, raised from
the head when Content-Length says so), chunk-size lines, trailers and empty
lines before a request. The caller bounds what it feeds by pausing reads
while requests are pending. A TLS
ClientHello, an HTTP/0.9 line or the HTTP/2 preface fail on their first bad
byte or first line, not after 16 KiB.

Rule 5: the outcome depends on the bytes, never on how they were split.
Checks made early on a partial head (bad bytes in the request line, bare CR
or LF in the fields, lengths) are the same checks, in the same order, that a
complete head gets, so feeding a request whole or one byte at a time yields
the same requests or the same status.

Rule 6: a head is scanned once. When it is incomplete, the parser remembers
how far it searched and resumes there on the next feed.

Rule 7: after a request that does not keep the connection alive, the parser
is closed: ``next_request()`` returns None and later bytes are dropped.

Choices where RFC 9112 / RFC 9110 leave room:

- When a request breaks several rules, its status follows this order: bytes
  and shape of the request line (400), method token (400), HTTP version
  (505), known method (501), request-target (400), field syntax (400), field
  count (431), Host (400), framing (400 when ambiguous, 501 for a coding
  other than chunked, 400 for a malformed length, 413, 411), Expect (417).
- Absolute-form targets (``http://host/path``) are accepted, as RFC 9112 §3.2.2
  requires, and reduced to their path and query; Host is still required.
  ``*`` is accepted for OPTIONS only; authority-form is refused.
- A fragment (``#``) in the request-target is refused; it is not part of the
  grammar. A path whose percent-decoding is malformed, is not UTF-8, or holds
  a control character (NUL, CR, LF...) is refused.
- An empty Host is refused, although RFC 9110 §7.2 allows it for some targets;
  HTTP/1.0 requests may omit Host but never repeat it.
- Content-Length has at most 18 digits; longer values are refused with 400.
- Trailer fields are checked like head fields, then discarded.
- ``Expect: 100-continue`` is ignored on HTTP/1.0 (RFC 9110 §10.1.1) and when
  there is no body to wait for; any other expectation gets 417.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, unquote_to_bytes

from monkestream.errors import ProtocolError

__all__ = [
    "LAST_CHUNK",
    "MAX_BODY_BYTES",
    "MAX_CHUNK_EXT_BYTES",
    "MAX_HEAD_BYTES",
    "MAX_HEADERS",
    "MAX_REQUEST_LINE_BYTES",
    "REASONS",
    "Request",
    "RequestParser",
    "chunk",
    "response_head",
]

MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_BODY_BYTES = 1024 * 1024
MAX_CHUNK_EXT_BYTES = 256
MAX_CHUNK_SIZE_DIGITS = 16
MAX_TRAILER_BYTES = 4 * 1024
MAX_CONTENT_LENGTH_DIGITS = 18
MAX_EMPTY_LINES = 8

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_METHODS_NEEDING_LENGTH = frozenset({"POST", "PUT", "PATCH"})

# RFC 9110 §5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" /
#   "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
_TCHAR = r"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TCHAR.encode() + rb"+")
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version; the
# common case in one match, anything else goes through _diagnose_line().
_REQUEST_LINE = re.compile(
    rb"(GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH) ([\x21-\x7e]+) HTTP/1\.([01])"
)
_VERSION_SHAPE = re.compile(rb"HTTP/[0-9]\.[0-9]")
_NOT_LINE_BYTE = re.compile(rb"[^\x20-\x7e]")
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS, on the
# latin-1 text of the field block; field-value allows HTAB, SP, VCHAR, obs-text.
_FIELD_BLOCK = re.compile(r"(?:" + _TCHAR + r"+:[\t\x20-\x7e\x80-\xff]*\r\n)+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# RFC 3986 §3.2.2, narrowed: reg-name as unreserved characters, or an IP
# literal in brackets, then an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~]+)(?::[0-9]{1,5})?")
_ABSOLUTE_FORM = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?]*)(.*)")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_BAD_PERCENT_STR = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 9112 §7.1.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
#   chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
_QUOTED_STRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_TOKEN_B = _TCHAR.encode() + rb"+"
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)((?:[ \t]*;[ \t]*" + _TOKEN_B
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN_B + rb"|" + _QUOTED_STRING + rb"))?)*)"
)
_MAX_CHUNK_LINE_BYTES = MAX_CHUNK_SIZE_DIGITS + MAX_CHUNK_EXT_BYTES
_FRAMING_FIELDS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "expect"}
)

# Parser states, as plain ints: they are compared on every call.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _CLOSED = range(7)


@dataclass(slots=True)
class Request:
    """One complete HTTP/1.x request, body included."""

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """Return the first value of the lower-case field ``name``, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def query_params(self) -> dict[str, list[str]]:
        """Decode the query string like ``parse_qs(keep_blank_values=True)``.

        Raises ProtocolError(400) on malformed percent-encoding or invalid UTF-8.
        """
        query = self.query
        if _BAD_PERCENT_STR.search(query):
            raise ProtocolError("malformed percent-encoding in query")
        try:
            return parse_qs(query, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise ProtocolError("query is not UTF-8") from None


class RequestParser:
    """Turn bytes from one connection into ``Request`` objects.

    Call ``feed()`` with whatever arrived, then ``next_request()`` until it
    returns None. ProtocolError is the only exception either raises because
    of the peer; its ``status_hint`` is the status to answer with.
    """

    __slots__ = (
        "_max_body",
        "_buf",
        "_state",
        "_error",
        "_scanned",
        "_line_end",
        "_line",
        "_empty_lines",
        "_pending",
        "_body",
        "_left",
        "_expect_continue",
    )

    def __init__(self, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        self._max_body = max_body_bytes
        self._buf = bytearray()
        self._state = _HEAD
        self._error: ProtocolError | None = None
        # How far the current line or head was searched (Rule 6).
        self._scanned = 0
        # Index of the request line's CRLF, or -1 while the line is incomplete.
        self._line_end = -1
        self._line: tuple[str, str, str, str, str] | None = None
        self._empty_lines = 0
        self._pending: Request | None = None
        self._body = bytearray()
        # Bytes still expected: of the Content-Length body, or of the chunk.
        self._left = 0
        self._expect_continue = False

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._state != _CLOSED:
            self._buf += data

    def next_request(self) -> Request | None:
        """Return the next complete request, or None when more bytes are needed.

        Raises ProtocolError when the peer broke HTTP/1.1; the parser then
        stays broken (Rule 3).
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            self._body.clear()
            self._pending = None
            self._expect_continue = False
            raise

    @property
    def in_progress(self) -> bool:
        """Tell whether part of a request is buffered but not complete yet."""
        return bool(self._buf) or self._pending is not None

    @property
    def wants_continue(self) -> bool:
        """Tell whether a ``100 Continue`` should be sent before the body comes."""
        return self._expect_continue

    def continue_sent(self) -> None:
        """Record that ``100 Continue`` was sent."""
        self._expect_continue = False

    # -- state machine -----------------------------------------------------

    def _next(self) -> Request | None:
        state = self._state
        if state == _HEAD:
            if not self._read_head():
                return None
            state = self._state
        if state == _BODY:
            buf = self._buf
            left = self._left
            if left:
                if len(buf) < left:
                    return None
                self._pending.body = bytes(buf[:left])
                del buf[:left]
        elif state == _CLOSED:
            return None
        elif not self._read_chunked():
            return None
        return self._finish()

    def _finish(self) -> Request:
        request = self._pending
        self._pending = None
        self._expect_continue = False
        self._empty_lines = 0
        if request.keep_alive:
            self._state = _HEAD
        else:
            # Rule 7: nothing after this request is read.
            self._state = _CLOSED
            self._buf.clear()
        return request

    # -- head ----------------------------------------------------------------

    def _read_head(self) -> bool:
        buf = self._buf
        line_end = self._line_end
        if line_end < 0:
            # RFC 9112 §2.2: empty lines before a request line may be ignored.
            while buf.startswith(b"\r\n"):
                del buf[:2]
                self._empty_lines += 1
                if self._empty_lines > MAX_EMPTY_LINES:
                    raise ProtocolError("too many empty lines before the request line")
            if not buf:
                return False
            line_end = buf.find(
                b"\r\n", max(0, self._scanned - 1), MAX_REQUEST_LINE_BYTES + 2
            )
            if line_end < 0:
                self._check_partial_line()
                return False
            self._line = _parse_request_line(buf, line_end)
            self._line_end = line_end
            self._scanned = line_end
        end = buf.find(b"\r\n\r\n", max(line_end, self._scanned - 3))
        if end < 0 or end + 4 > MAX_HEAD_BYTES:
            self._check_partial_head(end < 0)
            return False
        if end == line_end:
            headers: list[tuple[str, str]] = []
        else:
            headers = _parse_fields(buf[line_end + 2 : end + 2].decode("latin-1"))
        del buf[: end + 4]
        self._line_end = -1
        self._scanned = 0
        self._start_body(headers)
        return True

    def _check_partial_line(self) -> None:
        buf = self._buf
        high = len(buf)
        if buf[-1] == 13:
            high -= 1  # a CR at the end may be the start of CRLF
        match = _NOT_LINE_BYTE.search(buf, self._scanned, min(high, MAX_REQUEST_LINE_BYTES + 1))
        if match is not None:
            if buf[0] == 0x16:
                raise ProtocolError("TLS handshake on a plain HTTP port")
            raise ProtocolError("invalid byte in request line")
        if high > MAX_REQUEST_LINE_BYTES:
            raise ProtocolError("request line too long", 414)
        self._scanned = high

    def _check_partial_head(self, incomplete: bool) -> None:
        buf = self._buf
        high = min(len(buf), MAX_HEAD_BYTES)
        if incomplete and high == len(buf) and buf[-1] == 13:
            high -= 1
        low = max(self._line_end + 2, self._scanned)
        match = _BARE_CR_OR_LF.search(buf, low)
        if match is not None and match.start() < high:
            raise ProtocolError("bare CR or LF in header fields")
        if not incomplete or len(buf) >= MAX_HEAD_BYTES:
            raise ProtocolError("request head too large", 431)
        self._scanned = high

    def _start_body(self, headers: list[tuple[str, str]]) -> None:
        method, target, path, query, version = self._line
        hosts = 0
        length = coding = connection = expect = None
        for name, value in headers:
            if name not in _FRAMING_FIELDS:
                continue
            if name == "host":
                hosts += 1
                if _HOST.fullmatch(value) is None:
                    raise ProtocolError("invalid Host")
            elif name == "content-length":
                if length is not None:
                    raise ProtocolError("several Content-Length fields")
                length = value
            # RFC 9110 §5.3: repeated list fields read as one comma-joined list.
            elif name == "transfer-encoding":
                coding = value if coding is None else f"{coding}, {value}"
            elif name == "connection":
                connection = value if connection is None else f"{connection}, {value}"
            else:
                expect = value if expect is None else f"{expect}, {value}"
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1; never several.
        if hosts != 1 and (hosts or version == "1.1"):
            raise ProtocolError("missing Host" if hosts == 0 else "several Host fields")

        if version == "1.1":
            keep_alive = connection is None or "close" not in _tokens(connection)
        else:
            # RFC 9112 §9.3: HTTP/1.0 persists only when the client asks.
            tokens = _tokens(connection) if connection is not None else ()
            keep_alive = "keep-alive" in tokens and "close" not in tokens

        # RFC 9112 §6.3: framing, refusing every ambiguous combination.
        chunked = False
        size = 0
        if coding is not None:
            if length is not None:
                raise ProtocolError("both Content-Length and Transfer-Encoding")
            if version == "1.0":
                raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
            if coding.lower() != "chunked":
                if not any(_tokens(coding)):
                    raise ProtocolError("empty Transfer-Encoding")
                raise ProtocolError("unsupported transfer coding", 501)
            chunked = True
        elif length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError("invalid Content-Length")
            if len(length) > MAX_CONTENT_LENGTH_DIGITS:
                raise ProtocolError("Content-Length too long")
            size = int(length)
            if size > self._max_body:
                raise ProtocolError("request body too large", 413)
        elif method in _METHODS_NEEDING_LENGTH:
            raise ProtocolError("Content-Length required", 411)

        wants_continue = False
        if expect is not None:
            # RFC 9110 §10.1.1: 100-continue is the only expectation defined.
            if expect.lower() != "100-continue":
                raise ProtocolError("unsupported expectation", 417)
            wants_continue = version == "1.1" and (chunked or size > 0)

        self._pending = Request(
            method, target, path, query, version, headers, b"", keep_alive
        )
        if chunked:
            self._state = _CHUNK_SIZE
            self._body = bytearray()
        else:
            self._state = _BODY
            self._left = size
        if wants_continue:
            # Cleared by continue_sent() or when the request completes.
            self._expect_continue = True

    # -- chunked body ------------------------------------------------------

    def _read_chunked(self) -> bool:
        buf = self._buf
        while True:
            state = self._state
            if state == _CHUNK_DATA:
                take = min(self._left, len(buf))
                if take == 0:
                    return False
                self._body += buf[:take]
                del buf[:take]
                self._left -= take
                if self._left:
                    return False
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                # RFC 9112 §7.1: chunk-data is followed by exactly CRLF.
                if len(buf) < 2:
                    if buf and buf[0] != 13:
                        raise ProtocolError("chunk data not followed by CRLF")
                    return False
                if buf[0] != 13 or buf[1] != 10:
                    raise ProtocolError("chunk data not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                if not self._read_chunk_size():
                    return False
            else:
                return self._read_trailer()

    def _read_chunk_size(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n", 0, _MAX_CHUNK_LINE_BYTES + 2)
        if end < 0:
            high = len(buf) - (1 if buf and buf[-1] == 13 else 0)
            if high > _MAX_CHUNK_LINE_BYTES:
                raise ProtocolError("chunk-size line too long")
            return False
        match = _CHUNK_LINE.fullmatch(buf, 0, end)
        if match is None:
            raise ProtocolError("invalid chunk-size line")
        digits, extension = match.groups()
        if len(digits) > MAX_CHUNK_SIZE_DIGITS:
            raise ProtocolError("chunk size has too many digits")
        if len(extension) > MAX_CHUNK_EXT_BYTES:
            raise ProtocolError("chunk extension too long")
        size = int(digits, 16)
        del buf[: end + 2]
        if size == 0:
            self._state = _TRAILER
            self._scanned = 0
            return True
        if len(self._body) + size > self._max_body:
            raise ProtocolError("request body too large", 413)
        self._left = size
        self._state = _CHUNK_DATA
        return True

    def _read_trailer(self) -> bool:
        buf = self._buf
        if buf[:2] == b"\r\n":
            del buf[:2]
        else:
            end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end < 0 or end + 4 > MAX_TRAILER_BYTES:
                if end >= 0 or len(buf) >= MAX_TRAILER_BYTES:
                    raise ProtocolError("trailer section too large", 431)
                self._scanned = len(buf)
                return False
            # RFC 9110 §6.5.1: trailer fields may be discarded; they are
            # still checked, so a malformed one fails like a head field.
            _parse_fields(buf[: end + 2].decode("latin-1"))
            del buf[: end + 4]
            self._scanned = 0
        self._pending.body = bytes(self._body)
        self._body = bytearray()
        return True


def _parse_request_line(
    buf: bytearray, end: int
) -> tuple[str, str, str, str, str]:
    match = _REQUEST_LINE.fullmatch(buf, 0, end)
    if match is None:
        return _diagnose_line(bytes(buf[:end]))
    method, target, minor = match.groups()
    path, query = _split_target(method, target)
    return (
        method.decode("ascii"),
        target.decode("ascii"),
        path,
        query,
        "1.1" if minor == b"1" else "1.0",
    )


def _diagnose_line(line: bytes) -> tuple[str, str, str, str, str]:
    """Parse a request line the fast pattern refused, or say what is wrong."""
    if _NOT_LINE_BYTE.search(line):
        raise ProtocolError("invalid byte in request line")
    parts = line.split(b" ")
    if len(parts) == 2 and all(parts):
        raise ProtocolError("request line without HTTP version (HTTP/0.9)")
    if len(parts) != 3 or not all(parts):
        raise ProtocolError("malformed request line")
    method, target, version = parts
    if _TOKEN.fullmatch(method) is None:
        raise ProtocolError("invalid method")
    if line == b"PRI * HTTP/2.0":
        raise ProtocolError("HTTP/2 connection preface on an HTTP/1.1 port")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if _VERSION_SHAPE.fullmatch(version):
            raise ProtocolError("HTTP version not supported", 505)
        raise ProtocolError("invalid HTTP version")
    if method.decode("ascii") not in KNOWN_METHODS:
        raise ProtocolError("method not implemented", 501)
    # Unreachable: a line passing every check above matches _REQUEST_LINE.
    raise AssertionError(line)


def _split_target(method: bytes, target: bytes) -> tuple[str, str]:
    """Return (decoded path, raw query) of a request-target (RFC 9112 §3.2)."""
    if target[0] != 0x2F:  # "/"
        if target == b"*":
            if method != b"OPTIONS":
                raise ProtocolError("asterisk-form is only for OPTIONS")
            return "*", ""
        match = _ABSOLUTE_FORM.fullmatch(target)
        if match is None:
            raise ProtocolError("request-target must be origin-form")
        authority, rest = match.groups()
        if _HOST.fullmatch(authority.decode("ascii")) is None:
            raise ProtocolError("invalid authority in absolute-form target")
        if not rest[:1] == b"/":
            rest = b"/" + rest
        target = rest
    if b"#" in target:
        raise ProtocolError("fragment in request-target")
    raw_path, _, query = target.partition(b"?")
    if b"%" not in raw_path:
        return raw_path.decode("ascii"), query.decode("ascii")
    if _BAD_PERCENT.search(raw_path):
        raise ProtocolError("malformed percent-encoding in path")
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("path is not UTF-8") from None
    if _CONTROL.search(path):
        raise ProtocolError("control character in path")
    return path, query.decode("ascii")


def _parse_fields(text: str) -> list[tuple[str, str]]:
    """Split a field block (latin-1 text, each line ending in CRLF) into pairs."""
    if _FIELD_BLOCK.fullmatch(text) is None:
        _diagnose_fields(text)
    lines = text.split("\r\n")
    lines.pop()
    if len(lines) > MAX_HEADERS:
        raise ProtocolError("too many header fields", 431)
    fields = []
    for line in lines:
        name, _, value = line.partition(":")
        fields.append((name.lower(), value.strip(" \t")))
    return fields


def _diagnose_fields(text: str) -> None:
    for line in text[:-2].split("\r\n"):
        if line[:1] in (" ", "\t"):
            raise ProtocolError("obsolete line folding in header fields")
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError("header line without a colon")
        if name[-1:] in (" ", "\t"):
            raise ProtocolError("whitespace between field name and colon")
        if not _TOKEN.fullmatch(name.encode("latin-1")):
            raise ProtocolError("invalid field name")
        if not _FIELD_VALUE.fullmatch(value):
            raise ProtocolError("invalid character in field value")
    raise ProtocolError("malformed header fields")


def _tokens(value: str) -> set[str]:
    return {token.strip(" \t").lower() for token in value.split(",")}


# -- responses -------------------------------------------------------------

REASONS: dict[int, str] = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_RESPONSE_FIELDS = re.compile(r"(?:" + _TCHAR + r"+: [\t\x20-\x7e\x80-\xff]*\r\n)*")


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """Serialize a status line and header fields, blank line included.

    Raises ValueError for a status outside 100-999, a name that is not a
    token, or a value holding CR, LF or another control character, so no
    caller can split a response by accident.
    """
    if not 100 <= status <= 999:
        raise ValueError(f"invalid status {status!r}")
    reason = REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers])
    # A value smuggling CRLF would add a line that the pattern still accepts,
    # hence the line count.
    if _RESPONSE_FIELDS.fullmatch(fields) is None or fields.count("\n") != len(headers):
        raise ValueError("invalid response header field")
    return f"HTTP/1.1 {status} {reason}\r\n{fields}\r\n".encode("latin-1")


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one chunk; empty data gives b"", never the last chunk."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
