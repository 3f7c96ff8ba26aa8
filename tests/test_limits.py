"""At the limits: the open-file limit, accepting when descriptors run out, and a full server's answer.

The flood test starts the real server with a hard limit of 256 descriptors and
opens 600 streams at once from another process, on uvloop and on the default
asyncio loop; the acceptor's own test runs out of descriptors in this process,
on virtual time, to see each step of an episode at its instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import logging
import os
import re
import resource
import selectors
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import ROOT, AppThread, ServerProcess, SSEClient, healthz, request
from marbles import marble_test
from monkestream import limits
from monkestream.clock import VirtualScheduler
from monkestream.config import Config
from monkestream.hub import Hub
from monkestream.routing import Router
from monkestream.server import Server

LOW_LIMIT = 256
FLOOD = 600
FLOOD_HOLD_S = 3.0
HEALTHZ_WITHIN_S = 0.1
ANSWER_WITHIN_S = 3.0
LOG_AT_MOST_BYTES = 4096


def hard_limit(n: int) -> Any:
    """A preexec_fn giving the child an open-file limit of ``n``, soft and hard."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.fixture
def no_uvloop(tmp_path: Path) -> dict[str, str]:
    """Environment for a server process in which ``import uvloop`` fails, as where it is not installed."""
    hide = tmp_path / "no-uvloop"
    hide.mkdir()
    (hide / "uvloop.py").write_text("raise ImportError('uvloop is not installed here')\n")
    return {"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"}


def metric(port: int, name: str) -> float:
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200
    found = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.M)
    return float(found.group(1)) if found else 0.0


# -- capacity (limits Rule 1) ------------------------------------------------------------


def test_limits_rule_1_the_capacity_keeps_a_reserve_for_the_process_and_requests():
    assert limits.stream_capacity(256) == 256 - 32 - 32
    assert limits.stream_capacity(1024) == 1024 - 32 - 51
    assert limits.stream_capacity(65536) == 65536 - 32 - 3276
    assert limits.stream_capacity(40) == 1   # a server that can hold nothing still holds one


def test_limits_rule_1_the_server_raises_its_limit_says_its_capacity_and_caps_max_streams(tmp_path):
    soft_hard = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))  # noqa: E731
    with ServerProcess(tmp_path / "cap.db", "--no-demo", preexec_fn=soft_hard) as srv:
        capacity = limits.stream_capacity(300)
        assert healthz(srv.port)["config"]["max_streams"] == capacity
        log = srv.read_log()
    (line,) = [l for l in log.splitlines() if "open files:" in l]
    assert f"limit 300 (raised from 200), room for {capacity} streams" in line
    (capped,) = [l for l in log.splitlines() if "--max-streams" in l]
    assert f"--max-streams 20000 is more than an open-file limit of 300 allows: using {capacity}" in capped


def test_limits_rule_1_max_streams_under_the_capacity_stands(tmp_path):
    with ServerProcess(tmp_path / "fits.db", "--no-demo", "--max-streams", "50",
                       preexec_fn=hard_limit(LOW_LIMIT)) as srv:
        assert healthz(srv.port)["config"]["max_streams"] == 50
        assert "--max-streams" not in srv.read_log()


# -- the acceptor, out of descriptors in this process (limits Rules 2 to 4) --------------------------


class Descriptors:
    """This process's descriptors, used up to its soft limit on demand, and given back."""

    def __init__(self) -> None:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.hogs: list[int] = []

    def exhaust(self) -> None:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, self.limits[1]))
        while True:
            try:
                self.hogs.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                return

    def free(self) -> None:
        while self.hogs:
            os.close(self.hogs.pop())
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


@contextlib.contextmanager
def descriptors() -> Iterator[Descriptors]:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counting this process's descriptors needs /proc (Linux)")
    fds = Descriptors()
    try:
        yield fds
    finally:
        fds.free()


async def until(condition: Any, what: str, timeout: float = 3.0) -> None:
    """Let the loop do its I/O (real time) until ``condition()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def client(port: int, request_bytes: bytes = b"GET / HTTP/1.1\r\n\r\n") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    sock.sendall(request_bytes)
    return sock


def answer(sock: socket.socket) -> bytes:
    """What the server sent before closing."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@marble_test
async def test_limits_rule_4_an_episode_is_one_line_a_pause_then_refusals_then_accepting_again(scheduler: VirtualScheduler) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    acceptor = limits.Acceptor([listener], accepted.append, lambda data: b"REFUSED " + data[:3], scheduler)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("monkestream").addHandler(handler)
    early, late, later = (socket.socket() for _ in range(3))
    for sock in (early, late, later):
        sock.settimeout(2)
    try:
        with descriptors() as fds:
            acceptor.start()
            for sock in (early, late):
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /a HTTP/1.1\r\n\r\n")
            fds.exhaust()
            await until(lambda: acceptor.short_of is not None, "accept() to fail")
            # the first failure pauses: the waiting clients are not refused yet
            assert acceptor.short_of == "too many open files" and acceptor.pauses == {"EMFILE": 1}
            assert acceptor.refused == 0 and accepted == []
            await scheduler.advance(limits.ACCEPT_RETRY_S - 0.01)
            assert acceptor.refused == 0
            # still short after the pause: who waits is answered with the spare descriptor, and closed
            await scheduler.advance(0.01)
            await until(lambda: acceptor.refused == 2, "the waiting clients to be refused")
            assert answer(early) == answer(late) == b"REFUSED GET"
            later.connect(("127.0.0.1", port))
            later.sendall(b"PUT /b HTTP/1.1\r\n\r\n")
            await scheduler.advance(limits.ACCEPT_RETRY_S)
            await until(lambda: acceptor.refused == 3, "the later client to be refused")
            assert answer(later) == b"REFUSED PUT"
            # descriptors come back: the next connection is accepted, and the episode had one line
            fds.free()
            with client(port):
                await scheduler.advance(limits.ACCEPT_RETRY_S)
                await until(lambda: len(accepted) == 1, "a connection to be accepted")
            assert acceptor.short_of is None and acceptor.pauses == {"EMFILE": 1}
            assert [r.getMessage() for r in records if "accept() failed" in r.getMessage()] == [
                "accept() failed: too many open files (EMFILE): refusing new connections until descriptors "
                f"free up (retried every {limits.ACCEPT_RETRY_S:g} s)"]
            assert all(r.exc_info is None for r in records)
            # a failure after a quiet spell is a new episode, and a new line
            await scheduler.advance(limits.EPISODE_QUIET_S)
            with client(port):
                fds.exhaust()
                await until(lambda: acceptor.short_of is not None, "accept() to fail again")
            assert acceptor.pauses == {"EMFILE": 2}
            assert sum("accept() failed" in r.getMessage() for r in records) == 2
            fds.free()
    finally:
        logging.getLogger("monkestream").removeHandler(handler)
        acceptor.close()
        for sock in (early, late, later, *accepted):
            sock.close()


def test_limits_rule_3_a_connection_refused_at_the_limit_gets_the_answer_its_request_calls_for():
    server = Server(Config(full_retry_ms=1000), Hub(), Router())
    event_source = server.refusal(b"GET /events?topic=ticker:A HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
    head, _, body = event_source.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/event-stream" in head
    assert b"Connection: close" in head
    assert re.fullmatch(rb": [^\n]*\n\nretry: (\d+)\n\n", body)
    assert 1000 <= int(re.search(rb"retry: (\d+)", body).group(1)) <= 3000
    api = server.refusal(b"POST /tickers HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n[]")
    assert api.startswith(b"HTTP/1.1 503 ") and b"Retry-After: " in api and b"Connection: close" in api
    assert server.refusal(b"") == b""            # nothing sent yet: closing is the answer
    assert server.refusal(b"\x16\x03\x01garbage") == b""


# -- 600 streams against 256 descriptors -------------------------------------------------------


def flood(port: int, count: int, hold_s: float) -> dict[str, Any]:
    """Ask for ``count`` streams at once (every other one as an EventSource); report what each got, and when.

    Runs in its own process (``python tests/test_limits.py flood ...``), so that the
    test's own timing of /healthz shares no interpreter with it, and at a lower
    priority: these clients stand for other machines, not for a rival of the
    server for this one's CPU.
    """
    os.nice(10)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    states: list[dict[str, Any]] = []
    started = time.monotonic()
    for i in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        accept = "Accept: text/event-stream\r\n" if i % 2 == 0 else ""
        states.append({"request": f"GET /ticker/FLOOD{i % 7}/event HTTP/1.1\r\nHost: t\r\n{accept}\r\n".encode(),
                       "got": b"", "closed": False, "head_at": None})
        selector.register(sock, selectors.EVENT_WRITE, i)
        socks.append(sock)
    while time.monotonic() - started < hold_s:
        for key, events in selector.select(0.05):
            sock, state = socks[key.data], states[key.data]
            if events & selectors.EVENT_WRITE:
                sock.send(state["request"])
                selector.modify(sock, selectors.EVENT_READ, key.data)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                state["closed"] = True
                selector.unregister(sock)
                continue
            state["got"] += data
            if state["head_at"] is None and b"\r\n\r\n" in state["got"]:
                state["head_at"] = time.monotonic() - started
    for sock in socks:
        sock.close()
    outcomes: dict[str, int] = {}
    for state in states:
        kind = _outcome(state)
        outcomes[kind] = outcomes.get(kind, 0) + 1
    return {"outcomes": outcomes, "slowest": max((s["head_at"] or 0.0) for s in states)}


def probe(port: int, seconds: float) -> dict[str, Any]:
    """GET /healthz every 20 ms for ``seconds`` on one keep-alive connection; report the slowest answer.

    Its own process too: a pytest process's garbage collector or GIL is no part of the server's latency.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.connect()
    print("ready", flush=True)
    slowest, count, statuses = 0.0, 0, set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        slowest = max(slowest, time.monotonic() - started)
        count += 1
        statuses.add(response.status)
        time.sleep(0.02)
    connection.close()
    return {"slowest": slowest, "count": count, "statuses": sorted(statuses)}


def _outcome(state: dict[str, Any]) -> str:
    if state["head_at"] is None:
        return "closed, no answer" if state["closed"] else "no answer"
    head, _, body = state["got"].partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    if status.startswith("HTTP/1.1 503 "):
        return "503"
    if status.startswith("HTTP/1.1 200 ") and b"text/event-stream" in head:
        if not state["closed"]:
            return "stream"
        if re.fullmatch(rb": [^\n]*\n\nretry: \d+\n\n", body):
            return "come back later"
    return f"other: {status}"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_limits_rule_2_600_streams_against_256_descriptors_nothing_melts(tmp_path, loop, no_uvloop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < FLOOD + 64:
        pytest.skip(f"the flooding process needs {FLOOD + 64} descriptors (ulimit -Hn)")
    env = no_uvloop if loop == "asyncio" else {}
    with ServerProcess(tmp_path / "flood.db", "--no-demo", env=env, preexec_fn=hard_limit(LOW_LIMIT)) as srv:
        port = srv.port
        assert f"(loop: {loop}," in srv.read_log()
        capacity = limits.stream_capacity(LOW_LIMIT)
        helper = {"cwd": ROOT, "stdout": subprocess.PIPE, "env": {**os.environ, "PYTHONPATH": str(ROOT)}}
        prober = subprocess.Popen([sys.executable, __file__, "probe", str(port), str(FLOOD_HOLD_S + 0.5)], **helper)
        assert prober.stdout is not None and prober.stdout.readline() == b"ready\n"   # keep-alive, opened before
        ingest = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        held = SSEClient(port, "/ticker/HELD/event")
        flooder = subprocess.Popen([sys.executable, __file__, "flood", str(port), str(FLOOD), str(FLOOD_HOLD_S)],
                                   **helper)
        posted, prices, comments = 0.0, [], 0
        while flooder.poll() is None:
            if len(prices) < 10 and time.monotonic() > posted + 0.3:   # ingest and chat, on their keep-alive line
                prices.append(f"{len(prices) + 1}.5")
                ingest.request("POST", "/ticker/HELD/price", body=json.dumps({"price": prices[-1]}))
                response = ingest.getresponse()
                assert response.status == 201, response.read()
                response.read()
                ingest.request("POST", "/room/lobby/comments", body=json.dumps({"user": "op", "text": prices[-1]}))
                response = ingest.getresponse()
                assert response.status in (201, 429), response.read()   # 429: the comment rate, not the limit
                comments += response.status == 201
                response.read()
                posted = time.monotonic()
            time.sleep(0.02)
        report = json.loads(flooder.stdout.read())
        flooder.stdout.close()
        healthz_report = json.loads(prober.stdout.read())
        prober.stdout.close()
        assert prober.wait(5) == 0 and healthz_report["statuses"] == [200] and healthz_report["count"] > 50
        slowest_healthz = healthz_report["slowest"]
        # every one got a stream or a prompt refusal, and at most as many streams as the capacity; a
        # connection refused before its request arrived is closed unanswered (an EventSource retries)
        outcomes = report["outcomes"]
        assert set(outcomes) <= {"stream", "come back later", "503", "closed, no answer"}, outcomes
        assert outcomes.get("come back later", 0) and outcomes.get("503", 0), outcomes
        assert sum(outcomes.values()) == FLOOD
        assert 0 < outcomes.get("stream", 0) <= capacity - 1, outcomes
        assert report["slowest"] < ANSWER_WITHIN_S, report
        assert slowest_healthz < HEALTHZ_WITHIN_S, f"/healthz took {slowest_healthz * 1000:.0f} ms"
        assert comments >= 5 and len(prices) >= 5, (comments, prices)   # the flood lasted a few posts
        # the stream opened before the flood got every price published during it
        got = held.wait_for(len(prices), timeout=5, name="price_update")
        assert [json.loads(e.data)["price"] for e in got] == [float(p) for p in prices]
        # at the descriptor limit: one episode, connections refused with the spare descriptor
        assert metric(port, 'monkestream_accept_pauses_total{error="EMFILE"}') == 1
        assert metric(port, "monkestream_accept_refused_total") > 0
        # the clients have left: streams are accepted again
        deadline = time.monotonic() + 5
        while healthz(port)["streams"] != 1:
            assert time.monotonic() < deadline, healthz(port)
            time.sleep(0.05)
        with SSEClient(port, "/ticker/AFTER/event") as after:
            assert after.status == 200
            assert request(port, "POST", "/ticker/AFTER/price", {"price": "2"})[0] == 201
            assert after.wait_for(1, name="price_update")
        assert healthz(port)["accept"] == "ok"
        held.close()
        ingest.close()
        log = srv.read_log()
    assert len(log.encode()) < LOG_AT_MOST_BYTES, log
    assert sum("accept() failed: too many open files (EMFILE)" in line for line in log.splitlines()) == 1, log
    assert "Traceback" not in log, log


# -- the full server's answer (server Rule 6) ------------------------------------------------


def test_server_rule_6_a_full_server_sends_an_event_source_back_later_and_others_away(tmp_path):
    with AppThread(tmp_path / "full.db", max_streams=1, full_retry_ms=200) as s:
        held = SSEClient(s.port, "/ticker/FULL/event")
        assert held.status == 200
        # an EventSource: a 200 stream of one retry: hint, closed at once
        back = SSEClient(s.port, "/ticker/FULL/event")
        assert back.status == 200
        assert back.response_headers["content-type"] == "text/event-stream"
        assert back.response_headers["connection"] == "close"
        assert back.response_headers["cache-control"] == "no-cache"
        back.pump(2)
        assert back.closed and back.events == [] and 200 <= back.parser.retry <= 600
        # an API client or curl: 503 with Retry-After, and the connection closed
        status, headers, body = request(s.port, "GET", "/ticker/FULL/event")
        assert status == 503 and 1 <= int(headers["retry-after"]) <= 5 and headers["connection"] == "close"
        assert json.loads(body) == {"error": "too many open streams"}
        assert metric(s.port, 'monkestream_streams_turned_away_total{answer="retry"}') == 1
        assert metric(s.port, 'monkestream_streams_turned_away_total{answer="503"}') == 1
        # room again: the same request gets a stream
        held.close()
        deadline = time.monotonic() + 5
        while len(s.app.server.streams):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with SSEClient(s.port, "/ticker/FULL/event") as again:
            assert again.status == 200 and "connection" in again.response_headers
            assert request(s.port, "POST", "/ticker/FULL/price", {"price": "3"})[0] == 201
            assert again.wait_for(1, name="price_update")
        back.close()


# -- no traceback carries the uvloop probe (the server runs outside that handler) ----------------


def test_tracebacks_carry_no_unrelated_import_error(tmp_path, no_uvloop):
    db = tmp_path / "tb.db"
    with ServerProcess(db, "--no-demo", env=no_uvloop) as srv:
        assert "(loop: asyncio," in srv.read_log()
        conn = sqlite3.connect(db)
        conn.execute("DROP TABLE comments")  # a read that fails unexpectedly: a 500, logged with its traceback
        conn.close()
        assert request(srv.port, "GET", "/room/lobby/comments")[0] == 500
        time.sleep(0.2)
        log = srv.read_log()
    assert "Traceback" in log and "no such table: comments" in log
    assert "During handling of the above exception" not in log, log
    assert "uvloop is not installed here" not in log


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        print(json.dumps(flood(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))))
    elif sys.argv[1:2] == ["probe"]:
        print(json.dumps(probe(int(sys.argv[2]), float(sys.argv[3]))))
