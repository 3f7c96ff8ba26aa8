"""Hostile and broken peers, end to end: smuggling, slow clients, bad input, crashes, access.

Every test here talks to a real server over real sockets. The rules they hold
the server to:

Rule 1: bytes that could frame two ways get one 400 and a closed connection;
        whatever follows them is never read as a request.
Rule 2: a peer that sends slowly is cut off by the header timeout, an idle
        keep-alive connection by the keep-alive timeout, and neither delays
        anyone else.
Rule 3: bad input to any endpoint is a 4xx with a JSON ``{"error": ...}``
        body; nothing is published and nothing is written.
Rule 4: ``kill -9`` loses at most the window being collected: what is stored
        is a gap-free prefix of what was sent, and the restarted server
        serves it (and resets clients of the crashed run).
Rule 5: publishing and deleting need the token when one is set; the token is
        never logged nor shown; CORS answers only the configured origins.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import threading
import time
from urllib.parse import quote

import pytest
from helpers import AppThread, ServerProcess, SSEClient, healthz, post_tickers, request

from monkestream.store import integrity_ok

MAX_BODY = 600_000


# -- helpers --------------------------------------------------------------------


def exchange(port: int, data: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send ``data``; return what came back and whether the server closed within ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                got = sock.recv(65536)
            except TimeoutError:
                return out, False
            except ConnectionResetError:
                return out, True
            if not got:
                return out, True
            out += got
        return out, False


def statuses(data: bytes) -> list[int]:
    """The status of every response in ``data``, in order."""
    return [int(m.group(1)) for m in re.finditer(rb"HTTP/1\.1 (\d{3}) ", data)]


def error_body(data: bytes) -> dict:
    """The JSON body of the one response in ``data``."""
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in head, head
    length = int(head.split(b"\r\nContent-Length: ")[1].split(b"\r\n")[0])
    return json.loads(body[:length])


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def db_state(path) -> tuple[int, int, int]:
    """(ticker rows, sum of their seqs, comment ids ever issued) of a database file."""
    conn = sqlite3.connect(path)
    try:
        rows, seqs = conn.execute("SELECT COUNT(*), COALESCE(SUM(seq), 0) FROM tickers").fetchone()
        issued = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'comments'").fetchone()
        return rows, seqs, issued[0] if issued else 0
    finally:
        conn.close()


# -- one server for the smuggling and bad-input tests ------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A server with a little data in it; every test below must leave it exactly so."""
    db = tmp_path_factory.mktemp("hardening") / "h.db"
    with AppThread(db, flush_interval=0.05, max_body=MAX_BODY, comment_burst=1000, comment_rate=1000) as s:
        s.db = db
        tickers = [{"symbol": "SEED", "price": str(p)} for p in (1, 2, 3)]
        assert request(s.port, "POST", "/tickers", tickers)[0] == 201
        status, _, body = request(s.port, "POST", "/room/seed/comments", {"user": "ann", "text": "first"})
        assert status == 201
        s.comment = json.loads(body)
        assert request(s.port, "POST", "/room/seed/comments", {"user": "bob", "text": "second"})[0] == 201
        wait_until(lambda: s.app.store.rows_written == 3)
        yield s
        assert s.app.server.errors == 0  # no request ever became a 500


@pytest.fixture
def untouched(shared):
    """Fail the test if it published anything or wrote to the database."""
    before = (shared.app.hub.seq, db_state(shared.db))
    yield shared
    # tickers reach SQLite only once published (seq), comments before their response
    assert (shared.app.hub.seq, db_state(shared.db)) == before
    assert healthz(shared.port)["status"] == "ok"


# -- Rule 1: request smuggling ------------------------------------------------------

SMUGGLED = b'POST /ticker/SMUG/price HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n{"price":2}'
POST_HEAD = b"POST /ticker/SMUG/price HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("first", [
    POST_HEAD + b'Content-Length: 16\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n{"price":1}\r\n0\r\n\r\n',
    POST_HEAD + b'Transfer-Encoding: chunked\r\nContent-Length: 16\r\n\r\nb\r\n{"price":1}\r\n0\r\n\r\n',
    POST_HEAD + b'Content-Length: 11\r\nContent-Length: 0\r\n\r\n{"price":1}',
    POST_HEAD + b'Content-Length: 0\r\nContent-Length: 11\r\n\r\n{"price":1}',
    POST_HEAD + b'Content-Length: 11, 11\r\n\r\n{"price":1}',
    POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\nzz\r\n{"price":1}\r\n0\r\n\r\n',
    POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\n-b\r\n{"price":1}\r\n0\r\n\r\n',
    POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\n0xb\r\n{"price":1}\r\n0\r\n\r\n',
    POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\nb \r\n{"price":1}\r\n0\r\n\r\n',
    POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\nb\r\n{"price":1}0\r\n\r\n',
    POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"price":1}\r\n0\r\n\r\n',
    POST_HEAD + b'Transfer-Encoding: chunked\r\n\r\nb\n{"price":1}\n0\n\n',
], ids=["cl-te", "te-cl", "two-cl", "two-cl-reversed", "cl-list", "chunk-size-not-hex", "chunk-size-negative",
        "chunk-size-0x", "chunk-size-space", "no-crlf-after-data", "chunk-shorter-than-data", "bare-lf-chunks"])
def test_ambiguous_framing_is_one_400_then_closed(untouched, first):
    out, closed = exchange(untouched.port, first + SMUGGLED)
    assert statuses(out) == [400], out
    assert closed
    assert "error" in error_body(out)


def test_a_good_request_before_the_ambiguous_one_is_answered_alone(untouched):
    good = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = POST_HEAD + b'Content-Length: 16\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n{"price":1}\r\n0\r\n\r\n'
    out, closed = exchange(untouched.port, good + bad + SMUGGLED)
    assert statuses(out) == [200, 400]
    assert closed


@pytest.mark.parametrize("data", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    "tls",
    b"GET /\r\n",
    b"GET /healthz\r\n\r\n" + SMUGGLED,
], ids=["http2-preface", "tls-client-hello", "http09", "http09-then-request"])
def test_other_protocols_are_closed_cleanly(untouched, data):
    out, closed = exchange(untouched.port, client_hello() if data == "tls" else data)
    assert closed
    assert statuses(out) in ([], [400]), out


def test_absolute_form_targets_are_routed_like_origin_form(untouched):
    out, _ = exchange(untouched.port, b"GET http://x/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200]


# -- Rule 2: slow and idle clients ---------------------------------------------------


def trickle(port: int, data: bytes, every: float, results: list, index: int) -> None:
    """Send ``data`` a byte at a time; record (status line or None, seconds until the server closed)."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port))
    got = b""
    try:
        sock.settimeout(every)
        for byte in data:  # until the server answers: writing after its close would reset
            sock.send(bytes([byte]))
            try:
                got = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # a trickled byte the server never read turns its close into a reset
    finally:
        sock.close()
    results[index] = (got, time.monotonic() - started)


def test_tricklers_get_408_at_the_header_timeout_while_others_are_served(tmp_path):
    with AppThread(tmp_path / "slow.db", header_timeout=0.5, keepalive_timeout=5) as s:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100 + b"\r\n\r\n"
        body_trickle = b'POST /ticker/SLOW/price HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"price":' + b" " * 30
        payloads = [head] * 8 + [body_trickle] * 4
        results: list = [None] * len(payloads)
        threads = [threading.Thread(target=trickle, args=(s.port, p, 0.1, results, i)) for i, p in enumerate(payloads)]
        for t in threads:
            t.start()
        slowest = 0.0
        answered = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the tricklers' whole life
            started = time.monotonic()
            assert request(s.port, "GET", "/healthz")[0] == 200
            assert request(s.port, "POST", "/ticker/FAST/price", {"price": 1})[0] == 201
            slowest = max(slowest, time.monotonic() - started)
            answered += 1
        for t in threads:
            t.join(10)
        assert slowest < 0.25 and answered >= 10, (slowest, answered)
        for got, seconds in results:
            assert statuses(got) == [408], got
            assert error_body(got)["error"]
            assert 0.45 <= seconds < 1.2, seconds  # closed at the timeout, not when the trickle would end
        assert s.app.hub.seq == answered  # the trickled POSTs published nothing


def test_keepalive_timeout_is_separate_from_the_header_timeout(tmp_path):
    with AppThread(tmp_path / "idle.db", header_timeout=0.3, keepalive_timeout=1.0) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() and conn.sock is not None
        time.sleep(0.6)  # past the header timeout: an idle connection is not a slow request
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        idle_from = time.monotonic()
        conn.sock.settimeout(3)
        assert conn.sock.recv(1) == b""  # the server closed the idle connection
        assert 0.9 <= time.monotonic() - idle_from < 1.6
        conn.close()


def test_a_request_started_on_an_idle_connection_gets_the_header_timeout(tmp_path):
    with AppThread(tmp_path / "idle2.db", header_timeout=0.4, keepalive_timeout=5) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=3) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = sock.recv(65536)
            assert statuses(first) == [200]
            time.sleep(0.2)
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and nothing more
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            assert statuses(out) == [408]
            assert 0.35 <= time.monotonic() - started < 1.0


def test_a_connection_that_sends_nothing_gets_408(tmp_path):
    with AppThread(tmp_path / "mute.db", header_timeout=0.3, keepalive_timeout=5) as s:
        started = time.monotonic()
        out, closed = exchange(s.port, b"", timeout=3)
        assert closed and statuses(out) == [408]
        assert time.monotonic() - started < 1.0


def test_streams_outlive_both_timeouts(tmp_path):
    with AppThread(tmp_path / "live.db", header_timeout=0.2, keepalive_timeout=0.3, heartbeat=60) as s:
        with SSEClient(s.port, "/ticker/LONG/event") as client:
            client.pump(1.0)
            assert not client.closed
            assert request(s.port, "POST", "/ticker/LONG/price", {"price": 7})[0] == 201
            (event,) = client.wait_for(1)
            assert json.loads(event.data)["price"] == 7


def test_timeouts_are_set_by_flags(tmp_path):
    with ServerProcess(tmp_path / "flags.db", "--no-demo", "--header-timeout", "0.4",
                       "--keepalive-timeout", "0.8") as srv:
        config = healthz(srv.port)["config"]
        assert (config["header_timeout"], config["keepalive_timeout"]) == (0.4, 0.8)
        started = time.monotonic()
        out, closed = exchange(srv.port, b"GET / HTTP/1.1\r\n", timeout=3)
        assert closed and statuses(out) == [408]
        assert 0.35 <= time.monotonic() - started < 1.0
        started = time.monotonic()
        out, closed = exchange(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
        assert closed and statuses(out) == [200]
        assert 0.75 <= time.monotonic() - started < 1.5




def test_stream_requests_dropped_at_once_leave_no_stream_behind(tmp_path):
    with AppThread(tmp_path / "drop.db", max_streams_per_client=20) as s:
        for _ in range(60):
            with socket.create_connection(("127.0.0.1", s.port)) as sock:
                sock.sendall(b"GET /ticker/DROP/event HTTP/1.1\r\nHost: x\r\n\r\n")
        # The listen backlog may still hold some: wait until all 60 were accepted and are gone.
        wait_until(lambda: s.call(lambda: (s.app.server.connections_total, len(s.app.server.connections))) == (60, 0))
        with SSEClient(s.port, "/ticker/DROP/event") as client:
            assert client.status == 200  # not 429: the dropped ones do not count
        wait_until(lambda: s.call(lambda: len(s.app.server.connections)) == 0)
        assert s.call(lambda: (len(s.app.server.streams), s.app.server.streams_by_client)) == (0, {})


def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_half_closed_client_gets_its_answer_but_no_stream(tmp_path):
    with AppThread(tmp_path / "half.db") as s:
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock).startswith(b"HTTP/1.1 200 ")
        for path in (b"/ticker/HALF/event", b"/events?topic=room:half"):
            with socket.create_connection(("127.0.0.1", s.port)) as sock:
                sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                read_to_eof(sock)  # closed by the server, not left open as a stream
        wait_until(lambda: s.call(lambda: len(s.app.server.connections)) == 0)
        assert s.call(lambda: (len(s.app.server.streams), s.app.server.streams_by_client)) == (0, {})


def never_reading(port: int, request_bytes: bytes) -> socket.socket:
    """A client that sends ``request_bytes`` and never reads a byte of the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request_bytes)
    return sock




def test_a_stream_cut_off_for_not_reading_releases_its_connection(tmp_path):
    with AppThread(tmp_path / "cut.db", stream_buffer=4096, stall_timeout=0.3) as s:
        stalled = never_reading(s.port, b"GET /ticker/CUT/event HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            wait_until(lambda: s.app.hub.stream_count == 1)
            price = 0
            while s.app.hub.stream_count and price < 60_000:  # until the stalled stream is cut off
                batch = [{"symbol": "CUT", "price": str(p)} for p in range(price + 1, price + 2001)]
                assert post_tickers(s.port, batch)[0] == 201
                price += 2000
            wait_until(lambda: s.app.hub.stream_count == 0)
            # the peer is still there, not reading: the server lets go of it all the same
            wait_until(lambda: s.call(lambda: len(s.app.server.connections)) == 0, timeout=2)
        finally:
            stalled.close()


def test_an_idle_connection_that_does_not_read_is_released(tmp_path):
    with AppThread(tmp_path / "deaf.db", header_timeout=0.3, keepalive_timeout=0.3, stall_timeout=0.3) as s:
        deaf = never_reading(s.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 10_000)
        try:
            time.sleep(0.5)
            assert s.call(lambda: len(s.app.server.connections)) == 1  # answered what it read, then timed out
            wait_until(lambda: s.call(lambda: len(s.app.server.connections)) == 0, timeout=3)
        finally:
            deaf.close()


# -- Rule 3: bad input, every endpoint -----------------------------------------------

EMOJI = quote("🐶")
ODD_NAMES = [EMOJI, "a%2Fb", "%22q%22", "'q'", "%3Cscript%3E", "<script>", "A" * 1000, "%C3%A9", "a%20b", "%2E%2E%2F"]
DEEP_ARRAY = b"[" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000
DEEP_INSIDE = b'{"price":1,"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
HUGE_INT = b"9" * 10_000

PRICE_BODIES = [
    (b'{"price": NaN}', 400), (b'{"price": Infinity}', 400), (b'{"price": -Infinity}', 400),
    ({"price": "NaN"}, 422), ({"price": "Infinity"}, 422), ({"price": "-Infinity"}, 422), ({"price": "inf"}, 422),
    ({"price": "sNaN"}, 422), (b'{"price": 1e400}', 422), ({"price": "1e400"}, 422), (b'{"price": 1e-400}', 422),
    (b'{"price": ' + HUGE_INT + b"}", 400), ({"price": HUGE_INT.decode()}, 422),
    ({"price": "0." + "0" * 5000 + "1"}, 422), ({"price": "1." + "1" * 40}, 422),
    ({"price": -1}, 422), ({"price": "-0.5"}, 422), ({"price": 0}, 422), ({"price": "0"}, 422),
    (b'{"price": -0.0}', 422), ({"price": "١٢"}, 422), ({"price": "１２"}, 422), ({"price": "1_000"}, 422),
    ({"price": True}, 422), ({"price": None}, 422), ({"price": [1]}, 422), ({"price": {"v": 1}}, 422),
    ({"price": ""}, 422), ({"price": 1, "currency": "€€€"}, 422), ({"price": 1, "currency": 12}, 422),
    ({}, 422), ({"currency": "USD"}, 422), ("1", 400), (5, 400), (None, 400), ([], 400), (b"", 400),
    (b'{"price": 1', 400), (b'{"price": "\xff"}', 400), (b"\xc0\xaf", 400), (b'{"price":1}\xed\xa0\x80', 400),
    (b"\xef\xbb\xbf{\"price\":1}", 400), (DEEP_ARRAY, 400), (DEEP_OBJECT, 400), (DEEP_INSIDE, 400),
]

BULK_BODIES = [
    ({}, 400), ("x", 400), (None, 400), ([1], 400), ([[]], 400), ([{"price": 1}], 422),
    ([{"symbol": 5, "price": 1}], 422), ([{"symbol": "<script>", "price": 1}], 400),
    ([{"symbol": "A" * 1000, "price": 1}], 400), ([{"symbol": "🐶", "price": 1}], 400),
    ([{"symbol": "A", "price": "NaN"}], 422), ([{"symbol": "A", "price": -3}], 422),
    ([{"symbol": "OK", "price": 1}, {"symbol": "BAD", "price": 0}], 422),
    ([{"symbol": "A", "price": 1}] * 10_001, 413),
    (b'[{"symbol":"A","price":NaN}]', 400), (b"[" + HUGE_INT + b"]", 400), (DEEP_ARRAY, 400), (DEEP_OBJECT, 400),
    (b'[{"symbol":"A","price":1}', 400), (b'[{"symbol":"\xff","price":1}]', 400),
]

COMMENT_BODIES = [
    (b"not json", 400), ([], 400), ("hi", 400), (None, 400), ({"user": 5, "text": "hi"}, 422),
    ({"user": "ann"}, 422), ({"text": "hi"}, 422), ({"user": "ann", "text": 5}, 422),
    ({"user": "ann", "text": "   "}, 422), ({"user": "ann", "text": "x" * 1000}, 422),
    ({"user": "ann", "text": "a\x00b"}, 422), ({"user": "ann", "text": "a\x1bb"}, 422),
    (b'{"user": "ann", "text": "a\\ud800b"}', 422), (b'{"user": "ann", "text": "\\udfff"}', 422),
    ({"user": "🐶", "text": "hi"}, 422), ({"user": "<script>", "text": "hi"}, 422), ({"user": "a" * 1000, "text": "hi"}, 422),
    (b'{"user": "ann", "text": "hi", "n": NaN}', 400), (b'{"user": "ann", "text": "hi", "n": ' + HUGE_INT + b"}", 400),
    (b'{"user": "ann", "text": "\xff"}', 400), (DEEP_ARRAY, 400), (DEEP_OBJECT, 400),
]


def case_id(value) -> str:
    """A short readable test id for a request body."""
    text = value.decode("latin-1") if isinstance(value, bytes) else json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 40 else f"{text[:30]}...({len(text)})"
    return text.encode("unicode_escape").decode("ascii")


def expect_error(port: int, method: str, path: str, body=None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
    got, response_headers, text = request(port, method, path, body, headers)
    assert 400 <= got < 500, (path, got, text[:200])
    if status is not None:
        assert got == status, (path, got, text[:200])
    assert response_headers["content-type"] == "application/json"
    assert isinstance(json.loads(text)["error"], str)


@pytest.mark.parametrize("body, status", PRICE_BODIES, ids=[case_id(b) for b, _ in PRICE_BODIES])
def test_bad_price_bodies(untouched, body, status):
    expect_error(untouched.port, "POST", "/ticker/DOGE/price", body, status)


@pytest.mark.parametrize("body, status", BULK_BODIES, ids=[case_id(b) for b, _ in BULK_BODIES])
def test_bad_bulk_bodies(untouched, body, status):
    expect_error(untouched.port, "POST", "/tickers", body, status)


@pytest.mark.parametrize("body, status", COMMENT_BODIES, ids=[case_id(b) for b, _ in COMMENT_BODIES])
def test_bad_comment_bodies(untouched, body, status):
    expect_error(untouched.port, "POST", "/room/lobby/comments", body, status)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_symbols_and_rooms_on_every_endpoint(untouched, name):
    port = untouched.port
    expect_error(port, "POST", f"/ticker/{name}/price", {"price": 1}, 400)
    expect_error(port, "GET", f"/ticker/{name}/history", status=400)
    expect_error(port, "GET", f"/ticker/{name}/chart", status=400)
    expect_error(port, "GET", f"/ticker/{name}/event", status=400)
    expect_error(port, "POST", f"/room/{name}/comments", {"user": "ann", "text": "hi"}, 400)
    expect_error(port, "GET", f"/room/{name}/comments", status=400)
    expect_error(port, "GET", f"/room/{name}/event", status=400)
    expect_error(port, "DELETE", f"/room/{name}/comments/1", status=400)
    expect_error(port, "GET", f"/events?topic=ticker:{name}", status=400)
    expect_error(port, "GET", f"/events?topic=room:{name}", status=400)
    expect_error(port, "GET", f"/room/lobby/event?user={name}", status=422)
    expect_error(port, "GET", f"/events?topic=room:lobby&user={name}", status=422)


@pytest.mark.parametrize("raw_path", [b"/ticker/%00/price", b"/room/a%00/comments", b"/ticker/\xf0\x9f\x90\xb6/history",
                                      b"/room/%FF/event", b"/ticker/a%zz/chart", b"/ticker/a#b/event"])
def test_paths_the_parser_refuses_get_a_json_400(untouched, raw_path):
    out, closed = exchange(untouched.port, b"GET " + raw_path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(out) == [400] and closed
    assert error_body(out)["error"]


@pytest.mark.parametrize("query", [
    "limit=-1", "limit=0", "limit=1e9", "limit=10001", "limit=abc", "limit=--5", "limit=-", "limit=+5", "limit=1.5",
    "limit=%D9%A3", "limit=" + "9" * 5000, "since=abc", "since=-1", "since=1e3", "since=--5",
    "since=" + "9" * 25, "until=x", "until=-5", "limit=%FF", "limit=%",
])
def test_bad_history_params(untouched, query):
    expect_error(untouched.port, "GET", f"/ticker/SEED/history?{query}", status=400)


@pytest.mark.parametrize("query", ["window=", "window=2w", "window=5M", "window=%00", "window=1h&window=x",
                                   "window=" + "x" * 5000])
def test_bad_chart_params(untouched, query):
    expect_error(untouched.port, "GET", f"/ticker/SEED/chart?{query}", status=400)


@pytest.mark.parametrize("query, status", [
    ("", 400), ("topic=", 400), ("topic=ticker:", 400), ("topic=room:", 400), ("topic=nope:x", 400),
    ("topic=ticker", 400), ("topic=" + "&topic=".join(f"ticker:T{i}" for i in range(33)), 400),
    ("topic=room:lobby&user=", 422), ("topic=room:lobby&user=%22", 422), ("topic=ticker:A&topic=%FF", 400),
])
def test_bad_multiplexed_stream_params(untouched, query, status):
    expect_error(untouched.port, "GET", f"/events?{query}", status=status)


@pytest.mark.parametrize("query", ["limit=-1", "limit=0", "limit=501", "limit=1e9", "limit=abc", "limit=",
                                   "limit=" + "1" * 5000, "limit=%D9%A3"])
def test_bad_comment_list_params(untouched, query):
    expect_error(untouched.port, "GET", f"/room/seed/comments?{query}", status=400)


def test_bad_deletions(untouched):
    port, comment = untouched.port, untouched.comment
    for raw_id in ["abc", "-1", "1.5", "1e3", "9" * 19, "9" * 5000, "%D9%A3", "0x1"]:
        expect_error(port, "DELETE", f"/room/seed/comments/{raw_id}", status=400)
    expect_error(port, "DELETE", "/room/seed/comments/0", status=404)
    expect_error(port, "DELETE", f"/room/other/comments/{comment['id']}", status=404)
    expect_error(port, "DELETE", f"/room/seed/comments/{comment['id']}", status=401)
    expect_error(port, "DELETE", f"/room/seed/comments/{comment['id']}", status=403,
                 headers={"X-Delete-Key": "nope"})
    expect_error(port, "DELETE", f"/room/seed/comments/{comment['id']}?key=%FF", status=400)
    expect_error(port, "DELETE", f"/room/seed/comments/{comment['id']}", status=401,
                 headers={"Authorization": "Bearer guess"})


def test_bad_room_stream_params(untouched):
    for query in ["user=", "user=a%20b", "user=" + "u" * 25, "user=%F0%9F%90%B6", "user=%FF"]:
        expect_error(untouched.port, "GET", f"/room/seed/event?{query}")


def test_a_declared_length_over_the_limit_is_refused_from_the_head(untouched):
    for path in ["/ticker/DOGE/price", "/tickers", "/room/seed/comments"]:
        for extra in [b"", b"Expect: 100-continue\r\n"]:
            head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), MAX_BODY + 1, extra)
            out, closed = exchange(untouched.port, head, timeout=2)  # no body is ever sent
            assert statuses(out) == [413] and closed, out
            assert b"100 Continue" not in out
            assert error_body(out)["error"]


def test_a_chunked_body_over_the_limit_is_refused(untouched):
    with socket.create_connection(("127.0.0.1", untouched.port), timeout=3) as sock:
        sock.sendall(b"POST /tickers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"[" + b" " * 65_534 + b"]"
        out = b""
        try:
            for _ in range(MAX_BODY // len(piece) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        assert statuses(out) == [413]


def test_a_body_of_exactly_the_limit_is_read(untouched):
    body = b'{"price": -1}'
    body += b" " * (MAX_BODY - len(body))
    expect_error(untouched.port, "POST", "/ticker/DOGE/price", body, 422)  # validated, so not refused for size
    head = b"POST /ticker/DOGE/price HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    out, closed = exchange(untouched.port, head)
    assert statuses(out) == [413] and closed


# -- Rule 4: kill -9 loses at most the open window -------------------------------------

BATCH = 1000
SYMBOLS = 8


def ingest_until_gone(port: int, log: dict) -> None:
    """POST batches whose prices count 1, 2, 3...; log what was acknowledged and when."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sent = 0
    try:
        while True:
            batch = [{"symbol": f"K{i % SYMBOLS}", "price": str(i)} for i in range(sent + 1, sent + BATCH + 1)]
            body = json.dumps(batch).encode()
            while True:
                log["in_flight"] = sent + BATCH
                conn.request("POST", "/tickers", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status == 201:
                    break
                assert response.status == 503, response.status  # the database is behind: retry
                time.sleep(0.05)
            sent += BATCH
            log["acks"].append((time.monotonic(), sent))
    except (OSError, http.client.HTTPException):
        pass  # the server is gone
    finally:
        conn.close()


def test_store_rule_2_kill_9_mid_ingest_loses_at_most_the_open_window(tmp_path):
    db = tmp_path / "crash.db"
    srv = ServerProcess(db, "--no-demo", "--flush-interval", "0.2").start()
    log: dict = {"acks": [], "in_flight": 0}
    feeder = threading.Thread(target=ingest_until_gone, args=(srv.port, log))
    try:
        feeder.start()
        time.sleep(3.0)
        killed_at = time.monotonic()
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        feeder.join(15)
    assert srv.proc.returncode == -signal.SIGKILL

    assert integrity_ok(str(db))
    conn = sqlite3.connect(db)
    try:
        (epoch, ended_at, last_seq), = conn.execute("SELECT epoch, ended_at, last_seq FROM runs").fetchall()
        assert ended_at is None and last_seq is None  # the run is known to have crashed
        rows = conn.execute("SELECT seq, price, symbol FROM tickers WHERE epoch = ? ORDER BY seq", (epoch,)).fetchall()
    finally:
        conn.close()
    stored = len(rows)
    assert [r[0] for r in rows] == list(range(1, stored + 1))           # no gap in ids
    assert all(r[1] == str(r[0]) and r[2] == f"K{r[0] % SYMBOLS}" for r in rows)  # in order, nothing mixed up
    old_enough = [n for at, n in log["acks"] if at <= killed_at - 1.5]  # flush interval 0.2 + margin
    assert old_enough, f"too little was acknowledged before the kill: {log['acks'][:3]}"
    assert stored >= old_enough[-1], (stored, old_enough[-1])
    assert stored <= log["in_flight"]                                    # nothing was invented
    acked = log["acks"][-1][1]

    with ServerProcess(db, "--no-demo", "--flush-interval", "0.05") as again:
        k1 = [r[1] for r in rows if r[2] == "K1"]
        status, _, body = request(again.port, "GET", "/ticker/K1/history?limit=5")
        assert status == 200
        assert [str(t["price"]) for t in json.loads(body)["tickers"]] == k1[-5:]
        status, _, body = request(again.port, "GET", "/ticker/K1/chart?window=5m")
        points = json.loads(body)["points"]
        assert status == 200 and points and {str(p["price"]) for p in points} <= set(k1)
        status, _, body = request(again.port, "GET", "/symbols")
        assert sorted(s["symbol"] for s in json.loads(body)["symbols"]) == [f"K{i}" for i in range(SYMBOLS)]

        with SSEClient(again.port, "/ticker/K1/event", {"Last-Event-ID": f"{epoch}-{stored}"}) as stale:
            (reset,) = stale.wait_for(1, name="reset")
            assert json.loads(reset.data)["topics"] == ["ticker:K1"]
        with SSEClient(again.port, "/ticker/K1/event") as watcher:
            fresh = [{"symbol": "K1", "price": str(p)} for p in ("1.5", "2.5", "3.5")]
            assert request(again.port, "POST", "/tickers", fresh)[0] == 201
            first_id = watcher.wait_for(3)[0].last_event_id
        assert int(first_id.split("-")[0]) > epoch
        with SSEClient(again.port, "/ticker/K1/event", {"Last-Event-ID": first_id}) as resumed:
            resumed.pump(0.3)
            assert [json.loads(e.data)["price"] for e in resumed.events] == [2.5, 3.5]
            assert not [e for e in resumed.events if e.type == "reset"]
    lost_since = min((at for at, n in log["acks"] if n > stored), default=killed_at)
    print(f"\nkill -9: {acked} tickers acknowledged, {stored} stored; "
          f"the lost ones were acknowledged in the last {killed_at - lost_since:.2f} s")


# -- Rule 5: access ---------------------------------------------------------------------


def test_the_token_guards_writes_and_never_leaks(tmp_path):
    token = "tok-" + secrets.token_hex(16)
    bearer = {"Authorization": f"Bearer {token}"}
    with ServerProcess(tmp_path / "tok.db", "--no-demo", "--token", token, "--log-level", "debug") as srv:
        port = srv.port
        for path, body in [("/ticker/DOGE/price", {"price": 1}), ("/tickers", [{"symbol": "DOGE", "price": 1}]),
                           ("/ticker/DOGE/price", b"not even json")]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                            {"Authorization": f"Bearer {token}x"}, {"Authorization": token}]:
                status, got, text = request(port, "POST", path, body, headers)
                assert status == 401, (path, headers)
                assert got["www-authenticate"] == 'Bearer realm="monkestream"'
                assert json.loads(text)["error"] and token.encode() not in text
        assert request(port, "POST", "/ticker/DOGE/price", {"price": 1}, bearer)[0] == 201
        assert request(port, "POST", "/tickers", [{"symbol": "DOGE", "price": 2}],
                       {"Authorization": f"bearer  {token} "})[0] == 201

        status, _, body = request(port, "POST", "/room/r/comments", {"user": "ann", "text": "hi"})
        assert status == 201
        comment_id = json.loads(body)["id"]
        status, got, _ = request(port, "DELETE", f"/room/r/comments/{comment_id}")
        assert status == 401 and got["www-authenticate"].startswith("Bearer")
        assert request(port, "DELETE", f"/room/r/comments/{comment_id}", headers={"Authorization": "Bearer no"})[0] == 401
        assert request(port, "DELETE", f"/room/r/comments/{comment_id}", headers=bearer)[0] == 204

        for path in ["/healthz", "/metrics", "/", "/symbols"]:
            status, _, body = request(port, "GET", path, headers=bearer)
            assert status == 200 and token.encode() not in body, path
        assert json.loads(request(port, "GET", "/healthz", headers=bearer)[2])["config"]["token"] == "set"
        code = srv.stop()
    assert code == 0
    log = srv.read_log()
    assert "listening on" in log and "DEBUG" in log  # the debug log was on, and captured
    assert token not in log and token[4:] not in log


def test_cors_answers_only_the_configured_origins(tmp_path):
    with ServerProcess(tmp_path / "cors.db", "--no-demo", "--cors-origins", "https://a.example, https://b.example") as srv:
        for origin in ["https://a.example", "https://b.example"]:
            status, got, _ = request(srv.port, "GET", "/healthz", headers={"Origin": origin})
            assert status == 200 and got["access-control-allow-origin"] == origin and got["vary"] == "Origin"
            status, got, _ = request(srv.port, "OPTIONS", "/ticker/A/price",
                                     headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization, content-type"})
            assert status == 204 and got["access-control-allow-origin"] == origin and got["vary"] == "Origin"
            assert "POST" in got["access-control-allow-methods"]
            assert "Authorization" in got["access-control-allow-headers"]
            status, got, _ = request(srv.port, "POST", "/ticker/A/price", {"price": -1}, {"Origin": origin})
            assert status == 422 and got["access-control-allow-origin"] == origin
        for origin in ["https://c.example", "https://a.example.evil", "null", "https://A.example", "http://a.example"]:
            for method, path in [("GET", "/healthz"), ("OPTIONS", "/ticker/A/price"), ("GET", "/nope")]:
                status, got, _ = request(srv.port, method, path, headers={"Origin": origin,
                                                                          "Access-Control-Request-Method": "POST"})
                assert status < 500
                assert "access-control-allow-origin" not in got, (origin, method, path)
                assert "access-control-allow-methods" not in got
        assert "access-control-allow-origin" not in request(srv.port, "GET", "/healthz")[1]


def test_streams_answer_only_the_configured_origins(tmp_path):
    with AppThread(tmp_path / "cors2.db", cors_origins="https://a.example") as s:
        with SSEClient(s.port, "/ticker/A/event", {"Origin": "https://a.example"}) as ok:
            assert ok.response_headers["access-control-allow-origin"] == "https://a.example"
            assert ok.response_headers.get("vary") == "Origin"
        for origin in [None, "https://evil.example", "null"]:
            with SSEClient(s.port, "/ticker/A/event", {"Origin": origin} if origin else {}) as other:
                assert other.status == 200
                assert "access-control-allow-origin" not in other.response_headers, origin
