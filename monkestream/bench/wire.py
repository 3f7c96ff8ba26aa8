"""What the load generator reads, with no I/O: event streams scanned for prices, HTTP answers, latency histograms.

Kept apart from the processes that do the I/O so that it can be tested byte by
byte, like ``http11``.
"""

from __future__ import annotations

import math
import re

MAX_HEAD_BYTES = 16 * 1024
MAX_CHUNK_LINE_BYTES = 1024
MAX_EVENT_BYTES = 64 * 1024

# One field line of an event frame: its id (the whole line), type and data are kept.
_FIELDS = rb"(?:(id:[^\n\0]*)\n|event:[ ]?([^\n]*)\n|data:[ ]?([^\n]*)\n|[^\n]+\n)*\n"
_FRAME = re.compile(_FIELDS)


def _bench_data(symbol: str) -> re.Pattern[bytes]:
    """Data of a bench event: JSON with ``"symbol": SYMBOL`` and ``"price": SEQ`` (``SEQ.0`` too)."""
    quoted = re.escape(b'"%s"' % symbol.encode())
    return re.compile(rb'(?=.*"symbol":[ \t]*' + quoted + rb').*?"price":[ \t]*(\d+)(?:\.0*)?(?![\d.])')


def _bench_frames(symbol: str) -> re.Pattern[bytes]:
    """The frame the servers write for a bench event, whole: id, type, one data line, blank line."""
    return re.compile(
        rb'id: ?([^\n\0]*)\nevent: ?price_update\n'
        rb'data: ?\{"symbol": ?' + re.escape(b'"%s"' % symbol.encode()) +
        rb', ?"price": ?(\d+)(?:\.0*)?[,}][^\n]*\n\n'
    )


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


def id_number(event_id: bytes | None) -> int:
    """The sequence number in an ``EPOCH-SEQ`` (or plain ``SEQ``) event id; 0 for any other id."""
    if not event_id:
        return 0
    digits = event_id.rpartition(b"-")[2]
    return int(digits) if digits.isdigit() and len(digits) < 19 else 0


class StreamScanner:
    """Read one ``GET`` event-stream response: feed received bytes, get ``(seq, id)`` of each bench event.

    Checks the status line and Content-Type, undoes chunked framing when the
    response says so (close-delimited otherwise), splits the stream into event
    frames (LF, CRLF or CR line ends) and counts only the dispatched
    ``price_update`` frames whose data has ``"symbol": SYMBOL`` and
    ``"price": SEQ``; other events, comments and retry hints only move the
    last event id, as they would in a browser. ``last_id`` is that id (None
    before the first), ``first_id`` the first one seen. ``failure`` is set
    (and nothing more is read) when the response is not an event stream;
    ``ended`` when a chunked stream sent its last chunk.
    """

    __slots__ = ("_bench", "_cr", "_crlf", "_fast", "_head", "_left", "_raw", "_tail", "chunked", "ended",
                 "failure", "first_id", "last_id", "parse_errors")

    def __init__(self, symbol: str = "BENCH", last_id: bytes | None = None) -> None:
        self.failure: str | None = None
        self.ended = False
        self.chunked = False
        self.parse_errors = 0
        self.last_id = last_id
        self.first_id: bytes | None = None
        self._fast = _bench_frames(symbol)
        self._bench = _bench_data(symbol)
        self._head: bytes | None = b""  # None once the head is read
        self._raw = b""  # chunked framing not yet decoded
        self._left = 0  # bytes left in the current chunk
        self._crlf = 0  # bytes of the CRLF after a chunk still to skip
        self._cr = False  # the last payload byte was a CR: an LF next is its line end's second half
        self._tail = b""  # the frame not yet ended by a blank line

    @property
    def streaming(self) -> bool:
        return self._head is None and self.failure is None

    def feed(self, data: bytes) -> list[tuple[int, bytes | None]]:
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

    def _scan(self, data: bytes) -> list[tuple[int, bytes | None]]:
        if self._cr and data[:1] == b"\n":
            data = data[1:]
        if b"\r" in data:
            self._cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._cr = False
        buf = self._tail + data if self._tail else data
        end = buf.rfind(b"\n\n") + 2
        if end < 2:
            self._tail = buf
            if len(buf) > MAX_EVENT_BYTES:
                self.parse_errors += 1
                self._tail = b""
            return []
        self._tail = buf[end:]
        found = self._fast.findall(buf, 0, end)
        if len(found) == buf.count(b"\n\n", 0, end):  # every frame is a bench event, written the usual way
            if found:
                if self.first_id is None:
                    self.first_id = found[0][0]
                self.last_id = found[-1][0]
            return [(int(seq), ident) for ident, seq in found]
        return self._scan_frames(buf[:end])

    def _scan_frames(self, frames: bytes) -> list[tuple[int, bytes | None]]:
        """Any frames, field by field: the last id, type and data line of each."""
        out = []
        bench, last = self._bench.match, self.last_id
        for id_line, event, data in _FRAME.findall(frames):
            if id_line:
                last = id_line[4:] if id_line[3:4] == b" " else id_line[3:]
                if self.first_id is None:
                    self.first_id = last
            if event == b"price_update" and (m := bench(data)):
                out.append((int(m[1]), last))
        self.last_id = last
        return out


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
