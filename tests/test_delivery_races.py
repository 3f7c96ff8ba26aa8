"""Delivery races at a stream's start: what a client receives while its stream is being attached.

The README promises that a stream delivers every event of its topics published
after its position, in id order and without duplicates, and that a resume with
``Last-Event-ID`` does the same for the gap. Both are easy to keep when nothing
happens while a stream is being set up; this file proves them in the two
windows where something does, against a real server (a subprocess on an
ephemeral port), real sockets and a real SQLite file:

1. A stream opened on a topic that already has a live stream, while a price for
   that topic is published in the same event-loop iteration (the server kept
   busy by a 10,000-ticker bulk POST so that the stream request and the price
   are read together): the new stream must receive that price at most once,
   and its ids must ascend.
2. A multiplexed stream (a room and a ticker) resuming from an id whose ticker
   gap must be read from SQLite (the ring is too small), while comments are
   posted to the room during that read: the stream must receive every comment,
   and every price of the gap, each once, in id order. The stream is read as
   EventSource reads it: should the server end it (say, to send a long backlog
   in parts), the client resumes with its Last-Event-ID and the connections'
   events count as one stream's.

Each test repeats its race many times and reports how many attempts went wrong,
so a failure shows the size of the defect, not just its existence.
"""

from __future__ import annotations

import json
import select
import socket
import time

from monkestream.sse import EventId
from helpers import ServerProcess, SSEClient, healthz, request

# -- raw HTTP on pre-connected sockets, so that two requests can be sent back to back --------


def _dial(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _post_bytes(path: str, payload: object) -> bytes:
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def _get_stream_bytes(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """One response with a Content-Length body from a keep-alive connection."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(data) >= head_end + 4 + length:
                return int(head.split()[1]), data[head_end + 4: head_end + 4 + length]
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise TimeoutError(f"no complete response: {data[:200]!r}")
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed before a complete response: {data[:200]!r}")
        data += chunk


def _stream_on(sock: socket.socket, port: int, timeout: float = 10.0) -> SSEClient:
    """An SSEClient over ``sock``, whose stream request has already been sent: read its head."""
    client = SSEClient(port, "(sent)", connect=False, timeout=timeout)
    client.sock = sock
    client.read_head()
    assert client.status == 200, (client.status, client.response_headers)
    return client


def _ids(events) -> list[EventId]:
    out = []
    for e in events:
        parsed = EventId.parse(e.last_event_id)
        assert parsed is not None, f"an event without a valid id: {e}"
        out.append(parsed)
    return out


def _duplicates(ids: list[EventId]) -> list[EventId]:
    seen: set[EventId] = set()
    return sorted({i for i in ids if i in seen or seen.add(i)})


def _not_ascending(ids: list[EventId]) -> list[tuple[EventId, EventId]]:
    return [(a, b) for a, b in zip(ids, ids[1:]) if not a < b]


def _position(client: SSEClient, timeout: float = 5.0) -> EventId:
    """Read until the stream has told its position (the id-only frame ending its start)."""
    deadline = time.monotonic() + timeout
    while not client.parser.last_event_id:
        if time.monotonic() > deadline or client.closed:
            raise AssertionError(f"the stream never sent its position: {client.events}")
        client.pump(0.05)
    parsed = EventId.parse(client.parser.last_event_id)
    assert parsed is not None, client.parser.last_event_id
    return parsed


def _prices_until(client: SSEClient, last: float, timeout: float = 5.0) -> list:
    """The stream's price_update events, read until one with price ``last`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [e for e in client.events if e.type == "price_update"]
        if any(json.loads(e.data)["price"] == last for e in got) or client.closed:
            return got
        if time.monotonic() > deadline:
            return got
        client.pump(0.05)


def _post_price(port: int, symbol: str, price: str) -> None:
    """POST one price, retrying while the server says the database is behind (503), as feeders do."""
    deadline = time.monotonic() + 10
    while True:
        status, _, body = request(port, "POST", f"/ticker/{symbol}/price", {"price": price})
        if status == 201:
            return
        assert status == 503 and time.monotonic() < deadline, (status, body)
        time.sleep(0.05)


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- 1. a new stream on a live topic, with a price published in the same loop iteration -------

ATTACH_ATTEMPTS = 50
BULK_TICKERS = 10_000
BULK_SYMBOLS = 50


def test_a_new_stream_never_receives_an_event_twice_when_a_price_races_its_attach(tmp_path):
    symbol = "RACEX"
    path = f"/ticker/{symbol}/event"
    bulk = _post_bytes("/tickers", [{"symbol": f"BULK{i % BULK_SYMBOLS}", "price": f"{i + 1}.25"}
                                    for i in range(BULK_TICKERS)])
    with ServerProcess(tmp_path / "attach.db", "--no-demo", "--flush-interval", "0.02") as srv:
        port = srv.port
        keeper = SSEClient(port, path)          # the stream that puts the topic on the fast path
        bulk_conn = _dial(port)
        published: list[str] = []               # the prices of X, in publish order
        bad: list[str] = []
        raced = 0                               # attempts whose new stream got the racing price
        refused = 0                             # posts answered 503 (the writer was behind)
        try:
            for attempt in range(ATTACH_ATTEMPTS):
                price = f"{attempt + 1}.5"
                sentinel = f"{attempt + 1}.75"
                # start each race with every earlier ticker written, so ingest has no reason to refuse
                _wait_until(lambda: healthz(port)["unpersisted"] == 0, 10, "the writer to catch up")
                get_conn, post_conn = _dial(port), _dial(port)
                time.sleep(0.02)                # let the server accept both before it gets busy
                bulk_conn.sendall(bulk)
                time.sleep(0.005)               # the server is now parsing and publishing the bulk
                get_conn.sendall(_get_stream_bytes(path))
                post_conn.sendall(_post_bytes(f"/ticker/{symbol}/price", {"price": price}))
                status, body = _read_response(post_conn)
                if status == 201:
                    published.append(price)
                else:
                    assert status == 503, body  # the database was behind: no race this time
                    refused += 1
                status, body = _read_response(bulk_conn)
                if status != 201:
                    assert status == 503, body  # the database was behind: the server was not busy
                    refused += 1
                new = _stream_on(get_conn, port)
                _position(new)
                # a later price: once it has arrived, so has everything the server wrote to the
                # new stream before it (the racing price and any copy of it)
                _post_price(port, symbol, sentinel)
                published.append(sentinel)
                got = _prices_until(new, float(sentinel))
                keeper.pump(0)
                new.close()
                post_conn.close()
                prices = [json.loads(e.data)["price"] for e in got]
                assert prices and prices[-1] == float(sentinel), \
                    f"attempt {attempt}: the new stream never got the later price {sentinel}: {prices}"
                if float(price) in prices:
                    raced += 1
                ids = _ids(got)
                dups, disorder = _duplicates(ids), _not_ascending(ids)
                if dups or disorder:
                    bad.append(f"attempt {attempt}: ids {[str(i) for i in ids]} (prices {prices}); "
                               f"twice: {[str(i) for i in dups]}; out of order: {len(disorder)}")
            got = keeper.wait_for(len(published), timeout=5, name="price_update")
        finally:
            keeper.close()
            bulk_conn.close()
        assert not bad, (
            f"{len(bad)} of {ATTACH_ATTEMPTS} new streams received an event id twice or out of order "
            f"({raced} got the racing price at all; {refused} posts refused):\n  "
            + "\n  ".join(bad[:10]))
        keeper_prices = [json.loads(e.data)["price"] for e in got]
        assert keeper_prices == [float(p) for p in published], "the long-lived stream lost or repeated prices"
        keeper_ids = _ids(got)
        assert not _duplicates(keeper_ids) and not _not_ascending(keeper_ids), \
            f"the long-lived stream's ids: {[str(i) for i in keeper_ids]}"


# -- 2. a resume whose ticker gap comes from SQLite, with comments posted during the read -----

RESUME_ATTEMPTS = 30
GAP_TICKERS = 5000          # read back from SQLite on every resume (the replay limit is 10,000)
COMMENTS_PER_RESUME = 3
MAX_RECONNECTS = 100


class _EventSource:
    """Reads a stream as a browser's EventSource does: when the server ends it, it reconnects
    with ``Last-Event-ID`` (at once, not after the retry hint) and goes on reading.

    So a server may deliver a long backlog in parts, closing the stream after each, and the
    events of every connection count as one stream's.
    """

    def __init__(self, port: int, path: str, client: SSEClient) -> None:
        self.port = port
        self.path = path
        self.client = client
        self.earlier: list = []     # the events of the connections already ended
        self.reconnects = 0

    @property
    def events(self) -> list:
        return self.earlier + self.client.events

    def read_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self.events):
            if time.monotonic() > deadline:
                return False
            self.client.pump(0.05)
            if self.client.closed:
                self._reconnect()
        return True

    def _reconnect(self) -> None:
        self.earlier += self.client.events
        last = self.client.parser.last_event_id
        self.client.close()
        self.reconnects += 1
        assert self.reconnects <= MAX_RECONNECTS, f"more than {MAX_RECONNECTS} reconnections"
        self.client = SSEClient(self.port, self.path, {"Last-Event-ID": last} if last else {})
        assert self.client.status == 200, (self.client.status, getattr(self.client, "body", b""))

    def close(self) -> None:
        self.client.close()


def _of_type(events, name: str) -> list:
    return [e for e in events if e.type == name]


def _comment_ids(events) -> list[int]:
    return [json.loads(e.data)["id"] for e in _of_type(events, "comment_posted")]


def test_replay_rule_2_a_resume_read_from_sqlite_never_loses_room_events_published_during_the_read(tmp_path):
    symbol = "GAPT"
    args = ["--no-demo", "--replay-events", "8", "--flush-interval", "0.1",
            "--comment-rate", "100000", "--comment-burst", "100000"]
    with ServerProcess(tmp_path / "resume.db", *args) as srv:
        port = srv.port
        # the ids of the gap, as a live stream saw them published
        observer = _EventSource(port, f"/ticker/{symbol}/event", SSEClient(port, f"/ticker/{symbol}/event"))
        try:
            _position(observer.client)
            resume_from = EventId.parse(healthz(port)["lastEventId"])
            assert resume_from is not None
            status, _, body = request(port, "POST", "/tickers",
                                      [{"symbol": symbol, "price": f"{i + 1}.5"} for i in range(GAP_TICKERS)],
                                      timeout=10)
            assert status == 201, body
            observer.read_until(lambda ev: len(_of_type(ev, "price_update")) >= GAP_TICKERS, 10)
        finally:
            observer.close()
        gap = _of_type(observer.events, "price_update")
        gap_ids = _ids(gap)
        gap_prices = [json.loads(e.data)["price"] for e in gap]
        assert gap_prices == [float(f"{i + 1}.5") for i in range(GAP_TICKERS)], "the observer missed prices"
        assert min(gap_ids) > resume_from and not _not_ascending(gap_ids)
        _wait_until(lambda: healthz(port)["unpersisted"] == 0, 10, "the gap to be written to SQLite")

        bad: list[str] = []
        missed_comments = 0
        for attempt in range(RESUME_ATTEMPTS):
            room = f"R{attempt}"
            path = f"/events?topic=room:{room}&topic=ticker:{symbol}"
            stream_conn = _dial(port)
            post_conns = [_dial(port) for _ in range(COMMENTS_PER_RESUME)]
            time.sleep(0.02)            # let the server accept them all first
            stream_conn.sendall(_get_stream_bytes(path, {"Last-Event-ID": str(resume_from)}))
            for i, conn in enumerate(post_conns):
                conn.sendall(_post_bytes(f"/room/{room}/comments", {"user": "u1", "text": f"hi {attempt}.{i}"}))
            posted = []
            for conn in post_conns:
                status, body = _read_response(conn)
                assert status == 201, body
                posted.append(json.loads(body)["id"])
                conn.close()
            stream = _EventSource(port, path, _stream_on(stream_conn, port))
            try:
                stream.read_until(lambda ev: len(_of_type(ev, "price_update")) >= GAP_TICKERS, 10)
                # one more comment, once the gap has arrived: when it arrives, so has everything
                # the server wrote to the stream before it
                status, _, body = request(port, "POST", f"/room/{room}/comments", {"user": "u1", "text": "last"})
                assert status == 201, body
                last = json.loads(body)["id"]
                stream.read_until(lambda ev: last in _comment_ids(ev), 5)
            finally:
                stream.close()
            events = [e for e in stream.events if e.type in ("price_update", "comment_posted")]
            others = [e.type for e in stream.events if e.type not in ("price_update", "comment_posted")]
            prices = _of_type(events, "price_update")
            comments = _comment_ids(events)
            ids = _ids(events)
            problems = []
            if others:
                problems.append(f"unexpected events {others}")
            missing = [c for c in posted if c not in comments]
            if missing:
                missed_comments += len(missing)
                problems.append(f"missed {len(missing)} of {COMMENTS_PER_RESUME} comments {missing} "
                                f"(received {comments})")
            if comments.count(last) != 1 or len(set(comments)) != len(comments):
                problems.append(f"comments not each once: {comments} (the last one is {last})")
            price_ids = _ids(prices)
            if price_ids != gap_ids:
                problems.append(f"prices: {len(prices)} received, {len(gap_ids)} expected, "
                                f"{len(set(gap_ids) - set(price_ids))} missing, "
                                f"{len(_duplicates(price_ids))} twice")
            elif [json.loads(e.data)["price"] for e in prices] != gap_prices:
                problems.append("prices: the right ids with the wrong prices")
            if _duplicates(ids):
                problems.append(f"ids twice: {[str(i) for i in _duplicates(ids)]}")
            if _not_ascending(ids):
                problems.append(f"ids not ascending at {len(_not_ascending(ids))} places")
            if problems:
                bad.append(f"resume {attempt} ({stream.reconnects} reconnections): " + "; ".join(problems))
        assert not bad, (
            f"{len(bad)} of {RESUME_ATTEMPTS} resumes went wrong; {missed_comments} of "
            f"{RESUME_ATTEMPTS * COMMENTS_PER_RESUME} comments posted right after the resume request "
            f"(while its ticker gap was read from SQLite) were never delivered:\n  " + "\n  ".join(bad[:10]))
