"""Server-sent events on the wire: encoding frames, ids, and a spec-conformant parser.

Theory of operation
-------------------
Rule 1: an event is serialized once, to bytes, and those bytes are what every
        subscriber receives; nothing here does I/O.
Rule 2: the encoder never emits a frame a conforming parser would read
        differently: lines end in LF, ``data`` is split on CRLF, CR or LF
        (WHATWG HTML §9.2.5); ``id`` refuses line breaks and NUL, ``event`` line breaks.
Rule 3: ids have the form ``EPOCH-SEQ``. The epoch is fixed for the life of one
        server run and grows from run to run, so an id names one event forever
        and ids order correctly across restarts.
Rule 4: the parser follows WHATWG HTML §9.2.6 to the letter; the tests and the
        bundled load generator use it to read streams as a browser would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class EventId(NamedTuple):
    """An event id: the server run's epoch and the event's sequence number in it."""

    epoch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"

    @classmethod
    def parse(cls, text: str) -> EventId | None:
        """Read ``EPOCH-SEQ``; None for anything else (unknown ids)."""
        epoch, dash, seq = text.strip().partition("-")
        if not dash or not (epoch.isdigit() and seq.isdigit()):
            return None
        if len(epoch) > 19 or len(seq) > 19 or not (epoch.isascii() and seq.isascii()):
            return None
        return cls(int(epoch), int(seq))


def encode_event(name: str | None, data: str, event_id: str | None = None) -> bytes:
    """Serialize one event to its SSE frame, ending with the blank line that dispatches it.

    This is the only place event frames are made: the hub, the replay from
    SQLite and the notices all call it.
    """
    if name is not None and ("\n" in name or "\r" in name):
        raise ValueError("event name must not contain a line break")
    if event_id is not None and ("\n" in event_id or "\r" in event_id or "\0" in event_id):
        raise ValueError("event id must not contain a line break or NUL")
    if name is not None and event_id is not None and "\n" not in data and "\r" not in data:
        return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()  # the common case, one line
    parts = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    if name is not None:
        parts.append(f"event: {name}\n")
    # WHATWG HTML §9.2.5: CRLF, lone CR and lone LF all end a line.
    for line in _LINE_BREAK.split(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def label_frame(topic: str, keep: bool, frame: bytes) -> bytes:
    """An event frame with its topic, for the all-topics stream: ``topic:`` (and ``keep: 0`` when live only).

    Parsers ignore fields they do not know, so a browser reads the event as is.
    """
    if "\n" in topic or "\r" in topic:
        raise ValueError("topic must not contain a line break")
    return (f"topic: {topic}\n" if keep else f"topic: {topic}\nkeep: 0\n").encode() + frame


def encode_position(event_id: str) -> bytes:
    """An ``id:``-only frame: it sets the client's Last-Event-ID without dispatching an event."""
    if "\n" in event_id or "\r" in event_id or "\0" in event_id:
        raise ValueError("event id must not contain a line break or NUL")
    return f"id: {event_id}\n\n".encode()


def encode_comment(text: str = "") -> bytes:
    """A comment frame (heartbeats): ignored by clients, keeps proxies from timing out."""
    lines = _LINE_BREAK.split(text)
    return "".join(f": {line}\n" if line else ":\n" for line in lines).encode("utf-8") + b"\n"


def encode_retry(milliseconds: int) -> bytes:
    """A ``retry:`` hint: the reconnection delay a client should use, in milliseconds."""
    if milliseconds < 0:
        raise ValueError("retry must be >= 0")
    return b"retry: %d\n\n" % milliseconds


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """One dispatched event, as a browser's EventSource would see it."""

    type: str
    data: str
    last_event_id: str


class EventStreamParser:
    """Incremental WHATWG event-stream parser: feed bytes, get dispatched events.

    State persists between feeds exactly as in a browser: the last event id
    carries over to later events, and ``retry`` holds the last valid hint.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._started = False
        self._saw_cr = False
        self._type = ""
        self._data: list[str] = []
        self._id_buffer = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[MessageEvent]:
        """Consume bytes; return the events they completed, in order."""
        events: list[MessageEvent] = []
        for line in self._lines(chunk):
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self, chunk: bytes) -> Iterator[str]:
        buf = self._pending + chunk
        if not self._started:
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._pending = buf
                return
            self._started = True
            if buf.startswith(b"\xef\xbb\xbf"):  # §9.2.6: one leading BOM is ignored
                buf = buf[3:]
        start = 0
        i = 0
        n = len(buf)
        while i < n:
            c = buf[i]
            if c == 0x0A and self._saw_cr:  # the LF of a CRLF already ended the line
                self._saw_cr = False
                start = i + 1
            elif c == 0x0D or c == 0x0A:
                self._saw_cr = c == 0x0D
                yield buf[start:i].decode("utf-8", "replace")
                start = i + 1
            else:
                self._saw_cr = False
            i += 1
        self._pending = buf[start:]

    def _process_line(self, line: str) -> MessageEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> MessageEvent | None:
        self.last_event_id = self._id_buffer
        if not self._data:
            self._type = ""
            return None
        event = MessageEvent(self._type or "message", "\n".join(self._data), self.last_event_id)
        self._type = ""
        self._data = []
        return event
