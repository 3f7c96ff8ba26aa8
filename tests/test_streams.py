"""Streams clients can rely on: ids and resume, heartbeats, multiplexing, slow consumers, limits, chat."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time

import pytest

from marbles import marble_test
from monkestream import CloseReason
from monkestream.clock import VirtualScheduler
from monkestream.config import Config
from monkestream.http11 import chunk
from monkestream.hub import EVERY_TOPIC, Hub
from monkestream.replay import Replayer, reset_event
from monkestream.routing import Exchange, Router
from monkestream.server import Connection, Server
from monkestream.sse import EventId, EventStreamParser, encode_event, label_frame
from monkestream.store import Store
from monkestream.streams import StreamOpener
from monkestream.ticker import Ticker, topic_symbol
from helpers import AppThread, ServerProcess, SSEClient, healthz, post_tickers, request
from test_server_timers import FakeTransport, Lowest


def publish(port, symbol, *prices):
    """Publish in bulk, retrying while the server says the database is behind (503), as feeders do."""
    status, body = post_tickers(port, [{"symbol": symbol, "price": str(p)} for p in prices])
    assert status == 201, body


def prices(events):
    return [json.loads(e.data)["price"] for e in events if e.type == "price_update"]


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def server(tmp_path):
    with AppThread(tmp_path / "s.db", flush_interval=0.05, replay_events=50) as s:
        yield s


def test_every_event_has_an_id_and_the_stream_starts_with_retry(server):
    with SSEClient(server.port, "/ticker/ID/event") as client:
        client.pump(0.2)
        assert client.parser.retry is not None and 3000 <= client.parser.retry <= 4500
        publish(server.port, "ID", 1, 2, 3)
        got = client.wait_for(3)
        epoch = server.app.hub.epoch
        seqs = [int(e.last_event_id.split("-")[1]) for e in got]
        assert all(e.last_event_id.startswith(f"{epoch}-") for e in got)
        assert seqs == sorted(seqs) and len(set(seqs)) == 3


def test_reconnect_with_last_event_id_gets_exactly_the_missed_events(server):
    client = SSEClient(server.port, "/ticker/RES/event")
    publish(server.port, "RES", *range(1, 11))
    got = client.wait_for(10)
    assert prices(got) == list(range(1, 11))
    last = got[4].last_event_id          # pretend the client saw only five
    client.close()
    publish(server.port, "RES", *range(11, 21))
    publish(server.port, "OTHER", 99)
    with SSEClient(server.port, "/ticker/RES/event", {"Last-Event-ID": last}) as again:
        again.pump(0.3)
        publish(server.port, "RES", 21)
        got = again.wait_for(16)
        assert prices(got) == list(range(6, 22))
        ids = [e.last_event_id for e in got]
        assert len(ids) == len(set(ids))


def test_last_event_id_query_parameter_for_a_first_connection(server):
    publish(server.port, "Q", 1, 2, 3)
    first = server.app.hub.replay("ticker:Q", EventId(server.app.hub.epoch, 0))[0]
    with SSEClient(server.port, f"/ticker/Q/event?lastEventId={first.id}") as client:
        assert prices(client.wait_for(2)) == [2, 3]


def test_replay_rule_1_an_id_past_the_ring_is_read_from_sqlite_and_an_unknown_one_gets_a_reset(server):
    publish(server.port, "OLD", *range(1, 201))       # the ring holds 50
    epoch = server.app.hub.epoch
    # every window is on disk: SQLite serves what the ring lost
    wait_until(lambda: server.app.store.flushed_seq >= 200)
    with SSEClient(server.port, "/ticker/OLD/event", {"Last-Event-ID": f"{epoch}-10"}) as client:
        assert prices(client.wait_for(190)) == list(range(11, 201))
    for bad in ["garbage", "1-2", f"{epoch}-999999"]:
        with SSEClient(server.port, "/ticker/OLD/event", {"Last-Event-ID": bad}) as client:
            (reset,) = client.wait_for(1, name="reset")
            assert json.loads(reset.data)["topics"] == ["ticker:OLD"]
            publish(server.port, "OLD", 500)
            assert prices(client.wait_for(2))[-1] == 500


def test_replay_rule_1_room_events_too_old_for_the_ring_are_a_reset(tmp_path):
    with AppThread(tmp_path / "r.db", replay_events=3, comment_burst=100) as s:
        with SSEClient(s.port, "/room/lobby/event") as watcher:
            for i in range(6):
                assert request(s.port, "POST", "/room/lobby/comments", {"user": "ann", "text": f"c{i}"})[0] == 201
            got = watcher.wait_for(6, name="comment_posted")
            first_id = got[0].last_event_id
        with SSEClient(s.port, "/room/lobby/event", {"Last-Event-ID": first_id}) as client:
            assert client.wait_for(1, name="reset")


def test_sse_rule_3_a_restart_has_a_greater_epoch_and_a_resume_crosses_it(tmp_path):
    db = tmp_path / "restart.db"
    with ServerProcess(db, "--no-demo") as srv:
        client = SSEClient(srv.port, "/ticker/RS/event")
        publish(srv.port, "RS", 1, 2, 3)
        last = client.wait_for(3)[-1].last_event_id
        client.close()
        publish(srv.port, "RS", 4, 5)
    with ServerProcess(db, "--no-demo") as srv:
        publish(srv.port, "RS", 6)
        with SSEClient(srv.port, "/ticker/RS/event", {"Last-Event-ID": last}) as client:
            got = client.wait_for(3)
            assert prices(got) == [4, 5, 6]
            assert got[-1].last_event_id.split("-")[0] != last.split("-")[0]  # a new epoch
            assert int(got[-1].last_event_id.split("-")[0]) > int(last.split("-")[0])


def _metric(port, name):
    _, _, body = request(port, "GET", "/metrics")
    (line,) = [l for l in body.decode().splitlines() if l.startswith(name + " ")]
    return float(line.split()[1])


def test_replay_rule_3_a_restart_seen_to_its_end_resumes_without_reading_sqlite(tmp_path):
    db = tmp_path / "restart.db"
    with AppThread(db, flush_interval=0.05) as s:
        with SSEClient(s.port, "/ticker/RS/event") as client:
            publish(s.port, "RS", 1, 2, 3)
            middle = client.wait_for(3)[0].last_event_id
        end = healthz(s.port)["lastEventId"]   # what a client that saw the whole run holds
    with AppThread(db, flush_interval=0.05) as s:
        publish(s.port, "RS", 4)
        with SSEClient(s.port, "/ticker/RS/event", {"Last-Event-ID": end}) as client:
            assert prices(client.wait_for(1)) == [4]
        assert _metric(s.port, "monkestream_replay_sqlite_reads_total") == 0
        with SSEClient(s.port, "/ticker/RS/event", {"Last-Event-ID": middle}) as client:
            assert prices(client.wait_for(3)) == [2, 3, 4]   # the rest of the old run is in SQLite
        assert _metric(s.port, "monkestream_replay_sqlite_reads_total") == 1


def test_heartbeats_on_idle_streams(tmp_path):
    with AppThread(tmp_path / "h.db", heartbeat=0.3) as s:
        with SSEClient(s.port, "/ticker/HB/event") as client:
            client.pump(1.6)
            assert client.parser.comments.count("") >= 2
            assert client.events == []


def test_max_stream_age_closes_healthy_streams(tmp_path):
    with AppThread(tmp_path / "a.db", max_stream_age=0.6) as s:
        with SSEClient(s.port, "/ticker/AGE/event") as client:
            started = time.monotonic()
            client.pump(3)
            assert client.closed
            assert 0.4 <= time.monotonic() - started < 2.5
        assert s.app.hub.closed_by_reason[CloseReason.MAX_AGE] == 1


def test_many_topics_on_one_connection(server):
    path = "/events?topic=ticker:A1&topic=ticker:B2&topic=room:hall"
    with SSEClient(server.port, path) as client:
        publish(server.port, "A1", 1)
        publish(server.port, "B2", 2)
        publish(server.port, "C3", 3)
        assert request(server.port, "POST", "/room/hall/comments", {"user": "bo", "text": "hi"})[0] == 201
        got = client.wait_for(3)
        assert [(e.type, json.loads(e.data).get("symbol")) for e in got] == [
            ("price_update", "A1"), ("price_update", "B2"), ("comment_posted", None)]
        seqs = [int(e.last_event_id.split("-")[1]) for e in got]
        assert seqs == sorted(seqs)
    for bad in ["/events", "/events?topic=nope:x", "/events?topic=ticker:" + "x" * 30]:
        status, _, body = request(server.port, "GET", bad)
        assert status == 400 and "topic" in json.loads(body)["error"]


def stalled_client(port, path):
    """A client that opens a stream and never reads (tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_a_stalled_reader_is_conflated_while_others_keep_up(tmp_path):
    with AppThread(tmp_path / "slow.db", stream_buffer=8192, flush_interval=0.05) as s:
        stalled = stalled_client(s.port, "/ticker/SLOW/event")
        wait_until(lambda: s.app.hub.stream_count == 1)
        with SSEClient(s.port, "/ticker/SLOW/event") as healthy:
            wait_until(lambda: s.app.hub.stream_count == 2)
            for start in range(0, 30000, 5000):
                publish(s.port, "SLOW", *range(start + 1, start + 5001))
                got = healthy.wait_for(start + 5000)
                assert len(got) == start + 5000  # on time, whatever the stalled one does
            assert prices(healthy.events) == list(range(1, 30001))
            buffered = s.call(lambda: [c.transport.get_write_buffer_size() for c in s.app.server.streams])
            one_batch = 5000 * 130
            assert max(buffered) <= 8192 + one_batch
        # the stalled client now reads: it gets a prefix, then the latest price, never a backlog
        reader = SSEClient(s.port, "/", connect=False)
        reader.sock = stalled
        reader._chunked = True
        stalled.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            data += stalled.recv(65536)
        reader._feed(data.partition(b"\r\n\r\n")[2])
        got = prices(reader.wait_for(30000, timeout=3))
        assert got[-1] == 30000
        assert len(got) < 30000
        assert got == sorted(got)
        assert s.app.hub.conflated > 0
        stalled.close()


def test_a_stalled_lossless_stream_is_closed_not_trimmed(tmp_path):
    with AppThread(tmp_path / "chat.db", stream_buffer=4096, comment_burst=100000, comment_rate=100000) as s:
        stalled = stalled_client(s.port, "/room/busy/event")
        wait_until(lambda: s.app.hub.stream_count == 1)
        body = json.dumps({"user": "u", "text": "x" * 500}).encode()
        post = (b"POST /room/busy/comments HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
        with socket.create_connection(("127.0.0.1", s.port)) as poster:
            poster.settimeout(10)
            for _ in range(60):  # more than the kernel's socket buffers can hide
                poster.sendall(post * 200)
                answered = b""
                while answered.count(b"HTTP/1.1 201") < 200:
                    answered += poster.recv(1 << 20)
                if s.app.hub.stream_count == 0:
                    break
        wait_until(lambda: s.app.hub.stream_count == 0)
        assert s.app.hub.closed_by_reason[CloseReason.SLOW] == 1
        stalled.close()


def test_a_vanished_peer_is_closed_after_the_stall_timeout(tmp_path):
    with AppThread(tmp_path / "gone.db", stream_buffer=4096, stall_timeout=0.5) as s:
        stalled = stalled_client(s.port, "/ticker/GONE/event")
        wait_until(lambda: s.app.hub.stream_count == 1)
        for start in range(0, 20000, 5000):
            publish(s.port, "GONE", *range(start + 1, start + 5001))
        wait_until(lambda: s.app.hub.stream_count == 0, timeout=5)
        assert s.app.hub.closed_by_reason[CloseReason.PEER_GONE] == 1
        stalled.close()


def test_stream_limits(tmp_path):
    with AppThread(tmp_path / "lim.db", max_streams=3, max_streams_per_client=2) as s:
        a = SSEClient(s.port, "/ticker/L/event")
        b = SSEClient(s.port, "/ticker/L/event")
        c = SSEClient(s.port, "/ticker/L/event")
        assert (a.status, b.status) == (200, 200)
        assert c.status == 429 and "retry-after" in c.response_headers
        d = SSEClient(s.port, "/ticker/L/event", source="127.0.0.2")
        assert d.status == 200
        status, headers, body = request(s.port, "GET", "/ticker/L/event")   # an API client, or curl
        assert status == 503 and int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
        assert "error" in json.loads(body)
        e = SSEClient(s.port, "/ticker/L/event", source="127.0.0.3")  # an EventSource: come back later
        assert e.status == 200 and e.response_headers["content-type"] == "text/event-stream"
        e.pump(1)
        assert e.closed and e.events == [] and 10000 <= e.parser.retry <= 30000
        a.close()
        wait_until(lambda: len(s.app.server.streams) == 2)
        f = SSEClient(s.port, "/ticker/L/event", source="127.0.0.3")
        assert f.status == 200
        for client in (b, c, d, e, f):
            client.close()


def test_chat_flow_with_two_users(server):
    ann = SSEClient(server.port, "/room/lobby/event?user=ann")
    own_join, members = ann.wait_for(2)
    # its own join is published before its position, so it is the last event of its backlog
    assert (own_join.type, json.loads(own_join.data)) == ("user_joined", {"room": "lobby", "user": "ann"})
    assert members.type == "members" and json.loads(members.data)["users"] == ["ann"]
    bob = SSEClient(server.port, "/room/lobby/event?user=bob")
    (members,) = bob.wait_for(1, name="members")
    assert json.loads(members.data)["users"] == ["ann", "bob"]
    joined = ann.wait_for(2, name="user_joined")[1]
    assert json.loads(joined.data) == {"room": "lobby", "user": "bob"}

    status, _, body = request(server.port, "POST", "/room/lobby/comments", {"user": "bob", "text": "<b>wow</b> such chat"})
    assert status == 201
    posted = json.loads(body)
    key = posted.pop("deleteKey")
    for client in (ann, bob):
        (event,) = client.wait_for(1, name="comment_posted")
        assert json.loads(event.data) == posted
    status, _, body = request(server.port, "GET", "/room/lobby/comments?limit=10")
    assert [c["text"] for c in json.loads(body)["comments"]] == ["<b>wow</b> such chat"]

    path = f"/room/lobby/comments/{posted['id']}"
    assert request(server.port, "DELETE", path)[0] == 401
    assert request(server.port, "DELETE", path, headers={"X-Delete-Key": "nope"})[0] == 403
    assert request(server.port, "DELETE", path, headers={"X-Delete-Key": key})[0] == 204
    assert request(server.port, "DELETE", path, headers={"X-Delete-Key": key})[0] == 404
    (deleted,) = ann.wait_for(1, name="comment_deleted")
    assert json.loads(deleted.data) == {"id": posted["id"], "room": "lobby"}

    bob.close()
    (left,) = ann.wait_for(1, name="user_left")
    assert json.loads(left.data) == {"room": "lobby", "user": "bob"}
    ann.close()
    wait_until(lambda: server.app.chat.presence.rooms == {})


def test_chat_rule_1_one_user_in_two_tabs_is_one_member(server):
    watcher = SSEClient(server.port, "/room/tabs/event?user=zed")
    tab1 = SSEClient(server.port, "/room/tabs/event?user=amy")
    tab2 = SSEClient(server.port, "/room/tabs/event?user=amy")
    assert [json.loads(e.data)["user"] for e in watcher.wait_for(2, name="user_joined")] == ["zed", "amy"]
    tab1.close()
    watcher.pump(0.3)
    assert watcher.wait_for(1, name="user_left", timeout=0.1) == []
    tab2.close()
    assert len(watcher.wait_for(1, name="user_left")) == 1
    watcher.close()


@pytest.mark.parametrize("body, status, field", [
    ({"user": "", "text": "hi"}, 422, "user"),
    ({"user": "a b", "text": "hi"}, 422, "user"),
    ({"user": "x" * 25, "text": "hi"}, 422, "user"),
    ({"user": "ann", "text": ""}, 422, "text"),
    ({"user": "ann", "text": "x" * 501}, 422, "text"),
    ({"user": "ann", "text": "a\x00b"}, 422, "text"),
    ({"user": "ann"}, 422, "text"),
    ([1], 400, "body"),
])
def test_bad_comments_are_refused(server, body, status, field):
    got, _, text = request(server.port, "POST", "/room/lobby/comments", body)
    assert got == status and json.loads(text)["error"].startswith(field)
    assert request(server.port, "GET", "/room/bad%20room/comments")[0] == 400


def test_chat_rule_5_comments_are_rate_limited_per_client(tmp_path):
    with AppThread(tmp_path / "rl.db", comment_burst=3, comment_rate=0.01) as s:
        statuses = [request(s.port, "POST", "/room/r/comments", {"user": "spam", "text": "x"})[0] for _ in range(5)]
        assert statuses == [201, 201, 201, 429, 429]


@pytest.mark.parametrize("rate, wait", [(0.25, "4"), (100, "1")])
def test_chat_rule_5_a_refused_comment_says_when_the_next_one_will_be_taken(tmp_path, rate, wait):
    """Retry-After: the seconds until the bucket holds a token again, rounded up, and at least 1."""
    with AppThread(tmp_path / "ra.db", comment_burst=1, comment_rate=rate) as s:
        assert request(s.port, "POST", "/room/r/comments", {"user": "ann", "text": "one"})[0] == 201
        status, headers, _ = request(s.port, "POST", "/room/r/comments", {"user": "ann", "text": "two"})
        assert status == 429 and headers["retry-after"] == wait


def test_comments_survive_a_restart(tmp_path):
    db = tmp_path / "c.db"
    with ServerProcess(db, "--no-demo") as srv:
        assert request(srv.port, "POST", "/room/keep/comments", {"user": "ann", "text": "still here"})[0] == 201
    with ServerProcess(db, "--no-demo") as srv:
        _, _, body = request(srv.port, "GET", "/room/keep/comments")
        assert [c["text"] for c in json.loads(body)["comments"]] == ["still here"]


def test_metrics(server):
    with SSEClient(server.port, "/ticker/M/event") as client:
        publish(server.port, "M", 1, 2)
        client.wait_for(2)
        request(server.port, "POST", "/ticker/M/price", {"price": -1})
        wait_until(lambda: server.app.store.batches_written >= 1)
        status, headers, body = request(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples["monkestream_streams_open"] == "1"
    assert int(samples["monkestream_connections_open"]) >= 2  # the stream's and the scrape's
    assert int(samples["monkestream_connections_total"]) >= int(samples["monkestream_connections_open"]) + 2
    assert 0 < int(samples["monkestream_tasks"]) < 10  # the pipelines' few, none per stream
    assert samples['monkestream_stream_subscribers{kind="ticker"}'] == "1"
    assert samples["monkestream_events_published_total"] == "2"
    assert int(samples["monkestream_events_delivered_total"]) >= 2
    assert samples['monkestream_ingest_requests_total{status="201"}'] == "1"
    assert samples['monkestream_ingest_requests_total{status="422"}'] == "1"
    assert int(samples["monkestream_sqlite_rows_total"]) == 2
    assert 'monkestream_streams_closed_total{reason="slow"}' in samples


def test_store_rule_5_history_past_the_retention_is_deleted_and_not_replayed(tmp_path):
    db = tmp_path / "old.db"
    with AppThread(db) as s:
        publish(s.port, "OLD", 1, 2, 3)
    conn = sqlite3.connect(db)
    ten_days_ago = int(time.time()) - 10 * 86400
    conn.execute("UPDATE tickers SET created_at = ?", (ten_days_ago,))
    conn.execute("UPDATE runs SET epoch = epoch - ?", (10 * 86400 * 1000,))
    conn.execute("UPDATE tickers SET epoch = epoch - ?", (10 * 86400 * 1000,))
    conn.commit()
    (old_epoch,) = conn.execute("SELECT MIN(epoch) FROM runs").fetchone()
    conn.close()
    old_id = f"{old_epoch}-1"
    with AppThread(db, history_days=1) as s:
        wait_until(lambda: s.app.store.rows_pruned == 3)
        status, _, body = request(s.port, "GET", "/ticker/OLD/history")
        assert json.loads(body)["tickers"] == []
        with SSEClient(s.port, "/ticker/OLD/event", {"Last-Event-ID": old_id}) as client:
            assert client.wait_for(1, name="reset")
        _, _, metrics = request(s.port, "GET", "/metrics")
        assert "monkestream_sqlite_pruned_rows_total 3" in metrics.decode()


def test_replay_rule_4_a_long_resume_comes_in_parts_each_within_the_budget(tmp_path):
    budget = 16384
    with AppThread(tmp_path / "s.db", flush_interval=0.05, replay_events=8, stream_buffer=budget) as s:
        with SSEClient(s.port, "/ticker/GAP/event") as first:
            wait_until(lambda: first.pump(0.05) or first.parser.last_event_id)  # its position frame
            start = first.parser.last_event_id
        publish(s.port, "GAP", *range(1, 1001))   # about 100 kB of frames: several budgets
        wait_until(lambda: healthz(s.port)["unpersisted"] == 0)
        last_id, got, parts, sizes = start, [], 0, []
        while True:
            part = SSEClient(s.port, "/ticker/GAP/event", {"Last-Event-ID": last_id})
            while not part.closed:
                before = len(part.events)
                part.pump(0.3)
                if len(part.events) == before and part.parser.last_event_id != last_id and not part.closed:
                    break  # caught up: live and quiet
            sizes.append(sum(len(e.data) + len(e.last_event_id) + len(e.type) for e in part.events))
            got += part.events
            received = len(part.events)
            last_id = part.parser.last_event_id
            parts += 1
            part.close()
            if received == 0 or len(got) >= 1000 or parts > 50:
                break
        assert prices(got) == list(range(1, 1001))
        ids = [EventId.parse(e.last_event_id) for e in got]
        assert ids == sorted(set(ids))
        assert parts >= 100_000 // budget  # in parts, each ended by the server with a short retry
        assert max(sizes) <= budget
        closed = s.call(lambda: s.app.hub.closed_by_reason[CloseReason.CATCH_UP])
        assert closed == parts - 1


# -- the module's rules, on virtual time: a real Server and Hub, connections on fake transports ----


class Present:
    """A ``Member`` that records when it is attached and closed; its frame follows the backlog."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def ready(self) -> None:
        self.calls.append("ready")

    def attached(self) -> list[bytes]:
        self.calls.append("attached")
        return [encode_event("hello", "{}")]

    def closed(self) -> None:
        self.calls.append("closed")


async def stream_server(scheduler: VirtualScheduler, members: list[Present] | None = None,
                        budget: int = 65536, **budgets: int) -> Server:
    """``GET /s/{topic}`` opens a stream through a ``StreamOpener``, with the next of ``members`` present."""
    hub = Hub(epoch=1, wire_framing=chunk, scheduler=scheduler, limits=budgets)
    # no topic here is a ticker's: nothing is read from SQLite, so the store is never opened
    replayer = Replayer(hub, Store(":memory:"), stored_symbol=lambda topic: None, budget_bytes=budget)
    opener = StreamOpener(hub, replayer)

    def open_one(ex: Exchange):
        return opener(ex, [ex.params["topic"]], members.pop(0) if members else None)

    router = Router()
    router.add("GET", "/s/{topic}", open_one, "a stream on one topic")
    server = Server(Config(port=0, no_demo=True), hub, router, rng=Lowest())
    await server.start()
    return server


def asking(topic: str, query: str = "", last_id: str | None = None) -> bytes:
    header = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
    return f"GET /s/{topic}{query} HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode()


def arrive(server: Server, request_bytes: bytes) -> tuple[Connection, FakeTransport]:
    """A connection whose request is answered in this step; nothing it sets off has run yet."""
    conn = Connection(server)
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(request_bytes)
    return conn, transport


def received(transport: FakeTransport) -> list[tuple[str, str]]:
    """(type, data) of each event the stream was sent, read as a browser would."""
    reader = SSEClient(0, "/", connect=False)
    reader._chunked = True
    reader._feed(b"".join(transport.writes).partition(b"\r\n\r\n")[2])
    return [(e.type, e.data) for e in reader.events]


@marble_test
async def test_streams_rule_1_a_stream_resumes_after_the_header_else_the_query_else_where_the_hub_stands(
        scheduler: VirtualScheduler) -> None:
    server = await stream_server(scheduler)
    hub = server.hub
    ids = [str(hub.publish("room:r", "e", n).id) for n in range(3)]
    _, both = arrive(server, asking("room:r", f"?lastEventId={ids[0]}", ids[1]))
    _, query = arrive(server, asking("room:r", f"?lastEventId={ids[0]}"))
    await scheduler.advance(0)
    _, neither = arrive(server, asking("room:r"))
    assert neither.writes[0].startswith(b"HTTP/1.1 200 ")  # its head is out...
    hub.publish("room:r", "e", 3)  # ...and this comes before it is attached
    await scheduler.advance(0)
    hub.publish("room:r", "e", 4)
    await scheduler.advance(0)
    assert [data for _, data in received(both)] == ["2", "3", "4"]
    assert [data for _, data in received(query)] == ["1", "2", "3", "4"]
    assert [data for _, data in received(neither)] == ["3", "4"]
    await server.stop()


@marble_test
async def test_streams_rule_2_streams_opened_in_one_step_never_take_the_hub_past_a_topic_budget(
        scheduler: VirtualScheduler) -> None:
    server = await stream_server(scheduler, room=2)
    hub = server.hub
    opened = [arrive(server, asking(f"room:{name}")) for name in "abc"]  # all answered before any is attached
    heads = [transport.writes[0] for _, transport in opened]
    assert [head[:12] for head in heads] == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 503"]
    assert b"Retry-After: " in heads[2]
    await scheduler.advance(0)
    assert sorted(hub.topics) == ["room:a", "room:b"]
    assert opened[0][0].stream is not None and opened[1][0].stream is not None
    opened[0][0].connection_lost(None)  # room:a's only stream ends: its topic is given back
    _, again = arrive(server, asking("room:c"))
    assert again.writes[0].startswith(b"HTTP/1.1 200 ")
    await scheduler.advance(0)
    assert sorted(hub.topics) == ["room:b", "room:c"]
    await server.stop()


@marble_test
async def test_streams_rule_3_a_member_is_attached_with_its_stream_after_its_backlog_and_closed_once(
        scheduler: VirtualScheduler) -> None:
    members = [Present() for _ in range(4)]
    live, partial, dropped, shut = members
    server = await stream_server(scheduler, list(members), budget=400)
    hub = server.hub
    first = hub.publish("room:r", "e", "x" * 10)
    hub.publish("room:r", "e", "y" * 10)
    conn, transport = arrive(server, asking("room:r", last_id=str(first.id)))
    await scheduler.advance(0)
    assert live.calls == ["ready", "attached"] and conn.stream is not None
    assert received(transport) == [("e", '"' + "y" * 10 + '"'), ("hello", "{}")]  # the backlog, then its frame
    for n in range(20):
        hub.publish("room:r", "e", n * 10**9)  # more than a budget of 400 bytes holds
    _, cut = arrive(server, asking("room:r", last_id=str(first.id)))
    await scheduler.advance(0)
    assert partial.calls == ["ready", "closed"] and cut.closed  # sent in part and closed: never attached
    gone, _ = arrive(server, asking("room:r"))
    gone.connection_lost(None)  # the client left before its stream was attached
    await scheduler.advance(0)
    assert dropped.calls == ["closed"]
    conn.connection_lost(None)
    assert live.calls == ["ready", "attached", "closed"]
    arrive(server, asking("room:r"))
    await scheduler.advance(0)
    await server.stop()  # whatever ends it
    assert shut.calls == ["ready", "attached", "closed"]


# -- the all-topics stream: its resume (replay Rule 5) and GET /events?topic=* (streams Rule 4) ----


def labelled_frames(raw: bytes) -> list[dict[str, str]]:
    """Each event frame of an all-topics stream's bytes, its fields by name (``topic``, ``keep``, ...)."""
    frames = []
    for block in raw.split(b"\n\n"):
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(":")
            if name:
                fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            frames.append(fields)
    return frames


class RawParser(EventStreamParser):
    """The browser's parser, keeping the bytes it was fed: the labels it ignores are in them."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = b""

    def feed(self, chunk: bytes) -> list:
        self.raw += chunk
        return super().feed(chunk)


def every_topic_client(port: int, headers: dict[str, str] | None = None, path: str = "/events?topic=*") -> SSEClient:
    client = SSEClient(port, path, headers, connect=False)
    client.parser = RawParser()
    client.connect()
    return client


def test_replay_rule_5_the_all_topics_stream_resumes_over_every_topic_labelled_with_sqlite_for_a_wrapped_ticker(tmp_path):
    async def main():
        store = Store(str(tmp_path / "every.db"))
        hub = Hub(epoch=await store.open(), replay_events=3)
        replayer = Replayer(hub, store, stored_symbol=topic_symbol, budget_bytes=65536)
        start = hub.last_id()
        rows, prices, kept, wrapped = [], [], [], []
        for i in range(6):   # six prices: the ring keeps the last three, SQLite all of them
            ticker = Ticker("WRAP", f"{i}.5", "USD", 1_700_000_000 + i)
            prices.append(hub.publish("ticker:WRAP", "price_update", None, json_text=ticker.to_json()))
            rows.append((prices[-1].seq, ticker))
            wrapped.append(hub.publish("room:wrapped", "comment_posted", {"n": i}))   # its ring wraps too: a reset
            if i % 2:
                kept.append(hub.publish("room:kept", "comment_posted", {"n": i}))
        hub.publish("room:kept", "user_joined", {"user": "ann"}, keep=False)   # live only: never replayed
        await store.append_tickers(rows, len(rows), rows[-1][0])

        build = await replayer.prepare([EVERY_TOPIC], str(start))
        assert replayer.sqlite_reads == 1
        backlog = build()
        assert backlog.complete
        reset, *rest = backlog.frames
        assert reset == reset_event(["room:wrapped"], str(start))   # names the room, not every topic
        expected = sorted([*prices, *kept], key=lambda e: e.seq)
        assert rest == [label_frame(e.topic, True, e.frame) for e in expected]  # SQLite's rows labelled too
        got = labelled_frames(b"".join(rest))
        assert [(f["topic"], f["id"]) for f in got] == [(e.topic, str(e.id)) for e in expected]
        assert not any("keep" in f for f in got)

        # from inside the rings' reach: nothing is read, nothing reset
        build = await replayer.prepare([EVERY_TOPIC], str(prices[3].id))
        assert replayer.sqlite_reads == 1
        tail = sorted([e for e in [*expected, *wrapped] if e.seq > prices[3].seq], key=lambda e: e.seq)
        assert {e.topic for e in tail} == {"ticker:WRAP", "room:kept", "room:wrapped"}
        assert build().frames == [label_frame(e.topic, True, e.frame) for e in tail]
        await store.close(hub.seq)
    asyncio.run(main())


def test_replay_rule_5_when_the_hub_cannot_tell_the_all_topics_stream_gets_one_reset_naming_every_topic(tmp_path):
    async def main():
        store = Store(str(tmp_path / "star.db"))
        hub = Hub(epoch=await store.open())
        replayer = Replayer(hub, store, stored_symbol=topic_symbol, budget_bytes=65536)
        first = hub.publish("room:a", "comment_posted", {"n": 1})
        hub.publish("room:b", "comment_posted", {"n": 2})
        future = str(EventId(hub.epoch, hub.seq + 5))
        other_run = str(EventId(hub.epoch - 1000, 3))
        for last_id in ["garbage", future, other_run]:
            backlog = (await replayer.prepare([EVERY_TOPIC], last_id))()
            assert backlog.frames == [reset_event([EVERY_TOPIC], last_id)] and backlog.complete
            (reset,) = labelled_frames(backlog.frames[0])
            assert reset["event"] == "reset" and json.loads(reset["data"])["topics"] == ["*"]
        # a cut (the relay's upstream lost events) leaves the hub unable to tell from before it
        hub.cut(["room:a"])
        backlog = (await replayer.prepare([EVERY_TOPIC], str(first.id)))()
        assert backlog.frames == [reset_event([EVERY_TOPIC], str(first.id))]
        assert replayer.sqlite_reads == 0
        await store.close(hub.seq)
    asyncio.run(main())


def test_replay_rule_5_a_relay_resuming_from_the_server_gets_sqlite_prices_and_a_room_reset_labelled(tmp_path):
    with AppThread(tmp_path / "e.db", flush_interval=0.05, replay_events=3, comment_burst=100) as s:
        with every_topic_client(s.port) as first:
            wait_until(lambda: first.pump(0.05) or first.parser.last_event_id)   # its position
            position = first.parser.last_event_id
        publish(s.port, "WRAP", *range(1, 11))
        for i in range(5):
            assert request(s.port, "POST", "/room/wrapped/comments", {"user": "ann", "text": f"c{i}"})[0] == 201
        wait_until(lambda: healthz(s.port)["unpersisted"] == 0)
        with every_topic_client(s.port, {"Last-Event-ID": position}) as relay:
            (reset,) = relay.wait_for(1, name="reset")
            assert json.loads(reset.data)["topics"] == ["room:wrapped"]
            assert prices(relay.wait_for(11))[-10:] == list(range(1, 11))
            frames = labelled_frames(relay.parser.raw)
            wrap = [f for f in frames if f.get("event") == "price_update"]
            assert [f["topic"] for f in wrap] == ["ticker:WRAP"] * 10   # the seven SQLite gave too
            ids = [EventId.parse(f["id"]) for f in frames if "id" in f]
            assert ids == sorted(ids)
            # and it goes on live, labelled
            assert request(s.port, "POST", "/room/wrapped/comments", {"user": "bo", "text": "live"})[0] == 201
            (live,) = relay.wait_for(1, name="comment_posted")
            assert labelled_frames(relay.parser.raw)[-1]["topic"] == "room:wrapped"
            assert json.loads(live.data)["text"] == "live"


def test_streams_rule_4_the_all_topics_stream_needs_the_token_when_one_is_set(tmp_path):
    with AppThread(tmp_path / "tok.db", token="sesame", flush_interval=0.05) as s:
        for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "sesame"},
                        {"X-Relay-Token": "sesame"}]:
            status, response_headers, body = request(s.port, "GET", "/events?topic=*", headers=headers)
            assert status == 401 and "error" in json.loads(body), headers
            assert response_headers["www-authenticate"].startswith("Bearer")
        assert s.call(lambda: s.app.hub.stream_count) == 0
        # a normal stream needs no token
        with SSEClient(s.port, "/events?topic=room:open") as browser:
            assert browser.status == 200
        with every_topic_client(s.port, {"Authorization": "Bearer sesame"}) as relay:
            assert relay.status == 200 and relay.response_headers["content-type"] == "text/event-stream"
            assert request(s.port, "POST", "/room/any/comments", {"user": "ann", "text": "hi"})[0] == 201
            status, _, _ = request(s.port, "POST", "/ticker/TOK/price", {"price": "1.5"},
                                   headers={"Authorization": "Bearer sesame"})
            assert status == 201
            comment, price = relay.wait_for(2)
            assert (comment.type, price.type) == ("comment_posted", "price_update")
            labels = [f["topic"] for f in labelled_frames(relay.parser.raw)]
            assert labels[-2:] == ["room:any", "ticker:TOK"]
    with AppThread(tmp_path / "open.db", flush_interval=0.05) as s:   # no token set: open to all
        with every_topic_client(s.port) as relay:
            assert relay.status == 200
            assert request(s.port, "POST", "/room/any/comments", {"user": "ann", "text": "hi"})[0] == 201
            (comment,) = relay.wait_for(1, name="comment_posted")
            assert labelled_frames(relay.parser.raw)[-1]["topic"] == "room:any"


@pytest.mark.parametrize("path", [
    "/events?topic=*&topic=ticker:A",
    "/events?topic=room:lobby&topic=*",
    "/events?topic=*&user=ann",
    "/events?topic=*&user=",
])
def test_streams_rule_4_the_all_topics_stream_takes_no_other_topic_and_no_user(server, path):
    for headers in [{}, {"Authorization": "Bearer whatever"}]:
        status, _, body = request(server.port, "GET", path, headers=headers)
        assert status == 400 and json.loads(body)["error"].startswith("topic"), (path, body)
    assert server.call(lambda: server.app.hub.stream_count) == 0


def test_streams_rule_4_the_all_topics_stream_may_hold_the_relay_buffer_unsent(tmp_path):
    # a normal stream's buffer is as big as can be: only the relay buffer can close the stream
    with AppThread(tmp_path / "buf.db", relay_buffer=4096, stream_buffer=64 * 1024 * 1024,
                   flush_interval=0.05) as s:
        normal = stalled_client(s.port, "/events?topic=ticker:BIG")
        relay = stalled_client(s.port, "/events?topic=*")
        wait_until(lambda: s.app.hub.stream_count == 2)
        caps = s.call(lambda: sorted(st.cap_bytes for st in s.app.hub.streams()))
        assert caps == [4096, 64 * 1024 * 1024]
        for start in range(0, 200_000, 5000):   # at most about 26 MB of frames
            publish(s.port, "BIG", *range(start + 1, start + 5001))
            if s.call(lambda: s.app.hub.closed_by_reason[CloseReason.SLOW]):
                break
        wait_until(lambda: s.app.hub.closed_by_reason[CloseReason.SLOW] == 1)
        assert s.call(lambda: [st.topics for st in s.app.hub.streams()]) == [("ticker:BIG",)]  # the normal one stays
        normal.close()
        relay.close()
