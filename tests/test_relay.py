"""Relays end to end: an origin and relays as real processes, real sockets, real SQLite.

The README promises that a relay's clients see exactly what they would see on
its upstream (same ids, same order), that a client can move between the
upstream and any relay with its Last-Event-ID and miss nothing, that writes
sent to a relay are the upstream's (with the client's address), and that a
relay rides out its upstream going away, and its own restart, with no gap.
Each test runs that against ``python -m monkestream`` processes on ephemeral
ports: an origin, and relays of it (``--upstream``), some chained.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from monkestream.sse import EventId
from helpers import ServerProcess, SSEClient, healthz, request

TOKEN = "relay-secret"


def origin(tmp_path: Path, *args: str) -> ServerProcess:
    return ServerProcess(tmp_path / "origin.db", "--no-demo", "--flush-interval", "0.05", *args)


def relay(tmp_path: Path, upstream: ServerProcess, *args: str, name: str = "relay") -> ServerProcess:
    return ServerProcess(tmp_path / f"{name}.db", "--upstream", f"http://127.0.0.1:{upstream.port}", *args)


def post_price(port: int, symbol: str, price: int, headers: dict[str, str] | None = None) -> int:
    status, _, body = request(port, "POST", f"/ticker/{symbol}/price", {"price": str(price), "currency": "USD"},
                              headers=headers)
    return status


def prices(events: list[Any]) -> list[int]:
    return [int(json.loads(e.data)["price"]) for e in events if e.type == "price_update"]


def ids(events: list[Any]) -> list[EventId]:
    return [EventId.parse(e.last_event_id) for e in events if e.type == "price_update"]


class Source:
    """An EventSource: reads a stream, and when it ends, reconnects with its Last-Event-ID (to ``port``)."""

    def __init__(self, port: int, path: str, last_id: str | None = None) -> None:
        self.port = port
        self.path = path
        self.last_id = last_id
        self.events: list[Any] = []
        self.connections = 0
        self.comments = 0
        self.client: SSEClient | None = None
        self._connect()

    def _connect(self) -> bool:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        try:
            client = SSEClient(self.port, self.path, headers=headers, timeout=5)
        except (OSError, TimeoutError, ConnectionError):
            return False
        if client.status != 200:
            client.close()
            return False
        self.client = client
        self.connections += 1
        self._take()
        return True

    def _take(self) -> None:
        assert self.client is not None
        got = self.client.events
        self.events += got
        if got:
            self.last_id = self.client.parser.last_event_id or self.last_id
        self.client.events = []
        self.comments += len(self.client.parser.comments)
        self.client.parser.comments.clear()
        if self.client.parser.last_event_id:
            self.last_id = self.client.parser.last_event_id

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.client is None or self.client.closed:
                if self.client is not None:
                    self.client.close()
                    self.client = None
                if not self._connect():
                    time.sleep(0.05)
                continue
            self.client.pump(min(0.05, max(0.0, deadline - time.monotonic())))
            self._take()

    def wait_prices(self, count: int, timeout: float = 15.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(prices(self.events)) < count and time.monotonic() < deadline:
            self.pump(0.05)
        return prices(self.events)

    def move(self, port: int) -> None:
        """Go to another server, as a client behind a load balancer does when its node goes."""
        if self.client is not None:
            self.client.close()
            self.client = None
        self.port = port

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


@pytest.fixture
def chain(tmp_path):
    """An origin, a relay of it, and a relay of that relay."""
    with origin(tmp_path) as o, relay(tmp_path, o, name="r1") as r1, relay(tmp_path, r1, name="r2") as r2:
        yield o, r1, r2


def test_relay_rule_1_every_node_delivers_the_same_events_under_the_same_ids_in_the_same_order(chain):
    o, r1, r2 = chain
    sources = [Source(p.port, "/events?topic=ticker:BTC&topic=ticker:ETH&topic=room:lobby") for p in chain]
    try:
        for n in range(1, 31):  # written to every node in turn: each is the origin's
            assert post_price([o, r1, r2][n % 3].port, "BTC" if n % 2 else "ETH", n) == 201
        status, _, _ = request(r2.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "hello"})
        assert status == 201
        for source in sources:
            source.wait_prices(30)
            source.pump(0.3)
        seen = [[(e.last_event_id, e.type, e.data) for e in s.events] for s in sources]
        assert prices(sources[0].events) == list(range(1, 31))
        assert seen[0] == seen[1] == seen[2]
        assert [e.type for e in sources[0].events].count("comment_posted") == 1
        assert ids(sources[0].events) == sorted(set(ids(sources[0].events)))
    finally:
        for source in sources:
            source.close()


def test_relay_rule_1_topics_created_later_reach_the_relays(chain):
    o, r1, r2 = chain
    assert post_price(o.port, "NEW1", 5) == 201
    with SSEClient(r2.port, "/ticker/NEW2/event") as client:
        assert post_price(o.port, "NEW2", 7) == 201
        assert prices(client.wait_for(1, name="price_update")) == [7]
    status, _, body = request(r2.port, "GET", "/symbols")
    assert {s["symbol"] for s in json.loads(body)["symbols"]} >= {"NEW1", "NEW2"}


def test_relay_rule_4_a_client_moves_between_relays_and_the_origin_with_no_gap(chain, tmp_path):
    o, r1, r2 = chain
    source = Source(r1.port, "/ticker/BTC/event")
    try:
        for n in range(1, 11):
            post_price(o.port, "BTC", n)
        assert source.wait_prices(10) == list(range(1, 11))
        source.move(r2.port)
        for n in range(11, 21):
            post_price(o.port, "BTC", n)
        assert source.wait_prices(20) == list(range(1, 21))
        source.move(o.port)
        for n in range(21, 26):
            post_price(r1.port, "BTC", n)
        assert source.wait_prices(25) == list(range(1, 26))
        source.move(r1.port)
        source.pump(0.3)
        assert prices(source.events) == list(range(1, 26))  # nothing twice after the moves
        assert source.connections == 4
    finally:
        source.close()


def test_relay_rule_4_a_resume_beyond_the_relays_ring_is_fetched_from_the_upstream_and_its_sqlite(tmp_path):
    with origin(tmp_path, "--replay-events", "4") as o:
        first = Source(o.port, "/ticker/BTC/event")
        post_price(o.port, "BTC", 1)
        assert first.wait_prices(1) == [1]
        start = first.last_id
        first.close()
        for n in range(2, 61):
            post_price(o.port, "BTC", n)
        time.sleep(0.3)  # a few flush windows: the gap is in SQLite, the origin's ring holds 4
        with relay(tmp_path, o, "--replay-events", "4") as r:
            source = Source(r.port, "/ticker/BTC/event", last_id=start)
            try:
                assert source.wait_prices(59) == list(range(2, 61))
                post_price(r.port, "BTC", 61)
                assert source.wait_prices(60)[-1] == 61
                metrics = request(r.port, "GET", "/metrics")[2].decode()
                assert "monkestream_upstream_resumes_total 1" in metrics
            finally:
                source.close()


def test_relay_rule_4_a_client_ahead_of_the_relay_is_not_sent_what_it_has(chain):
    o, r1, r2 = chain
    with SSEClient(o.port, "/ticker/BTC/event") as on_origin:
        post_price(o.port, "BTC", 1)
        on_origin.wait_for(1, name="price_update")
        last = on_origin.parser.last_event_id
    # the relay may not have it yet; it answers once it has, with nothing before it
    with SSEClient(r2.port, "/ticker/BTC/event", headers={"Last-Event-ID": last}) as client:
        post_price(o.port, "BTC", 2)
        assert prices(client.wait_for(1, name="price_update")) == [2]


def test_relay_rule_5_writes_history_and_comments_are_the_upstreams(chain):
    o, r1, r2 = chain
    status, _, body = request(r2.port, "POST", "/tickers", [{"symbol": "ADA", "price": "0.5"}])
    assert status == 201 and json.loads(body)[0]["symbol"] == "ADA"
    status, headers, body = request(r2.port, "POST", "/ticker/ADA/price", {"price": "nope"})
    assert status == 422 and "error" in json.loads(body)
    status, _, body = request(r2.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "hi"})
    assert status == 201
    comment = json.loads(body)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, _, body = request(r1.port, "GET", "/ticker/ADA/history")
        if json.loads(body)["tickers"]:
            break
        time.sleep(0.05)
    assert [t["price"] for t in json.loads(body)["tickers"]] == [0.5]
    status, _, body = request(r1.port, "GET", "/room/lobby/comments")
    assert [c["text"] for c in json.loads(body)["comments"]] == ["hi"]
    status, _, _ = request(r1.port, "DELETE", f"/room/lobby/comments/{comment['id']}",
                           headers={"X-Delete-Key": "wrong"})
    assert status == 403
    status, _, _ = request(r1.port, "DELETE", f"/room/lobby/comments/{comment['id']}",
                           headers={"X-Delete-Key": comment["deleteKey"]})
    assert status == 204
    status, _, body = request(o.port, "GET", "/room/lobby/comments")
    assert json.loads(body)["comments"] == []


def _post_comment_from(port: int, source: str, headers: dict[str, str] | None = None) -> int:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    with sock:
        body = json.dumps({"user": "u", "text": "hi"}).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"POST /room/r/comments HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("trust", ["token", "address", "none"])
def test_relay_rule_5_per_client_limits_apply_to_the_client_behind_the_relay(tmp_path, trust):
    token_args = ("--token", TOKEN) if trust == "token" else ()
    trusted = ("--trusted-proxies", "127.0.0.1") if trust == "address" else ()
    with origin(tmp_path, "--comment-burst", "2", "--comment-rate", "0.01", *token_args, *trusted) as o, \
            relay(tmp_path, o, *token_args) as r:
        a = [_post_comment_from(r.port, "127.0.0.2") for _ in range(3)]
        b = _post_comment_from(r.port, "127.0.0.3")
        assert a == [201, 201, 429]
        assert b == (429 if trust == "none" else 201)  # without trust, every client is the relay
        # a client cannot claim another address by itself, even with a forged relay header
        forged = {"X-Forwarded-For": "127.0.0.9", "X-Relay-Token": "guess"}
        assert [_post_comment_from(o.port, "127.0.0.4", forged) for _ in range(3)] == [201, 201, 429]


def test_relay_rule_6_charts_and_symbols_are_warmed_from_the_upstream(tmp_path):
    with origin(tmp_path) as o:
        for n in range(1, 4):
            post_price(o.port, "SOL", n)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not json.loads(request(o.port, "GET", "/ticker/SOL/chart")[2])["points"]:
            time.sleep(0.05)
        with relay(tmp_path, o) as r:
            for path in ("/ticker/SOL/chart", "/ticker/SOL/chart?window=1h", "/symbols"):
                assert json.loads(request(r.port, "GET", path)[2]) == json.loads(request(o.port, "GET", path)[2])
            assert json.loads(request(r.port, "GET", "/symbols")[2])["symbols"][0]["price"] == 3


def test_relay_rule_2_the_origin_restarted_while_relays_stream(tmp_path):
    o = origin(tmp_path).start()
    port = o.port
    with relay(tmp_path, o, "--heartbeat", "0.2") as r1, relay(tmp_path, r1, name="r2") as r2:
        sources = [Source(r.port, "/ticker/BTC/event") for r in (r1, r2)]
        try:
            for n in range(1, 6):
                post_price(port, "BTC", n)
            for source in sources:
                assert source.wait_prices(5) == [1, 2, 3, 4, 5]
            assert o.stop(signal.SIGTERM) == 0
            status, headers, body = request(r2.port, "POST", "/ticker/BTC/price", {"price": "99"})
            assert status == 503 and "retry-after" in headers and "error" in json.loads(body)
            sources[0].pump(0.6)
            assert sources[0].connections == 1 and sources[0].comments >= 1  # heartbeats go on
            assert healthz(r1.port)["upstream"]["state"] == "reconnecting"
            o = ServerProcess(tmp_path / "origin.db", "--no-demo", "--flush-interval", "0.05", "--port", str(port))
            o.start()
            deadline = time.monotonic() + 15
            while post_price(r2.port, "BTC", 6) != 201:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            for n in range(7, 11):
                post_price(port, "BTC", n)
            for source in sources:
                assert source.wait_prices(10) == list(range(1, 11))
                assert source.connections == 1          # never closed: the relay rode it out
                assert not [e for e in source.events if e.type == "reset"]
        finally:
            for source in sources:
                source.close()
            o.stop()


def test_relay_rule_3_the_origin_killed_while_relays_stream(tmp_path):
    o = origin(tmp_path).start()
    port = o.port
    with relay(tmp_path, o) as r:
        source = Source(r.port, "/events?topic=ticker:BTC&topic=room:lobby")
        try:
            for n in range(1, 6):
                post_price(port, "BTC", n)
            request(port, "POST", "/room/lobby/comments", {"user": "ann", "text": "before"})
            assert source.wait_prices(5) == [1, 2, 3, 4, 5]
            o.proc.kill()
            o.proc.wait()
            assert request(r.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "x"})[0] == 503
            o = ServerProcess(tmp_path / "origin.db", "--no-demo", "--flush-interval", "0.05", "--port", str(port))
            o.start()
            # the room's events of the crashed run are gone from the origin (and its unflushed prices
            # may be): the relay's clients are told so by the reset the origin sends, as on the origin
            deadline = time.monotonic() + 15
            while not [e for e in source.events if e.type == "reset"]:
                assert time.monotonic() < deadline
                source.pump(0.1)
            reset = json.loads([e for e in source.events if e.type == "reset"][0].data)
            assert "room:lobby" in reset["topics"]
            assert post_price(r.port, "BTC", 6) == 201
            assert request(r.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "after"})[0] == 201
            assert source.wait_prices(6) == [1, 2, 3, 4, 5, 6]   # nothing twice, nothing missed since
            source.pump(0.3)
            assert [json.loads(e.data)["text"] for e in source.events if e.type == "comment_posted"] == [
                "before", "after"]
            assert len([e for e in source.events if e.type == "reset"]) == 1
        finally:
            source.close()
            o.stop()


def test_relay_rule_4_a_relay_killed_and_restarted_loses_nothing_its_clients_had(tmp_path):
    with origin(tmp_path) as o:
        r = relay(tmp_path, o).start()
        port = r.port
        source = Source(port, "/ticker/BTC/event")
        try:
            for n in range(1, 6):
                post_price(o.port, "BTC", n)
            assert source.wait_prices(5) == [1, 2, 3, 4, 5]
            r.proc.kill()
            r.proc.wait()
            for n in range(6, 11):  # published while the relay is down
                post_price(o.port, "BTC", n)
            r = ServerProcess(tmp_path / "relay.db", "--upstream", f"http://127.0.0.1:{o.port}", "--port", str(port))
            r.start()
            for n in range(11, 16):
                post_price(o.port, "BTC", n)
            assert source.wait_prices(15) == list(range(1, 16))
            assert source.connections == 2
        finally:
            source.close()
            r.stop()


def test_relay_rule_1_the_all_topics_stream_needs_the_token(tmp_path):
    with origin(tmp_path, "--token", TOKEN) as o:
        status, _, body = request(o.port, "GET", "/events?topic=*")
        assert status == 401 and "error" in json.loads(body)
        with relay(tmp_path, o, "--token", TOKEN) as r:
            with SSEClient(r.port, "/ticker/BTC/event") as client:
                assert post_price(r.port, "BTC", 1, {"Authorization": f"Bearer {TOKEN}"}) == 201
                assert prices(client.wait_for(1, name="price_update")) == [1]
            assert post_price(r.port, "BTC", 2) == 401   # the relay passes the client's own credentials


def test_relay_rule_2_a_relay_waits_for_its_upstream_before_it_listens(tmp_path):
    with origin(tmp_path) as o:
        port = o.port
    r = ServerProcess(tmp_path / "relay.db", "--upstream", f"http://127.0.0.1:{port}")
    r.env = {}
    r_started = []

    import threading

    def start() -> None:
        r.start(timeout=20)
        r_started.append(True)
    thread = threading.Thread(target=start)
    thread.start()
    try:
        time.sleep(1.0)
        assert not r_started and "waiting for the upstream" in r.read_log()
        with ServerProcess(tmp_path / "origin.db", "--no-demo", "--port", str(port)) as o2:
            thread.join(20)
            assert r_started
            with SSEClient(r.port, "/ticker/BTC/event") as client:
                post_price(o2.port, "BTC", 1)
                assert prices(client.wait_for(1, name="price_update")) == [1]
    finally:
        thread.join(20)
        if r.proc is not None:
            r.stop()


def test_app_rule_6_a_relay_says_so_and_which_process_answered(chain):
    o, r1, r2 = chain
    assert healthz(o.port)["role"] == "origin" and healthz(r2.port)["role"] == "relay"
    assert healthz(r2.port)["pid"] == r2.proc.pid
    assert healthz(r2.port)["upstream"]["state"] == "connected"
    metrics = request(r1.port, "GET", "/metrics")[2].decode()
    assert f'monkestream_process_info{{role="relay",worker="0",pid="{r1.proc.pid}"}} 1' in metrics
    assert "monkestream_upstream_connected 1" in metrics
    # it opens no database and takes no prices itself: no demo feed runs, though none was turned off
    assert healthz(r1.port)["database"] == "none (a relay)"
    assert not Path(r1.db).exists() and Path(o.db).exists()
    time.sleep(1.2)  # longer than the demo feed's first tick
    assert json.loads(request(r1.port, "GET", "/symbols")[2])["symbols"] == []


def _members(events: list[Any]) -> list[list[str]]:
    return [json.loads(e.data)["users"] for e in events if e.type == "members"]


def _presence(events: list[Any], me: str = "bob") -> list[tuple[str, str]]:
    """The joins and leaves of others (a stream's own join comes first: chat Rule 2)."""
    seen = [(e.type, json.loads(e.data)["user"]) for e in events if e.type in ("user_joined", "user_left")]
    return [event for event in seen if event[1] != me]


def test_upstream_presence_rule_1_one_room_across_the_origin_and_its_relays(chain):
    o, r1, r2 = chain
    with SSEClient(o.port, "/room/lobby/event?user=bob") as bob:
        assert _members(bob.wait_for(1, name="members")) == [["bob"]]
        with SSEClient(r2.port, "/room/lobby/event?user=ann") as ann:
            assert _members(ann.wait_for(1, name="members")) == [["ann", "bob"]]
            assert _presence(bob.wait_for(2, name="user_joined")) == [("user_joined", "ann")]
            # a second tab of ann, on another relay: still one member, no second join
            with SSEClient(r1.port, "/room/lobby/event?user=ann") as tab:
                assert _members(tab.wait_for(1, name="members")) == [["ann", "bob"]]
                bob.pump(0.5)
                assert _presence(bob.events) == [("user_joined", "ann")]
            bob.pump(0.5)
            assert _presence(bob.events) == [("user_joined", "ann")]
            with SSEClient(r1.port, "/room/lobby/event?user=cy") as cy:
                assert _members(cy.wait_for(1, name="members")) == [["ann", "bob", "cy"]]
                assert ("user_joined", "cy") in _presence(ann.wait_for(2, name="user_joined"), me="ann")
        bob.wait_for(1, name="user_left")
        deadline = time.monotonic() + 5
        while _presence(bob.events).count(("user_left", "ann")) + _presence(bob.events).count(("user_left", "cy")) < 2:
            assert time.monotonic() < deadline, bob.events
            bob.pump(0.1)
        status, _, body = request(r1.port, "GET", "/metrics")
        assert status == 200


def test_relay_rule_7_the_users_of_a_killed_relay_leave(tmp_path):
    with origin(tmp_path) as o:
        r = relay(tmp_path, o).start()
        try:
            with SSEClient(o.port, "/room/lobby/event?user=bob") as bob, \
                    SSEClient(r.port, "/room/lobby/event?user=ann") as ann:
                assert _members(ann.wait_for(1, name="members")) == [["ann", "bob"]]
                assert _presence(bob.wait_for(2, name="user_joined")) == [("user_joined", "ann")]
                r.proc.kill()
                bob.wait_for(1, name="user_left")
                assert _presence(bob.events) == [("user_joined", "ann"), ("user_left", "ann")]
        finally:
            r.stop()


def test_upstream_presence_rule_3_members_lists_are_kept_current_by_the_followed_events(chain):
    o, r1, r2 = chain
    with SSEClient(r1.port, "/room/lobby/event?user=ann") as ann:
        assert _members(ann.wait_for(1, name="members")) == [["ann"]]
        with SSEClient(o.port, "/room/lobby/event?user=bob") as bob:
            bob.wait_for(1, name="members")
            ann.wait_for(2, name="user_joined")
            with SSEClient(r1.port, "/room/lobby/event?user=ann") as tab:  # no new join upstream: from what r1 knows
                assert _members(tab.wait_for(1, name="members")) == [["ann", "bob"]]
        ann.wait_for(1, name="user_left")
        with SSEClient(r1.port, "/room/lobby/event?user=ann") as tab:
            assert _members(tab.wait_for(1, name="members")) == [["ann"]]


def test_upstream_presence_rule_2_a_user_is_made_present_again_after_the_upstream_restarts(tmp_path):
    o = origin(tmp_path).start()
    port = o.port
    try:
        with relay(tmp_path, o) as r, SSEClient(r.port, "/room/lobby/event?user=ann") as ann:
            ann.wait_for(1, name="members")
            assert o.stop(signal.SIGTERM) == 0
            o = ServerProcess(tmp_path / "origin.db", "--no-demo", "--port", str(port)).start()
            deadline = time.monotonic() + 15
            while True:
                with SSEClient(port, "/room/lobby/event?user=bob") as bob:
                    if _members(bob.wait_for(1, name="members")) == [["ann", "bob"]]:
                        break
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        o.stop()


def test_upstream_presence_rule_4_without_an_upstream_a_stream_still_opens(tmp_path):
    o = origin(tmp_path).start()
    with relay(tmp_path, o) as r:
        o.stop()
        with SSEClient(r.port, "/room/lobby/event?user=ann", timeout=8) as ann:
            assert ann.status == 200
            assert _members(ann.wait_for(1, name="members")) == [[]]   # nobody known yet here


def test_relay_rule_4_behind_the_shipped_nginx_a_client_whose_relay_dies_resumes_on_the_other(tmp_path):
    from test_nginx import NGINX, Nginx, check, free_port, nginx_conf
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    site = (Path(__file__).resolve().parent.parent / "examples" / "relays" / "nginx-relays.conf").read_text()
    with origin(tmp_path, "--token", TOKEN, "--access-log", "-") as o:
        relays = [relay(tmp_path, o, "--token", TOKEN, "--trusted-proxies", "127.0.0.1", name=f"r{n}").start()
                  for n in (1, 2)]
        port = free_port()
        for old, new in (("127.0.0.1:8001", f"127.0.0.1:{relays[0].port}"),
                         ("127.0.0.1:8002", f"127.0.0.1:{relays[1].port}"), ("listen 8080;", f"listen 127.0.0.1:{port};")):
            assert site.count(old) == 1
            site = site.replace(old, new)
        conf = nginx_conf(tmp_path, site)
        assert check(tmp_path, conf).returncode == 0
        proxy = Nginx(tmp_path, conf, port)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        sources = [Source(port, "/ticker/BTC/event") for _ in range(6)]
        try:
            for n in range(1, 6):
                assert post_price(port, "BTC", n, auth) == 201
            for source in sources:
                assert source.wait_prices(5) == [1, 2, 3, 4, 5]
            relays[0].proc.kill()
            relays[0].proc.wait()
            for n in range(6, 11):
                assert post_price(port, "BTC", n, auth) == 201
            for source in sources:
                assert source.wait_prices(10) == list(range(1, 11))
            # the client's own address reached the origin through nginx and the relay
            assert _post_comment_from(port, "127.0.0.7") == 201
            deadline = time.monotonic() + 5
            while not re.search(r"^127\.0\.0\.7 .*POST /room/r/comments", o.read_log(), re.M):
                assert time.monotonic() < deadline, o.read_log()[-2000:]
                time.sleep(0.05)
        finally:
            for source in sources:
                source.close()
            proxy.stop()
            for r in relays:
                r.stop()


def test_relay_rule_5_a_resume_fetched_upstream_is_counted_against_the_client_not_the_relay(tmp_path):
    with origin(tmp_path, "--trusted-proxies", "127.0.0.1", "--access-log", "-") as o:
        with SSEClient(o.port, "/ticker/BTC/event") as first:
            while not first.parser.last_event_id:
                first.pump(0.05)
            start = first.parser.last_event_id   # its position, before any price
        post_price(o.port, "BTC", 1)
        with relay(tmp_path, o) as r:  # it starts after price 1: the resume is the upstream's
            post_price(o.port, "BTC", 2)
            with SSEClient(r.port, "/ticker/BTC/event", headers={"Last-Event-ID": start}, source="127.0.0.5") as c:
                assert prices(c.wait_for(2, name="price_update")) == [1, 2]
            deadline = time.monotonic() + 5
            while not re.search(r'^127\.0\.0\.5 .*"GET /events\?topic=ticker:BTC HTTP/1.1" 200', o.read_log(), re.M):
                assert time.monotonic() < deadline, o.read_log()[-2000:]
                time.sleep(0.05)


def test_relay_rule_1_a_relay_gets_every_event_of_a_bulk_flood_losslessly(tmp_path):
    """Prices conflate for a slow browser, never for a relay: it follows 30,000 tickers one by one."""
    with origin(tmp_path, "--flush-interval", "0.5") as o, relay(tmp_path, o) as r:
        with SSEClient(r.port, "/events?topic=*", timeout=20) as every:
            for batch in range(3):
                tickers = [{"symbol": f"S{n % 50}", "price": str(batch * 10_000 + n + 1)} for n in range(10_000)]
                deadline = time.monotonic() + 20
                while (status := request(o.port, "POST", "/tickers", tickers, timeout=20)[0]) == 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                assert status == 201
            got = every.wait_for(30_000, timeout=60, name="price_update")
        assert [int(json.loads(e.data)["price"]) for e in got] == list(range(1, 30_001))
        assert ids(got) == sorted(set(ids(got)))
        assert healthz(r.port)["lastEventId"] == healthz(o.port)["lastEventId"]
        assert healthz(r.port)["upstream"]["connects"] == 1   # never cut off on the way


@pytest.mark.parametrize("args, message", [
    (["--upstream", "ftp://127.0.0.1:1"], "--upstream"),
    (["--upstream", "http://127.0.0.1:1", "--workers", "2"], "--workers and --upstream"),
    (["--upstream", "http://127.0.0.1:1", "--broker", "redis://127.0.0.1:1/0"], "--broker and --upstream"),
])
def test_relay_settings_that_cannot_go_together_stop_start_up(args, message):
    from monkestream.config import load
    from monkestream.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        load(args, environ={})
