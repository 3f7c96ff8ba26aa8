"""Nodes sharing one Redis log (``--broker``): real ``redis-server``, real node processes, real sockets.

Each test starts its own ``redis-server`` (Debian's package; ``bash .ci/run``
installs it) on an ephemeral port in its temporary folder, and two or three
``python -m monkestream --broker ...`` processes, each with its own SQLite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from helpers import ROOT, ServerProcess, SSEClient, request

REDIS = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


class Redis:
    """``redis-server`` in the foreground, its files in ``folder``; ``persist`` keeps its data across restarts."""

    def __init__(self, folder: Path, persist: bool = True) -> None:
        self.folder = folder
        self.port = free_port()
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, persist: bool | None = None) -> None:
        keep = self.persist if persist is None else persist
        args = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--save", "", "--appendonly", "yes" if keep else "no", "--appendfsync", "always"]
        if not keep:  # starts empty, as a Redis without persistence does
            shutil.rmtree(self.folder / "appendonlydir", ignore_errors=True)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, what="redis-server to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def cli(self, *args: str) -> str:
        assert REDIS_CLI is not None
        return subprocess.run([REDIS_CLI, "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()


@pytest.fixture
def redis_server(tmp_path):
    folder = tmp_path / "redis"
    folder.mkdir()
    server = Redis(folder)
    yield server
    server.stop()


class Cluster:
    """Nodes on one Redis, each with its own database in ``folder``."""

    def __init__(self, folder: Path, redis: Redis) -> None:
        self.folder = folder
        self.redis = redis
        self.nodes: list[ServerProcess] = []

    def node(self, name: str, *args: str) -> ServerProcess:
        node = ServerProcess(self.folder / f"{name}.db", "--no-demo", "--broker", self.redis.url,
                             "--flush-interval", "0.1", *args).start()
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


@pytest.fixture
def cluster(tmp_path, redis_server):
    nodes = Cluster(tmp_path, redis_server)
    yield nodes
    nodes.close()


def price(node: ServerProcess, symbol: str, value: str) -> tuple[int, dict[str, str]]:
    status, headers, _ = request(node.port, "POST", f"/ticker/{symbol}/price", {"price": value, "currency": "USD"})
    return status, headers


def bulk(node: ServerProcess, tickers: list[tuple[str, str]]) -> int:
    status, _, _ = request(node.port, "POST", "/tickers",
                           [{"symbol": s, "price": p, "currency": "USD"} for s, p in tickers])
    return status


def prices(client: SSEClient) -> list[tuple[str, str]]:
    return [(e.last_event_id, e.data) for e in client.events if e.type == "price_update"]


def health(node: ServerProcess) -> dict[str, Any]:
    return json.loads(request(node.port, "GET", "/healthz")[2])


def metric(node: ServerProcess, name: str) -> float:
    text = request(node.port, "GET", "/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# -- broker Rule 1: one log, the same ids everywhere ---------------------------------

def test_broker_rule_1_a_price_posted_to_one_node_reaches_every_node_with_the_same_ids_and_order(cluster):
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    path = "/events?topic=ticker:DOGE&topic=ticker:BTC"
    with SSEClient(b.port, path) as on_b, SSEClient(c.port, path) as on_c, SSEClient(a.port, path) as on_a:
        for i in range(10):
            assert price(a, "DOGE", f"0.{i + 1}")[0] == 201
            assert bulk(c if i % 2 else b, [("BTC", str(100 + i)), ("DOGE", f"1.{i}")]) == 201
        for client in (on_a, on_b, on_c):
            client.wait_for(30, name="price_update", timeout=10)
        assert len(prices(on_b)) == 30
        assert prices(on_a) == prices(on_b) == prices(on_c)
        ids = [i for i, _ in prices(on_b)]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert all(i.split("-")[0].isdigit() and len(i.split("-")[0]) >= 13 for i in ids)  # MS-SEQ, the log's


def test_broker_rule_1_history_and_symbols_are_answered_by_every_node(cluster):
    a, b = cluster.node("a"), cluster.node("b")
    assert bulk(a, [("ETH", str(1000 + i)) for i in range(20)]) == 201

    def history(node: ServerProcess) -> list[Any]:
        return json.loads(request(node.port, "GET", "/ticker/ETH/history?limit=100")[2])["tickers"]
    wait_until(lambda: len(history(b)) == 20, what="b's history")
    assert history(a) == history(b)
    symbols = json.loads(request(b.port, "GET", "/symbols")[2])["symbols"]
    assert [s["symbol"] for s in symbols] == ["ETH"] and symbols[0]["price"] == 1019


# -- broker Rule 2: acknowledged only once Redis took it; refused while it is down -------

def test_broker_rule_2_writes_are_refused_while_redis_is_down_and_streams_go_on_with_no_gap(cluster, redis_server):
    a = cluster.node("a", "--heartbeat", "0.2")
    b = cluster.node("b", "--heartbeat", "0.2")
    with SSEClient(b.port, "/ticker/DOGE/event") as stream:
        for i in range(5):
            assert price(a, "DOGE", f"0.{i + 1}")[0] == 201
        stream.wait_for(5, name="price_update")
        redis_server.stop()
        status, headers = price(a, "DOGE", "9")
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert bulk(b, [("DOGE", "9"), ("BTC", "9")]) == 503
        status, headers, _ = request(a.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "hi"})
        assert status == 503 and "retry-after" in headers
        wait_until(lambda: health(b)["broker"]["state"].startswith("reconnecting"), what="b to notice")
        assert health(b)["status"] == "degraded"
        stream.pump(0.6)
        assert not stream.closed  # heartbeats go on
        redis_server.start()  # with its data
        wait_until(lambda: price(a, "DOGE", "0.6")[0] == 201, what="writes to be taken again")
        for i in range(7, 10):
            assert price(a, "DOGE", f"0.{i}")[0] == 201
        got = stream.wait_for(9, name="price_update")
        assert [e.data.split('"price":')[1].split(",")[0] for e in got] == \
            ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
        assert not [e for e in stream.events if e.type == "reset"]
        assert health(b)["broker"]["gaps"] == 0
        assert metric(a, "monkestream_broker_write_refusals_total") >= 1


def test_broker_rule_2_a_bulk_is_one_transaction_all_or_none(cluster, redis_server):
    a = cluster.node("a")
    assert bulk(a, [("DOGE", "1"), ("BTC", "2")]) == 201
    before = redis_server.cli("XLEN", "monkestream:log")
    assert bulk(a, [("DOGE", "1"), ("BTC", "not a price")]) == 422
    assert redis_server.cli("XLEN", "monkestream:log") == before
    assert bulk(a, [(f"S{i}", str(i + 1)) for i in range(500)]) == 201
    # 500 prices and the 500 new symbols' announcements, appended together
    assert int(redis_server.cli("XLEN", "monkestream:log")) == int(before) + 1000


# -- broker Rule 3: a lost log is a reset, never a silent gap ------------------------------

def test_broker_rule_3_a_redis_restarted_empty_gives_streams_a_reset(cluster, redis_server):
    a, b = cluster.node("a"), cluster.node("b")
    status, _, body = request(a.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "before"})
    assert status == 201
    before = json.loads(body)["id"]
    with SSEClient(b.port, "/ticker/DOGE/event") as stream:
        for i in range(3):
            assert price(a, "DOGE", f"0.{i + 1}")[0] == 201
        got = stream.wait_for(3, name="price_update")
        last = got[-1].last_event_id
        redis_server.stop()
        redis_server.start(persist=False)
        stream.wait_for(99, timeout=10)  # the node closes it: what it had is no longer the log's
        assert stream.closed
    wait_until(lambda: health(b)["broker"]["gaps"] == 1, what="the gap to be counted")
    assert "lost" in health(b)["broker"]["lastGap"]
    assert metric(b, "monkestream_broker_gaps_total") == 1
    with SSEClient(b.port, "/ticker/DOGE/event", {"Last-Event-ID": last}) as resumed:
        wait_until(lambda: price(a, "DOGE", "0.7")[0] == 201, what="writes to be taken again")
        resumed.wait_for(1, name="price_update")
        assert resumed.events[0].type == "reset"
        assert [e.data.split('"price":')[1].split(",")[0] for e in resumed.events if e.type == "price_update"] == ["0.7"]
        assert resumed.events[-1].last_event_id > last
    # the comment counter started again with Redis: a new comment still gets a new id
    status, _, body = request(b.port, "POST", "/room/lobby/comments", {"user": "bob", "text": "after"})
    assert status == 201 and json.loads(body)["id"] > before
    def listed() -> list[tuple[int, str]]:
        return [(c["id"], c["text"]) for c in json.loads(request(a.port, "GET", "/room/lobby/comments")[2])["comments"]]
    wait_until(lambda: len(listed()) == 2, what="both comments on a")
    assert listed() == [(before, "before"), (json.loads(body)["id"], "after")]


# -- broker Rule 4: the log is trimmed to its retention ----------------------------------------

def test_broker_rule_4_redis_trims_the_log_to_its_retention_and_a_node_behind_it_counts_a_gap(cluster, redis_server):
    a = cluster.node("a", "--broker-retention", "100")
    b = cluster.node("b", "--broker-retention", "100")
    assert bulk(a, [("DOGE", "1")]) == 201
    wait_until(lambda: health(b)["broker"]["position"] == health(a)["broker"]["position"])
    time.sleep(0.3)  # b's window is written with its position
    assert b.stop() == 0
    for i in range(20):
        assert bulk(a, [("DOGE", str(i + 2))] * 100) == 201
    assert int(redis_server.cli("XLEN", "monkestream:log")) <= 300  # ~100: whole radix-tree nodes are trimmed
    b = cluster.node("b", "--broker-retention", "100")
    wait_until(lambda: health(b)["broker"]["gaps"] == 1, what="b to count its gap")
    assert "no longer holds" in health(b)["broker"]["lastGap"]
    assert metric(b, "monkestream_broker_gaps_total") == 1


# -- start-up ------------------------------------------------------------------------------------------

def test_a_missing_redis_package_is_a_one_line_error_naming_the_extra(tmp_path):
    shim = tmp_path / "shim" / "redis"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no redis here')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-m", "monkestream", "--db", str(tmp_path / "x.db"),
                           "--broker", "redis://127.0.0.1:1/0"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["monkestream: --broker needs the redis package: "
                                                "pip install 'monkestream[redis]'"]


def test_a_bad_broker_url_or_retention_stops_start_up(tmp_path):
    for args, expected in ((["--broker", "http://x"], "--broker"),
                           (["--broker", "redis://x:1/0", "--broker-retention", "soon"], "--broker-retention")):
        done = subprocess.run([sys.executable, "-m", "monkestream", "--db", str(tmp_path / "x.db"), *args],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 2 and expected in done.stderr


def test_the_broker_password_is_never_shown(cluster, redis_server):
    redis_server.cli("CONFIG", "SET", "requirepass", "s3cret")
    node = ServerProcess(cluster.folder / "p.db", "--no-demo", "--broker",
                         f"redis://default:s3cret@127.0.0.1:{redis_server.port}/0").start()
    cluster.nodes.append(node)
    assert price(node, "DOGE", "1")[0] == 201
    text = request(node.port, "GET", "/healthz")[2].decode()
    assert "s3cret" not in text and "***" in text
    assert "s3cret" not in node.read_log()
