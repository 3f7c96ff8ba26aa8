"""Anonymous attacks against the real server, each run for real and checked against its budget.

Streams and chat are public, so anyone can open them. Each test here starts
``python -m monkestream`` on an ephemeral port with a real SQLite file, runs
one attack over real sockets in bounded time, and checks what the server
holds (RSS from ``/proc``, topics and ring bytes from ``/metrics``) and that
legitimate ingest and streams keep working during and after it:

1. replay amplification: small requests asking for a huge resume;
2. topic exhaustion: streams and comments on ever new rooms;
3. ring filling: joining and leaving many rooms, publishing presence.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from monkestream.sse import EventId
from helpers import ServerProcess, SSEClient, healthz, post_tickers, request

OPEN_LOTS = ("--join-rate", "100000", "--join-burst", "100000", "--comment-rate", "100000",
             "--comment-burst", "100000")   # the per-client limits are tested elsewhere: here, the budgets


def rss_mb(server: ServerProcess) -> float:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metric(port: int, name: str, labels: str = "") -> float:
    _, _, body = request(port, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def open_raw(port: int, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A stream request on a socket that is then never read."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lines = [f"GET {path} HTTP/1.1", "Host: t", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def test_replay_amplification_is_held_to_the_stream_budget(tmp_path):
    symbols = [f"S{i}" for i in range(32)]
    with ServerProcess(tmp_path / "a.db", "--no-demo", "--flush-interval", "0.2") as srv:
        start = healthz(srv.port)["lastEventId"]
        for symbol in symbols:
            status, _ = post_tickers(srv.port, [{"symbol": symbol, "price": str(i + 1)} for i in range(10000)],
                                     timeout=30)
            assert status == 201
        wait_until(lambda: healthz(srv.port)["unpersisted"] == 0, 30)
        path = "/events?" + "&".join(f"topic=ticker:{s}" for s in symbols)
        assert len(path) < 800  # the attack costs the client a few hundred bytes
        baseline = rss_mb(srv)

        # one reader: what one such request returns before the server ends it
        sock = open_raw(srv.port, path, {"Last-Event-ID": start})
        sock.settimeout(10)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        sock.close()
        assert len(got) < 300_000, f"{len(got)} bytes for one request"  # the 256 KiB budget, not 39 MB
        assert b"\nretry: " in got[-100:] and got.endswith(b"0\r\n\r\n")  # ended: resume for the rest

        # twenty that never read
        attackers = [open_raw(srv.port, path, {"Last-Event-ID": start}) for _ in range(20)]
        wait_until(lambda: metric(srv.port, "monkestream_replay_partial_total") == 21, 20)  # all answered
        during = rss_mb(srv)
        status, _ = post_tickers(srv.port, [{"symbol": "LEGIT", "price": "1"}])
        assert status == 201   # ingest still works
        with SSEClient(srv.port, "/ticker/LEGIT/event") as legit:
            legit.wait_for(0)
            post_tickers(srv.port, [{"symbol": "LEGIT", "price": "2"}])
            assert [e.data for e in legit.wait_for(1, name="price_update")][-1].startswith('{"symbol":"LEGIT"')
        for sock in attackers:
            sock.close()
        time.sleep(1)
        after = rss_mb(srv)
        print(f"replay amplification: RSS {baseline:.0f} MB before, {during:.0f} MB during, {after:.0f} MB after")
        assert during - baseline < 40, (baseline, during)
        assert after < baseline * 1.2, (baseline, after)


def test_chat_rule_8_topic_exhaustion_frees_its_rooms_and_never_blocks_prices(tmp_path):
    with ServerProcess(tmp_path / "t.db", "--no-demo", "--max-rooms", "50", "--max-topics", "50",
                       *OPEN_LOTS) as srv:
        baseline = rss_mb(srv)
        # open and close streams on ever new rooms, 16 at a time
        def churn(first: int) -> None:
            for i in range(first, first + 300, 16):
                socks = []
                for j in range(i, min(i + 16, first + 300)):
                    sock = open_raw(srv.port, f"/room/r{j}/event?user=u")
                    sock.settimeout(5)
                    socks.append(sock)
                for sock in socks:
                    sock.recv(1024)   # its head: the stream opened (or was refused)
                    sock.close()
        threads = [threading.Thread(target=churn, args=(k * 300,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # the rooms of presence alone are forgotten with their last stream
        wait_until(lambda: metric(srv.port, "monkestream_topics_by_kind", '{kind="room"}') == 0)
        assert request(srv.port, "POST", "/ticker/NEWCOIN/price", {"price": "1"})[0] == 201
        fresh = SSEClient(srv.port, "/room/fresh/event?user=ann")
        assert fresh.status == 200 and fresh.wait_for(1, name="members")

        # concurrent opens on new rooms never pass the budget, and comments are held to it too
        socks = [open_raw(srv.port, f"/room/k{i}/event") for i in range(120)]
        heads = []
        for sock in socks:
            sock.settimeout(5)
            heads.append(sock.recv(1024).split(b"\r\n", 1)[0])
        assert sum(b" 200 " in h for h in heads) == 49   # 50 rooms, "fresh" holds one
        assert all(b" 503 " in h for h in heads if b" 200 " not in h)
        assert metric(srv.port, "monkestream_topics_by_kind", '{kind="room"}') == 50
        status, _, body = request(srv.port, "POST", "/room/full/comments", {"user": "u", "text": "hi"})
        assert status == 503 and json.loads(body) == {"error": "too many rooms"}
        assert json.loads(request(srv.port, "GET", "/room/full/comments")[2])["comments"] == []  # nothing stored
        assert request(srv.port, "POST", "/ticker/OTHER/price", {"price": "2"})[0] == 201  # rooms never block prices
        for sock in socks:
            sock.close()
        wait_until(lambda: metric(srv.port, "monkestream_topics_by_kind", '{kind="room"}') == 1)  # "fresh"
        fresh.close()
        print(f"topic exhaustion: RSS {baseline:.0f} MB before, {rss_mb(srv):.0f} MB after")


def test_chat_rule_8_presence_churn_fills_no_ring(tmp_path):
    rooms = "&".join(f"topic=room:p{i}" for i in range(32))
    with ServerProcess(tmp_path / "p.db", "--no-demo", *OPEN_LOTS) as srv:
        with SSEClient(srv.port, f"/events?{rooms}") as watcher:   # someone in every room sees the churn
            baseline = rss_mb(srv)
            for i in range(0, 300, 30):
                socks = [open_raw(srv.port, f"/events?{rooms}&user=u{j}") for j in range(i, i + 30)]
                for sock in socks:
                    sock.settimeout(5)
                    sock.recv(1024)
                    sock.close()
                watcher.pump(0.05)
            watcher.pump(0.5)
            joins = [e for e in watcher.events if e.type in ("user_joined", "user_left")]
            assert len(joins) == 300 * 32 * 2   # the presence was published, live
            assert metric(srv.port, "monkestream_ring_bytes") == 0   # and none of it kept
            during = rss_mb(srv)
        print(f"presence churn: RSS {baseline:.0f} MB before, {during:.0f} MB after 9,600 joins and leaves")
        assert during - baseline < 30


def test_all_rings_together_stay_within_replay_bytes(tmp_path):
    with ServerProcess(tmp_path / "r.db", "--no-demo", "--replay-bytes", "1000000", *OPEN_LOTS) as srv:
        first = EventId.parse(healthz(srv.port)["lastEventId"])
        for batch in range(10):
            tickers = [{"symbol": f"R{i % 500}", "price": str(batch * 10000 + i + 1)} for i in range(10000)]
            assert post_tickers(srv.port, tickers, timeout=30)[0] == 201
        assert 900_000 <= metric(srv.port, "monkestream_ring_bytes") <= 1_000_000
        # what was trimmed is no longer claimed: an early resume of R0 comes from SQLite, whole
        wait_until(lambda: healthz(srv.port)["unpersisted"] == 0, 30)
        reads = metric(srv.port, "monkestream_replay_sqlite_reads_total")
        with SSEClient(srv.port, "/ticker/R0/event", {"Last-Event-ID": str(first)}) as client:
            prices = [json.loads(e.data)["price"] for e in client.wait_for(200, name="price_update")]
        assert prices == [batch * 10000 + 1 for batch in range(10)] * 0 + [
            batch * 10000 + i + 1 for batch in range(10) for i in range(0, 10000, 500)]
        assert metric(srv.port, "monkestream_replay_sqlite_reads_total") == reads + 1
