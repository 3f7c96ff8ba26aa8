"""Soak: connection churn, stalled readers, ingest bursts and chat at once, then nothing may be left.

The churn lasts ``MONKESTREAM_SOAK_SECONDS`` (default 8). A long run quotes
well, e.g. ten minutes::

    MONKESTREAM_SOAK_SECONDS=600 python -m pytest -q -s tests/test_soak.py

At the 2,000-4,000 connects/s measured on two cores, that is well over a
million stream connects (the counts and the rate are printed). Afterwards the
server must be back where it started: the same open file descriptors, no open
stream or subscriber, no one present in a room, a new stream accepted, and
its resident memory within ``RSS_MARGIN_MB`` of the baseline.

The churn runs in worker processes (this file run as a script), each a
selector loop over non-blocking sockets; a connection ends with a reset, so
neither side piles up TIME_WAIT sockets over a long run.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

SOAK_SECONDS = float(os.environ.get("MONKESTREAM_SOAK_SECONDS", "8"))
RSS_MARGIN_MB = 30
CHURN_WORKERS = 2
CHURN_CONCURRENCY = 64
SYMBOLS = [f"SOAK{i}" for i in range(4)]
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), per destination
LINGER_RESET = struct.pack("ii", 1, 0)

# What a churning client does with its connection, in turn.
PLANS = (
    ("/ticker/SOAK0/event", "head"),                      # wait for the response head, then reset
    ("/events?topic=ticker:SOAK1&topic=room:soak", "sent"),  # reset right after the request
    ("/room/soak/event?user=c{n}", "event"),              # join the room, read the first event, reset
    ("", "connect"),                                      # connect and reset without a word
    ("/ticker/SOAK2/event", "head", "Last-Event-ID: 1-1\r\n"),  # a stale id: a reset event, then reset
    ("/ticker/SOAK3/event", "partial"),                   # half a request head, then reset
)


# -- the churn worker (this file run as a script) ---------------------------------------


def churn(port: int, subnet: int, seconds: float, concurrency: int) -> dict[str, int]:
    """Open and drop stream connections as fast as the server takes them, for ``seconds``."""
    sel = selectors.DefaultSelector()
    stats = {"connects": 0, "heads": 0, "refused": 0, "timeouts": 0, "errors": 0}
    n = 0
    open_socks = 0
    deadline = time.monotonic() + seconds

    def finish(sock: socket.socket) -> None:
        nonlocal open_socks
        sel.unregister(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
        sock.close()
        open_socks -= 1

    def start() -> None:
        nonlocal n, open_socks
        n += 1
        plan = PLANS[n % len(PLANS)]
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.0.{subnet}.{1 + n % 250}", 0))  # many addresses: per-client limits stay far
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            stats["errors"] += 1
            sock.close()
            return
        open_socks += 1
        sel.register(sock, selectors.EVENT_WRITE, [plan, n, b"", time.monotonic() + 3])

    while time.monotonic() < deadline:
        while open_socks < concurrency:
            start()
        for key, _ in sel.select(0.05):
            sock, state = key.fileobj, key.data
            plan, number, buf, _ = state
            if sel.get_key(sock).events == selectors.EVENT_WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    stats["errors"] += 1
                    finish(sock)
                    continue
                stats["connects"] += 1
                path, mode = plan[0], plan[1]
                if mode == "connect":
                    finish(sock)
                    continue
                extra = plan[2] if len(plan) > 2 else ""
                request = f"GET {path.format(n=number % 40)} HTTP/1.1\r\nHost: soak\r\n{extra}\r\n".encode()
                try:
                    sock.send(request[:20] if mode == "partial" else request)
                except OSError:
                    stats["errors"] += 1
                    finish(sock)
                    continue
                if mode in ("sent", "partial"):
                    finish(sock)
                    continue
                sel.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                got = sock.recv(65536)
            except OSError:
                got = b""
            if not got:
                stats["errors"] += 1
                finish(sock)
                continue
            buf = state[2] = buf + got
            head, sep, body = buf.partition(b"\r\n\r\n")
            if not sep:
                continue
            if not head.startswith(b"HTTP/1.1 200 "):
                stats["refused"] += 1
                finish(sock)
                continue
            if plan[1] == "event" and b"event: members" not in body:
                continue
            stats["heads"] += 1
            finish(sock)
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            if key.data[3] < now:
                stats["timeouts"] += 1
                finish(key.fileobj)
    for key in list(sel.get_map().values()):
        finish(key.fileobj)
    return stats


if __name__ == "__main__" and sys.argv[1:2] == ["churn"]:
    port, subnet, seconds, concurrency = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    print(json.dumps(churn(port, subnet, seconds, concurrency)), flush=True)
    sys.exit(0)


# -- the test ---------------------------------------------------------------------------

import http.client  # the worker above needs none of these

import pytest
from helpers import ServerProcess, SSEClient, request

from monkestream.sse import EventId


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metrics(port: int) -> dict[str, float]:
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))}


def settled(srv: ServerProcess, idle_fds: int, timeout: float = 10.0) -> dict[str, float]:
    """Wait until no stream subscribes and the fds are back to ``idle_fds``; return the last metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv.port)
        subscribers = sum(v for k, v in m.items() if k.startswith("monkestream_stream_subscribers"))
        time.sleep(0.1)  # the /metrics connection itself is closed by now
        if subscribers == 0 and fd_count(srv.proc.pid) == idle_fds or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def stalled_reader(port: int, path: str) -> socket.socket:
    """A stream whose reader never reads (a tiny receive buffer fills at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
    return sock


class Load:
    """Ingest bursts, chat posts, stalled readers and one healthy reader, on threads, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.counts = {"tickers": 0, "ingest_503": 0, "comments": 0, "stalled": 0, "healthy_events": 0, "resets": 0}
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._guard, args=(fn,), daemon=True)
                         for fn in (self._ingest, self._chat, self._stall, self._read)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(15)

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException:  # noqa: BLE001 - reported by the test
            self.errors.append(traceback.format_exc())

    def _ingest(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        price = 0
        while not self.stop.is_set():
            symbol = SYMBOLS[price // 1000 % 4 // 3]  # mostly SOAK0, where most stalled readers are
            batch = []
            for _ in range(1000):
                price += 1
                batch.append({"symbol": symbol, "price": str(price)})
            conn.request("POST", "/tickers", json.dumps(batch).encode())
            response = conn.getresponse()
            response.read()
            if response.status == 201:
                self.counts["tickers"] += len(batch)
            else:
                assert response.status == 503, response.status
                self.counts["ingest_503"] += 1
            self.stop.wait(0.02)  # bursts, not a flood: the churn gets the loop too
        conn.close()

    def _chat(self) -> None:
        body = json.dumps({"user": "talker", "text": "x" * 450}).encode()
        post = b"POST /room/soak/comments HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            while not self.stop.is_set():
                sock.sendall(post * 20)  # pipelined: a burst of comments per round trip
                answered = b""
                while answered.count(b"HTTP/1.1 ") < 20 or not answered.endswith(b"}"):
                    answered += sock.recv(65536)
                assert answered.count(b"HTTP/1.1 201 ") == 20, answered[:300]
                self.counts["comments"] += 20
                self.stop.wait(0.01)

    def _stall(self) -> None:
        paths = ["/ticker/SOAK0/event", "/events?topic=ticker:SOAK0&topic=room:soak", "/room/soak/event?user=staller"]
        socks = []
        while True:
            for path in paths:
                socks.append(stalled_reader(self.port, path))
                self.counts["stalled"] += 1
            if self.stop.wait(1.0):
                break
        for sock in socks:
            sock.close()

    def _read(self) -> None:
        while not self.stop.is_set():
            with SSEClient(self.port, "/events?topic=ticker:SOAK0&topic=room:soak") as client:
                while not self.stop.is_set() and not client.closed:
                    client.pump(0.2)
                # a bulk larger than the replay ring, published between the request and the
                # stream going live, is announced by a reset (and the reset carries no id)
                live = [e for e in client.events if e.type != "reset"]
                self.counts["healthy_events"] += len(live)
                self.counts["resets"] += len(client.events) - len(live)
                ids = [EventId.parse(e.last_event_id) for e in live]
                assert None not in ids and ids == sorted(ids), [e.last_event_id for e in live]


def run_churn(port: int, seconds: float) -> dict[str, int]:
    workers = [subprocess.Popen([sys.executable, __file__, "churn", str(port), str(w + 1), str(seconds),
                                 str(CHURN_CONCURRENCY)], stdout=subprocess.PIPE, text=True)
               for w in range(CHURN_WORKERS)]
    total: dict[str, int] = {}
    for worker in workers:
        out, _ = worker.communicate(timeout=seconds + 30)
        assert worker.returncode == 0, out
        for key, value in json.loads(out).items():
            total[key] = total.get(key, 0) + value
    return total


def soak_phase(port: int, seconds: float) -> tuple[Load, dict[str, int], float]:
    """Churn for ``seconds`` under load, then load alone for a while; return the load, churn counts, churn time."""
    with Load(port) as load:
        started = time.monotonic()
        churned = run_churn(port, seconds)
        elapsed = time.monotonic() - started
        time.sleep(2.5)  # ingest without churn: enough bytes to stall the stalled readers on SOAK0
    return load, churned, elapsed


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """Run the soak once; the tests below read its figures."""
    db = tmp_path_factory.mktemp("soak") / "soak.db"
    with ServerProcess(db, "--no-demo", "--flush-interval", "1", "--stream-buffer", "8192",
                       "--stall-timeout", "1", "--heartbeat", "1", "--max-stream-age", "6",
                       "--comment-rate", "100000", "--comment-burst", "100000",
                       "--join-rate", "100000", "--join-burst", "100000") as srv:
        pid = srv.proc.pid
        request(srv.port, "GET", "/healthz")   # the first connection makes uvloop open its spare (libuv's EMFILE trick)
        time.sleep(0.2)
        idle_fds = fd_count(pid)  # listening socket, SQLite, loop: no connection now
        # a short run first: the baseline then holds every path's working set, so what
        # the long run adds is what it leaks
        warm, _, _ = soak_phase(srv.port, 1.0)
        assert not warm.errors, warm.errors
        base = settled(srv, idle_fds)
        base_fds, base_rss = fd_count(pid), rss_mb(pid)

        load, churned, elapsed = soak_phase(srv.port, SOAK_SECONDS)
        assert not load.errors, load.errors

        after = settled(srv, idle_fds)
        after_fds, after_rss = fd_count(pid), rss_mb(pid)
        with SSEClient(srv.port, "/room/soak/event?user=probe") as probe:
            members = probe.wait_for(1, name="members")
            present = json.loads(members[0].data)["users"] if members else None
            health = json.loads(request(srv.port, "GET", "/healthz")[2])
        closed = {k.split('"')[1]: int(v) for k, v in after.items() if k.startswith("monkestream_streams_closed_total")}
        print(f"\nsoak {SOAK_SECONDS:.0f} s: {churned['connects']} connects ({churned['connects'] / elapsed:.0f}/s), "
              f"{churned['heads']} streams opened by churn, {churned['refused']} refused, "
              f"{churned['timeouts']} timeouts, {churned['errors']} errors; load {load.counts}; closed {closed}")
        print(f"fds {idle_fds} idle, {base_fds} -> {after_fds}; RSS {base_rss:.1f} -> {after_rss:.1f} MB; "
              f"streams {base['monkestream_streams_open']:.0f} -> {after['monkestream_streams_open']:.0f}; "
              f"topics {base['monkestream_topics']:.0f} -> {after['monkestream_topics']:.0f}; "
              f"errors {after['monkestream_errors_total']:.0f}; a new stream now gets {probe.status}")
        yield {"churned": churned, "load": load.counts, "base": base, "after": after, "closed": closed,
               "idle_fds": idle_fds, "base_fds": base_fds, "after_fds": after_fds,
               "base_rss": base_rss, "after_rss": after_rss, "present": present, "health": health,
               "probe_status": probe.status}


def test_soak_did_real_work(soak):
    assert soak["churned"]["connects"] > 100 * SOAK_SECONDS and soak["churned"]["heads"] > 0
    assert soak["churned"]["timeouts"] == 0
    load = soak["load"]
    assert load["tickers"] and load["comments"] and load["stalled"] and load["healthy_events"]
    closed = soak["closed"]
    assert closed.get("slow", 0) + closed.get("peer_gone", 0) > 0  # the stalled readers were cut off


def test_soak_leaves_no_connection_subscriber_or_presence(soak):
    after, base = soak["after"], soak["base"]
    assert soak["base_fds"] == soak["after_fds"] == soak["idle_fds"]
    assert all(v == 0 for k, v in after.items() if k.startswith("monkestream_stream_subscribers"))
    assert after["monkestream_subscriptions_open"] == base["monkestream_subscriptions_open"]
    assert after["monkestream_topics"] <= len(SYMBOLS) + 1
    assert after["monkestream_errors_total"] == 0
    assert soak["probe_status"] == 200
    assert soak["present"] == ["probe"]
    assert soak["health"]["status"] == "ok"




def test_soak_leaves_no_open_stream(soak):
    assert soak["base"]["monkestream_streams_open"] == 0
    assert soak["after"]["monkestream_streams_open"] == 0
    assert soak["health"]["streams"] == 1  # the probe


def test_soak_memory_returns_near_its_baseline(soak):
    assert soak["after_rss"] <= soak["base_rss"] + RSS_MARGIN_MB
