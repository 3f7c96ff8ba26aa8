"""What the load generator reads, with no I/O: event streams scanned for prices, HTTP answers, latency histograms.

Kept apart from ``bench`` so that it can be tested byte by byte, like ``http11``.
"""

from __future__ import annotations

import math
import re

MARKER = b'"price":'
_PRICE = re.compile(rb'"price":[ \t]*(\d+)(?:\.0*)?(?=[^\d.])')

MAX_HEAD_BYTES = 16 * 1024
MAX_CHUNK_LINE_BYTES = 1024
MAX_EVENT_BYTES = 64 * 1024


# ------------------------------------------------------------------ stream scanner (sans-IO)


def _chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (CR, extensions and all); -1 if there is none."""
    try:
        size = int(line, 16)  # the common case; int() ignores the CR
    except ValueError:
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            return -1
    return size if size >= 0 else -1


class StreamScanner:
    """Read one ``GET .../event`` response: feed received bytes, get the seqs of whole events.

    Checks the status line and Content-Type, undoes chunked framing when the
    response says so (close-delimited otherwise), and finds ``"price": N``.
    ``failure`` is set (and nothing more is read) when the response is not an
    event stream; ``ended`` when a chunked stream sent its last chunk.
    """

    __slots__ = ("_crlf", "_head", "_left", "_raw", "_tail", "chunked", "ended", "failure", "parse_errors")

    def __init__(self) -> None:
        self.failure: str | None = None
        self.ended = False
        self.chunked = False
        self.parse_errors = 0
        self._head: bytes | None = b""  # None once the head is read
        self._raw = b""  # chunked framing not yet decoded
        self._left = 0  # bytes left in the current chunk
        self._crlf = 0  # bytes of the CRLF after a chunk still to skip
        self._tail = b""  # payload that may start an unfinished event

    @property
    def streaming(self) -> bool:
        return self._head is None and self.failure is None

    def feed(self, data: bytes) -> list[int]:
        if self.failure is not None or self.ended:
            return []
        if self._head is not None:
            data = self._read_head(data)
            if not data:
                return []
        if self.chunked:
            data = self._dechunk(data)
        return self._scan(data)

    def _read_head(self, data: bytes) -> bytes:
        buf = self._head + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                self.failure = "response head too long"
            self._head = buf
            return b""
        self._head = None
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
            self.failure = "status " + (parts[1] if len(parts) > 1 else "?")
            return b""
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if not headers.get("content-type", "").startswith("text/event-stream"):
            self.failure = "content-type " + (headers.get("content-type") or "missing")
            return b""
        self.chunked = "chunked" in headers.get("transfer-encoding", "")
        return buf[end + 4 :]

    def _dechunk(self, data: bytes) -> bytes:
        buf = self._raw + data if self._raw else data
        out = []
        pos, n = 0, len(buf)
        left, crlf = self._left, self._crlf
        while pos < n:
            if left:
                take = min(left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                crlf = 0 if left else 2
            elif crlf:
                skip = min(crlf, n - pos)
                pos += skip
                crlf -= skip
            else:
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    if n - pos > MAX_CHUNK_LINE_BYTES:
                        self.failure = "chunk size line too long"
                    break
                size = _chunk_size(buf[pos:eol])
                if size < 0:
                    self.failure = "bad chunk size"
                    break
                pos = eol + 1
                if size == 0:
                    self.ended = True
                    break
                end = pos + size
                if end + 2 <= n:  # the common case: the whole chunk and its CRLF are here
                    out.append(buf[pos:end])
                    pos = end + 2
                else:
                    left = size
        self._left, self._crlf = left, crlf
        self._raw = buf[pos:] if self.failure is None and not self.ended else b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _scan(self, data: bytes) -> list[int]:
        buf = self._tail + data if self._tail else data
        found = _PRICE.findall(buf)
        tail = b""
        if len(found) != buf.count(MARKER):
            last = buf.rfind(MARKER)
            if _PRICE.match(buf, last) is None:
                tail = buf[last:]  # its number may go on in the next read
                if len(tail) > MAX_EVENT_BYTES:
                    self.parse_errors += 1
                    tail = b""
        if not tail and not buf.endswith(b"\n"):
            tail = buf[1 - len(MARKER) :]  # may hold the start of a marker
        self._tail = tail
        return [int(x) for x in found]


# ------------------------------------------------------------------ latency histogram


def hist_index(us: int) -> int:
    """Bucket of a latency in microseconds: exact below 128 us, then 64 buckets per octave."""
    shift = us.bit_length() - 7
    return us if shift <= 0 else (shift << 6) + (us >> shift)


def hist_value(index: int) -> float:
    """Midpoint, in microseconds, of the latencies in bucket ``index``."""
    if index < 128:
        return float(index)
    shift = (index >> 6) - 1
    return ((index - (shift << 6)) << shift) + ((1 << shift) - 1) / 2


def percentile_us(hist: list[int], fraction: float) -> float:
    rank = max(1, math.ceil(fraction * sum(hist)))
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return hist_value(index)
    return 0.0


def take_response(buf: bytes) -> tuple[int, int] | None:
    """Status and length of the first whole HTTP response in ``buf``; None if it is not all there."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").lower().split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    if status < 200 or status in (204, 304):
        return status, end + 4
    headers = dict(line.partition(":")[::2] for line in lines[1:])
    if "chunked" in headers.get("transfer-encoding", ""):
        last = buf.find(b"\r\n0\r\n\r\n", end)  # bodies here are short JSON: no CRLF inside
        return None if last < 0 else (status, last + 7)
    length = end + 4 + int(headers.get("content-length", 0))
    return (status, length) if len(buf) >= length else None
