"""Tests for monkestream.sse: the encoder, EventId, and the WHATWG parser.

Parser vectors follow the WPT ``eventsource/format-*`` cases; each stream is fed
whole, byte by byte, and split in two at every position, and must give the
same events every time.
"""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import monkestream.hub
from monkestream.hub import Hub, Stream
from monkestream.sse import (
    EventId,
    EventStreamParser,
    MessageEvent,
    encode_comment,
    encode_event,
    encode_retry,
)

BOM = b"\xef\xbb\xbf"
SPLIT_EVERYWHERE_MAX_BYTES = 400  # longer vectors are fed whole and byte by byte only


def parse_whole(stream: bytes) -> list[MessageEvent]:
    return EventStreamParser().feed(stream)


def parse_bytewise(stream: bytes) -> list[MessageEvent]:
    parser = EventStreamParser()
    events: list[MessageEvent] = []
    for i in range(len(stream)):
        events += parser.feed(stream[i : i + 1])
    return events


def parse_split(stream: bytes, cut: int) -> list[MessageEvent]:
    parser = EventStreamParser()
    return parser.feed(stream[:cut]) + parser.feed(stream[cut:])


def parse_every_way(stream: bytes) -> list[MessageEvent]:
    """Parse ``stream`` every way it can arrive; assert all agree and return the events."""
    expected = parse_whole(stream)
    assert parse_bytewise(stream) == expected
    if len(stream) <= SPLIT_EVERYWHERE_MAX_BYTES:
        for cut in range(len(stream) + 1):
            assert parse_split(stream, cut) == expected, f"split at {cut}"
    return expected


def ev(data: str, last_event_id: str = "", type: str = "message") -> MessageEvent:
    return MessageEvent(type, data, last_event_id)


# ---------------------------------------------------------------- encoder


def test_encode_event_with_name_and_id():
    frame = encode_event("price_update", '{"price":17}', "1732660000000-17")
    assert frame == b'id: 1732660000000-17\nevent: price_update\ndata: {"price":17}\n\n'


def test_encode_event_without_name_or_id():
    assert encode_event(None, "hello") == b"data: hello\n\n"


def test_encode_event_empty_data_is_one_empty_data_line():
    assert encode_event(None, "") == b"data: \n\n"
    assert parse_whole(encode_event(None, "")) == [ev("")]


@pytest.mark.parametrize(
    "data, lines",
    [
        ("a\nb", [b"a", b"b"]),
        ("a\rb", [b"a", b"b"]),
        ("a\r\nb", [b"a", b"b"]),
        ("a\n\rb", [b"a", b"", b"b"]),
        ("a\r\rb", [b"a", b"", b"b"]),
        ("a\n", [b"a", b""]),
        ("\r\n", [b"", b""]),
    ],
)
def test_encode_event_splits_data_on_every_line_break(data, lines):
    frame = encode_event(None, data)
    assert frame == b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    assert b"\r" not in frame


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c"])
def test_encode_event_keeps_what_splitlines_would_split(separator):
    # Only CR and LF end an SSE line; str.splitlines() would cut these too.
    data = f"a{separator}b"
    frame = encode_event(None, data)
    assert frame == f"data: {data}\n\n".encode()
    assert parse_whole(frame) == [ev(data)]


def test_encode_event_is_utf8():
    assert encode_event("é", "€😀") == "event: é\ndata: €😀\n\n".encode()


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "a\r\nb", "\n", "price\r"])
def test_encode_event_rejects_line_breaks_in_name(name):
    with pytest.raises(ValueError):
        encode_event(name, "x")


@pytest.mark.parametrize("event_id", ["1\n", "\r1", "1\r\n2", "1\x002", "\x00"])
def test_encode_event_rejects_line_breaks_and_nul_in_id(event_id):
    with pytest.raises(ValueError):
        encode_event(None, "x", event_id)


def test_data_cannot_inject_fields_or_events():
    evil = "a\n\nid: evil\nevent: evil\r\rdata: b"
    events = parse_every_way(encode_event("safe", evil))
    assert events == [ev(evil.replace("\r", "\n"), "", "safe")]


def test_encode_comment():
    assert encode_comment() == b":\n\n"
    assert encode_comment("keepalive") == b": keepalive\n\n"
    assert encode_comment("a\r\nb\rc") == b": a\n: b\n: c\n\n"
    assert encode_comment("a\n\nb") == b": a\n:\n: b\n\n"


def test_comments_dispatch_nothing():
    parser = EventStreamParser()
    assert parser.feed(encode_comment("a\nb") + encode_comment()) == []
    assert parser.comments == ["a", "b", ""]


@pytest.mark.parametrize("milliseconds", [0, 1, 1500, 2**40])
def test_encode_retry(milliseconds):
    frame = encode_retry(milliseconds)
    assert frame == f"retry: {milliseconds}\n\n".encode()
    parser = EventStreamParser()
    assert parser.feed(frame) == []
    assert parser.retry == milliseconds


def test_encode_retry_rejects_negative():
    with pytest.raises(ValueError):
        encode_retry(-1)


# ---------------------------------------------------------------- EventId


def test_event_id_str_and_parse_round_trip():
    event_id = EventId(1732660000000, 17)
    assert str(event_id) == "1732660000000-17"
    assert EventId.parse(str(event_id)) == event_id
    assert EventId.parse(" 5-0 ") == EventId(5, 0)


def test_event_ids_order_by_epoch_then_seq():
    assert EventId(1, 99) < EventId(2, 0) < EventId(2, 1)


@pytest.mark.parametrize(
    "text",
    ["", "-", "5", "5-", "-5", "a-1", "1-a", "1-2-3", "1 -2", "+1-2", "1--2",
     "1.0-2", "١-٢", "²-1", "1" * 20 + "-1", "1-" + "1" * 20],
)
def test_event_id_parse_rejects_other_text(text):
    assert EventId.parse(text) is None


@settings(deadline=None)
@given(st.integers(0, 10**19 - 1), st.integers(0, 10**19 - 1))
def test_event_id_round_trips_any_value(epoch, seq):
    assert EventId.parse(str(EventId(epoch, seq))) == EventId(epoch, seq)


# ---------------------------------------------------------------- parser: WPT format-* vectors

LONG_COMMENT = b"x" * 2048

VECTORS = {
    # format-bom: one leading BOM is ignored
    "bom": (BOM + b"data:1\n\ndata:2\n\n", [ev("1"), ev("2")]),
    # format-bom-2: only one is; the second makes the first field name unknown
    "bom-2": (BOM + BOM + b"data:1\n\ndata:2\n\ndata:3\n\n", [ev("2"), ev("3")]),
    # format-bom-utf-16: a UTF-16 BOM decodes to two U+FFFD
    "bom-utf-16": (b"\xff\xfedata:1\n\ndata:2\n\n", [ev("2")]),
    "bom-not-at-start": (b"data:1\n\n" + BOM + b"data:2\n\n", [ev("1")]),
    # format-newlines: CR, LF and CRLF all end a line, mixed freely
    "lf": (b"data:a\ndata:b\n\n", [ev("a\nb")]),
    "cr": (b"data:a\rdata:b\r\r", [ev("a\nb")]),
    "crlf": (b"data:a\r\ndata:b\r\n\r\n", [ev("a\nb")]),
    "mixed": (b"data:a\r\ndata:b\rdata:c\n\r\ndata:d\r\r", [ev("a\nb\nc"), ev("d")]),
    "lf-cr-is-two-breaks": (b"data:a\n\rdata:b\n\n", [ev("a"), ev("b")]),
    "cr-crlf": (b"data:a\r\r\ndata:b\n\n", [ev("a"), ev("b")]),
    # format-comments
    "comments": (
        b"data:1\r:\x00\n:\r\ndata:2\n:" + LONG_COMMENT + b"\rdata:3\n:data:fail\r:"
        + LONG_COMMENT + b"\ndata:4\n\n",
        [ev("1\n2\n3\n4")],
    ),
    # format-field-data
    "field-data": (b"data:\n\ndata\ndata\n\ndata:test\n\n", [ev(""), ev("\n"), ev("test")]),
    "data-one-space-removed": (b"data:x\n\ndata: x\n\ndata:  x\n\n", [ev("x"), ev("x"), ev(" x")]),
    "data-colons-kept": (b"data:: x\ndata:a:b\n\n", [ev(": x\na:b")]),
    "multi-line-data": (b"data: a\ndata: b\ndata:\n\n", [ev("a\nb\n")]),
    # format-null-character: NUL is ordinary data
    "null-in-data": (b"data:\x00\n\n", [ev("\x00")]),
    # format-utf-8
    "utf-8": ("data: ok\u2026é€😀\n\n".encode(), [ev("ok\u2026é€😀")]),
    "invalid-utf-8": (b"data: a\xffb\n\n", [ev("a\ufffdb")]),
    # format-field-event, format-field-event-empty
    "event-type": (b"event: add\ndata: 1\n\ndata: 2\n\n", [ev("1", type="add"), ev("2")]),
    "event-empty": (b"event: \ndata:data\n\n", [ev("data")]),
    "event-type-reset-by-data-less-event": (b"event: a\n\ndata: x\n\n", [ev("x")]),
    "names-case-sensitive": (b"Data: x\nDATA: y\nEvent: e\ndata: z\n\n", [ev("z")]),
    # format-field-id: the id persists until changed
    "id-persists": (
        b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n",
        [ev("a", "1"), ev("b", "1"), ev("c", "2")],
    ),
    "id-keeps-extra-spaces": (b"id:  7\ndata: a\n\n", [ev("a", " 7")]),
    # format-field-id-null: an id containing NUL is ignored
    "id-with-nul-ignored": (
        b"id: 1\ndata: a\n\nid: 2\x00\ndata: b\n\nid: \x00\ndata: c\n\n",
        [ev("a", "1"), ev("b", "1"), ev("c", "1")],
    ),
    # format-field-id-2 / -3: an empty id resets it
    "empty-id-resets": (
        b"id: 1\ndata: a\n\nid\ndata: b\n\nid: 3\ndata: c\n\nid:\ndata: d\n\n",
        [ev("a", "1"), ev("b"), ev("c", "3"), ev("d")],
    ),
    "id-only-block-sets-id-silently": (b"id: 5\n\ndata: x\n\n", [ev("x", "5")]),
    # unknown fields, and lines whose name merely looks close
    "unknown-fields": (b"foo: bar\n data: y\ndata : y\ndata: x\nretryx: 5\n\n", [ev("x")]),
    # data-less blocks dispatch nothing
    "data-less": (b"event: ping\n\n:comment\n\nid: 4\nevent: x\n\n", []),
    # format-data-before-final-empty-line: an unterminated event is never dispatched
    "incomplete-final-event": (b"data:test1\n\nid:test\ndata:test2", [ev("test1")]),
    "incomplete-final-event-one-newline": (b"data:1\n\ndata:2\n", [ev("1")]),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_sse_rule_4_parser_vectors(name):
    stream, expected = VECTORS[name]
    assert parse_every_way(stream) == expected


def test_parser_reports_last_event_id_after_id_only_block():
    parser = EventStreamParser()
    parser.feed(b"id: 9\n\n")
    assert parser.last_event_id == "9"


def test_lone_cr_dispatches_without_waiting_for_the_next_byte():
    parser = EventStreamParser()
    assert parser.feed(b"data:x\r") == []
    assert parser.feed(b"\r") == [ev("x")]


def test_crlf_split_across_feeds_is_one_line_break():
    parser = EventStreamParser()
    assert parser.feed(b"data:x\r") == []
    assert parser.feed(b"\ndata:y\r") == []
    assert parser.feed(b"\n\r") == [ev("x\ny")]
    assert parser.feed(b"\n") == []  # the LF of that CRLF, not a further empty line
    assert parser.feed(b"data:z\n\n") == [ev("z")]


def test_bom_split_across_feeds_is_still_ignored():
    parser = EventStreamParser()
    assert parser.feed(BOM[:1]) == []
    assert parser.feed(BOM[1:2]) == []
    assert parser.feed(BOM[2:] + b"data:1\n\n") == [ev("1")]


def test_retry_takes_ascii_digits_only():
    # format-field-retry-bogus: retry:1000x is ignored, the earlier 2000 stands
    parser = EventStreamParser()
    assert parser.feed(b"retry:2000\nretry:1000x\ndata:x\n\n") == [ev("x")]
    assert parser.retry == 2000
    for bogus in (b"retry:", b"retry", b"retry:-1", b"retry:1.5", b"retry:  1",
                  "retry:١٢".encode(), b"retry:+5", b"retry:1 "):
        parser.feed(bogus + b"\n\n")
        assert parser.retry == 2000, bogus
    parser.feed(b"retry: 1500\n\n")  # one leading space is removed before the check
    assert parser.retry == 1500
    parser.feed(b"retry:0\n\n")
    assert parser.retry == 0


# ---------------------------------------------------------------- round trip

_NO_LINE_BREAK = st.text().filter(lambda s: "\r" not in s and "\n" not in s)
_DATA = st.text(alphabet=st.sampled_from("\r\n :\x00é😀") | st.characters(exclude_categories=("Cs",)))
_ID = st.text().filter(lambda s: not {"\r", "\n", "\x00"} & set(s))
_EVENT = st.tuples(st.none() | _NO_LINE_BREAK, _DATA, st.none() | _ID)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_EVENT, min_size=1, max_size=5), data=st.data())
def test_sse_rule_2_encode_then_parse_round_trips(events, data):
    stream = b"".join(encode_event(name, body, event_id) for name, body, event_id in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = EventStreamParser()
    received: list[MessageEvent] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        received += parser.feed(stream[start:end])

    expected = []
    last_id = ""
    for name, body, event_id in events:
        if event_id is not None:
            last_id = event_id
        expected.append(MessageEvent(name or "message", re.sub(r"\r\n|\r|\n", "\n", body), last_id))
    assert received == expected


@settings(deadline=None)
@given(st.text(min_size=1).map(lambda s: s + "\n") | st.text().map(lambda s: "\r" + s))
def test_any_name_with_a_line_break_is_rejected(name):
    with pytest.raises(ValueError):
        encode_event(name, "x")


# ---------------------------------------------------------------- the module's rules


class _Sink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.framed: list[bytes] = []

    def send(self, frames: bytes) -> None:
        self.sent.append(frames)

    def buffered(self) -> int:
        return 0

    def hub_closed(self, reason: object) -> None:
        pass


def test_sse_rule_1_an_event_is_serialized_once_and_every_subscriber_gets_those_bytes(monkeypatch):
    encoded = []
    real = monkestream.hub.encode_event
    monkeypatch.setattr(monkestream.hub, "encode_event", lambda *args: encoded.append(args) or real(*args))

    async def main():
        hub = Hub(epoch=1)
        subs = [hub.subscribe("t") for _ in range(2)]
        shared, own = [_Sink(), _Sink()], _Sink()
        for sink in shared:
            hub.open_stream(Stream(["t"], sink, send_framed=sink.framed.append))
        hub.open_stream(Stream(["t"], own))
        event = hub.publish("t", "price_update", {"price": 1})
        await asyncio.sleep(0)
        assert len(encoded) == 1
        received = [sub.drain()[0].frame for sub in subs] + [sink.framed[-1] for sink in shared] + [own.sent[-1]]
        assert all(frame is event.frame for frame in received)  # one bytes object, no copy, no re-encoding

    asyncio.run(main())
    source = (Path(__file__).resolve().parent.parent / "monkestream" / "sse.py").read_text(encoding="utf-8")
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "re", "dataclasses", "typing"}  # nothing that does I/O


def test_sse_rule_2_a_nul_in_an_event_name_is_read_back_as_it_was_sent():
    # WHATWG HTML §9.2.6 ignores an id holding NUL, so the encoder refuses one; an event type may hold it
    assert parse_every_way(encode_event("a\x00b", "x", "1-1")) == [ev("x", "1-1", "a\x00b")]
    with pytest.raises(ValueError):
        encode_event("a", "x", "1\x00")
