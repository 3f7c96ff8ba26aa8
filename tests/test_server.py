"""End to end: the real server on an ephemeral port, real sockets, a real SQLite file."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from helpers import ROOT, AppThread, RouterServer, ServerProcess, SSEClient, healthz, raw, request
from monkestream.errors import ProtocolError, Unavailable
from monkestream.routing import HTTPError, Response, Router

SSE_HEADERS = {
    "cache-control": "no-cache",
    "content-type": "text/event-stream",
    "connection": "keep-alive",
    "access-control-allow-origin": "*",
    "x-accel-buffering": "no",
}


@pytest.fixture
def server(tmp_path):
    with AppThread(tmp_path / "t.db", flush_interval=0.05) as s:
        yield s


def post_price(port, symbol, price, **extra):
    return request(port, "POST", f"/ticker/{symbol}/price", {"price": price, **extra})


def test_stream_headers_are_sent_at_once_before_any_event(server):
    with SSEClient(server.port, "/ticker/DOGE/event") as client:
        assert client.status == 200
        for name, value in SSE_HEADERS.items():
            assert client.response_headers[name] == value
        assert client.response_headers["transfer-encoding"] == "chunked"
        assert client.events == []


def test_published_price_reaches_the_stream_exactly(server):
    with SSEClient(server.port, "/ticker/DOGE/event") as client:
        status, _, body = post_price(server.port, "doge", "0.1000000000000000055511151231257827")
        assert status == 201
        sent = json.loads(body)
        assert sent["symbol"] == "DOGE" and sent["currency"] == "USD"
        assert abs(sent["createdAt"] - time.time()) < 5
        (event,) = client.wait_for(1)
        assert event.type == "price_update"
        assert '"price":0.1000000000000000055511151231257827,' in event.data
        assert json.loads(event.data) == sent
        assert event.last_event_id.startswith(f"{server.app.hub.epoch}-")


def test_numbers_and_strings_are_kept_exact(server):
    for given, expected in [(12, "12"), ("1e3", "1000"), ("00.50", "0.5"), ("123456789.123456789", "123456789.123456789")]:
        status, _, body = post_price(server.port, "X", given)
        assert status == 201, body
        assert f'"price":{expected},' in body.decode()


@pytest.mark.parametrize("body, status, field", [
    ({}, 422, "price"),
    ({"price": -1}, 422, "price"),
    ({"price": 0}, 422, "price"),
    ({"price": "abc"}, 422, "price"),
    ({"price": True}, 422, "price"),
    ({"price": [1]}, 422, "price"),
    ({"price": "1e999999"}, 422, "price"),
    ({"price": 1, "currency": "dollars!"}, 422, "currency"),
    ({"price": 1, "currency": 5}, 422, "currency"),
    (b'{"price": NaN}', 400, "body"),
    (b'{"price": Infinity}', 400, "body"),
    (b'{"price": 1', 400, "body"),
    (b'\xff\xfe', 400, "body"),
    (b'[1,2]', 400, "body"),
    (b'[' * 100000, 400, "body"),
])
def test_bad_ingest_gets_a_clear_error_and_publishes_nothing(server, body, status, field):
    got, headers, text = request(server.port, "POST", "/ticker/DOGE/price", body)
    assert got == status, text
    assert headers["content-type"] == "application/json"
    assert json.loads(text)["error"].startswith(field)
    assert server.app.hub.seq == 0


def test_bad_symbol_is_a_400(server):
    for symbol in ["A" * 21, "%F0%9F%90%B6", "a%2Fb", "'quote'"]:
        status, _, body = post_price(server.port, symbol, 1)
        assert status == 400, (symbol, body)
        assert "symbol" in json.loads(body)["error"]


def test_bulk_ingest_is_all_or_nothing(server):
    good = [{"symbol": "BTC", "price": "64000.5"}, {"symbol": "eth", "price": 3100, "currency": "EUR"}]
    status, _, body = request(server.port, "POST", "/tickers", good + [{"symbol": "SOL", "price": -3}])
    assert status == 422
    assert json.loads(body)["error"].startswith("[2].price")
    assert server.app.hub.seq == 0
    status, _, body = request(server.port, "POST", "/tickers", good)
    assert status == 201
    assert [t["symbol"] for t in json.loads(body)] == ["BTC", "ETH"]
    assert server.app.hub.seq == 2


def test_history_reads_what_the_batcher_wrote(server):
    for price in ["1.5", "1.6", "1.7"]:
        assert post_price(server.port, "HIST", price)[0] == 201
    deadline = time.monotonic() + 5
    while server.app.store.rows_written < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, _, body = request(server.port, "GET", "/ticker/hist/history?limit=2")
    assert status == 200
    data = json.loads(body)
    assert [t["price"] for t in data["tickers"]] == [1.6, 1.7]
    assert '"price":1.6' in body.decode()
    now = int(time.time())
    status, _, body = request(server.port, "GET", f"/ticker/HIST/history?since={now + 100}")
    assert json.loads(body)["tickers"] == []
    status, _, body = request(server.port, "GET", "/ticker/HIST/history?limit=abc")
    assert status == 400 and "limit" in json.loads(body)["error"]


def test_chart_endpoint_and_windows(server):
    post_price(server.port, "CH", "10")
    deadline = time.monotonic() + 5
    while True:
        status, _, body = request(server.port, "GET", "/ticker/CH/chart?window=5m")
        points = json.loads(body)["points"]
        if points or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert status == 200
    assert points and points[-1]["price"] == 10
    for window in ("1h", "1d"):
        status, _, body = request(server.port, "GET", f"/ticker/CH/chart?window={window}")
        assert status == 200 and json.loads(body)["window"] == window
    status, _, body = request(server.port, "GET", "/ticker/CH/chart?window=2w")
    assert status == 400 and json.loads(body)["error"].startswith("window")


def test_many_clients_then_all_dropped_leaves_the_hub_empty(server):
    clients = [SSEClient(server.port, "/ticker/FAN/event") for _ in range(200)]
    try:
        deadline = time.monotonic() + 5
        while server.call(lambda: server.app.hub.stream_count) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.call(lambda: server.app.hub.stream_count) == 200
        for i in range(3):
            assert post_price(server.port, "FAN", i + 1)[0] == 201
        for client in clients:
            got = client.wait_for(3)
            assert [json.loads(e.data)["price"] for e in got] == [1, 2, 3]
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 5
    while server.call(lambda: server.app.hub.stream_count) and time.monotonic() < deadline:
        time.sleep(0.02)
    hub = server.app.hub
    assert server.call(lambda: hub.stream_count) == 0
    assert server.call(lambda: [t.name for t in hub.topics.values() if t.fanouts or t.streams]) == []
    assert server.call(lambda: len(server.app.server.streams)) == 0
    assert server.call(lambda: len(server.app.server.connections)) == 0


def test_pipelined_requests_are_answered_in_order(server):
    reqs = b"".join(
        b"POST /ticker/P%d/price HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n{\"price\":%d}" % (i, i)
        for i in range(1, 4))
    reqs += b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw(server.port, reqs)
    statuses = re.findall(rb"HTTP/1\.1 (\d+) ", out)
    assert statuses == [b"201"] * 3 + [b"200"]
    assert out.index(b'"symbol":"P1"') < out.index(b'"symbol":"P2"') < out.index(b'"symbol":"P3"')


def test_chunked_request_body(server):
    body = b'{"price": "2.5"}'
    req = (b"POST /ticker/CHK/price HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           + b"%x\r\n%s\r\n" % (5, body[:5]) + b"%x;ext=1\r\n%s\r\n" % (len(body) - 5, body[5:]) + b"0\r\n\r\n")
    out = raw(server.port, req)
    assert out.startswith(b"HTTP/1.1 201 ")
    assert b'"price":2.5' in out


def test_head_and_cors_preflight(server):
    status, headers, body = request(server.port, "HEAD", "/healthz")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, _ = request(server.port, "OPTIONS", "/ticker/DOGE/price",
                                 headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST"})
    assert status == 204
    assert headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    assert "Last-Event-ID" in headers["access-control-allow-headers"]


@pytest.mark.parametrize("data, status", [
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"POST /ticker/A/price HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (b"POST /ticker/A/price HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
])
def test_broken_requests_get_the_right_status_and_a_json_error(server, data, status):
    out = raw(server.port, data)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert "error" in json.loads(body)
    if status == 405:
        assert b"Allow: " in head
    assert healthz(server.port)["status"] == "ok"


def test_header_timeout_and_idle_keepalive_timeout(tmp_path):
    with AppThread(tmp_path / "t.db", header_timeout=0.3, keepalive_timeout=0.3) as s:
        started = time.monotonic()
        out = raw(s.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", timeout=3)
        assert out.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 2
        out = raw(s.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
        assert out.startswith(b"HTTP/1.1 200 ")  # then the idle connection was closed by the server
        assert time.monotonic() - started < 4


def test_publishing_needs_the_token_when_one_is_set(tmp_path):
    with AppThread(tmp_path / "t.db", token="s3cret") as s:
        status, headers, body = post_price(s.port, "DOGE", 1)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        status, _, _ = request(s.port, "POST", "/ticker/DOGE/price", {"price": 1},
                               headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, _ = request(s.port, "POST", "/ticker/DOGE/price", {"price": 1},
                               headers={"Authorization": "Bearer s3cret"})
        assert status == 201


def test_index_healthz_and_symbols(server):
    status, _, body = request(server.port, "GET", "/api")
    assert status == 200 and json.loads(body)["name"] == "monkestream"
    post_price(server.port, "ZED", "3")
    status, _, body = request(server.port, "GET", "/symbols")
    assert [s["symbol"] for s in json.loads(body)["symbols"]] == ["ZED"]
    health = healthz(server.port)
    assert health["status"] == "ok" and health["config"]["token"] == ""


def test_sigterm_flushes_everything_while_a_client_streams(tmp_path):
    db = tmp_path / "sig.db"
    with ServerProcess(db, "--no-demo", "--flush-interval", "30") as srv:
        client = SSEClient(srv.port, "/ticker/SIG/event")
        tickers = [{"symbol": "SIG", "price": str(i)} for i in range(1, 501)]
        assert request(srv.port, "POST", "/tickers", tickers)[0] == 201
        assert post_price(srv.port, "SIG", "501")[0] == 201
        assert len(client.wait_for(501)) == 501
        code = srv.stop(signal.SIGTERM)
        assert code == 0, srv.read_log()
        client.pump(2)
        assert client.closed  # the stream was ended by the server
        client.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        prices = [row[0] for row in conn.execute("SELECT price FROM tickers WHERE symbol='SIG' ORDER BY seq")]
        assert prices == [str(i) for i in range(1, 502)]
        (last_seq,) = conn.execute("SELECT last_seq FROM runs").fetchone()
        assert last_seq == 501
    finally:
        conn.close()


def test_charts_rule_3_charts_are_warmed_from_sqlite_after_a_restart(tmp_path):
    db = tmp_path / "warm.db"
    with ServerProcess(db, "--no-demo") as srv:
        assert post_price(srv.port, "WARM", "42.5")[0] == 201
    with ServerProcess(db, "--no-demo") as srv:
        for window in ("5m", "1h", "1d"):
            status, _, body = request(srv.port, "GET", f"/ticker/WARM/chart?window={window}")
            assert [p["price"] for p in json.loads(body)["points"]] == [42.5], window
        status, _, body = request(srv.port, "GET", "/symbols")
        assert json.loads(body)["symbols"][0]["price"] == 42.5


def test_demo_feed_streams_prices_within_seconds(tmp_path):
    with ServerProcess(tmp_path / "demo.db") as srv:
        with SSEClient(srv.port, "/ticker/DOGE/event") as client:
            (event,) = client.wait_for(1, timeout=10, name="price_update")
            assert json.loads(event.data)["symbol"] == "DOGE"


def test_bad_configuration_fails_fast_naming_the_flag(tmp_path):
    for args, env, flag in [(["--port", "70000"], {}, "--port"), (["--flush-interval", "x"], {}, "--flush-interval"),
                            ([], {"MONKESTREAM_HEARTBEAT": "-1"}, "--heartbeat"),
                            (["--log-level", "loud"], {}, "--log-level")]:
        proc = subprocess.run([sys.executable, "-m", "monkestream", "--db", str(tmp_path / "x.db"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=20,
                              env={"PATH": "/usr/bin:/bin", **env})
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0], proc.stderr


def test_environment_variables_configure_the_server(tmp_path):
    with ServerProcess(tmp_path / "env.db", env={"MONKESTREAM_NO_DEMO": "1", "MONKESTREAM_HEARTBEAT": "7"}) as srv:
        config = healthz(srv.port)["config"]
        assert config["no_demo"] is True and config["heartbeat"] == 7.0


def test_embedding_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "embed.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "received 3 prices" in proc.stdout


def test_readme_embedding_snippet_runs():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "'price': 0.07" in proc.stdout


def test_app_rule_3_a_failed_window_write_is_retried_not_lost(tmp_path):
    with AppThread(tmp_path / "retry.db", flush_interval=0.05) as s:
        store = s.app.store
        real = store._append_sync
        failures = []

        def flaky(rows):
            if not failures:
                failures.append(1)
                error = sqlite3.OperationalError("disk I/O error")
                error.sqlite_errorcode = 10  # SQLITE_IOERR: the disk refused, the window is kept
                raise error
            return real(rows)
        store._append_sync = flaky
        assert post_price(s.port, "RETRY", "1.5")[0] == 201
        deadline = time.monotonic() + 5
        while store.rows_written < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert failures and store.rows_written == 1
        assert store.write_failures == 1 and store.failing is None
    conn = sqlite3.connect(tmp_path / "retry.db")
    assert conn.execute("SELECT price FROM tickers").fetchall() == [("1.5",)]
    conn.close()


# -- the module's rules -------------------------------------------------------------

TRANSPORT_CALLS = {"transport", "get_write_buffer_size", "set_write_buffer_limits", "pause_reading",
                   "resume_reading", "create_server", "start_server"}


def _touches_transports(source: str) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr in TRANSPORT_CALLS for node in ast.walk(ast.parse(source)))


def test_server_rule_1_only_the_server_touches_transports_and_answers_one_request_at_a_time_in_order():
    package = ROOT / "monkestream"
    touching = [path.relative_to(package).as_posix() for path in sorted(package.rglob("*.py"))
                if _touches_transports(path.read_text(encoding="utf-8"))]
    assert touching == ["server.py"]
    order: list[str] = []

    async def main() -> None:
        started, gate = asyncio.Event(), asyncio.Event()

        async def slow(ex):
            order.append("slow starts")
            started.set()
            await gate.wait()
            order.append("slow ends")
            return Response(200, b'"slow"')

        def fast(ex):
            order.append("fast")
            return Response(200, b'"fast"')

        router = Router()
        router.add("GET", "/slow", slow, "awaits")
        router.add("GET", "/fast", fast, "answers at once")
        async with RouterServer(router) as srv:
            pipelined = (b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers = asyncio.ensure_future(srv.exchange(pipelined))
            await asyncio.wait_for(started.wait(), 5)
            for _ in range(20):
                await asyncio.sleep(0)
            assert order == ["slow starts"]  # the requests behind it are buffered, not yet dispatched
            gate.set()
            out = await answers
        assert re.findall(rb"\r\n\r\n(\"\w+\")", out) == [b'"slow"', b'"fast"', b'"fast"']

    asyncio.run(main())
    assert order == ["slow starts", "slow ends", "fast", "fast"]


def test_server_rule_2_exceptions_become_responses_in_one_place(caplog):
    def teapot(ex):
        raise HTTPError(418, "short and stout", [("X-Spout", "1")])

    def broken(ex):
        raise RuntimeError("a bug")

    async def broken_later(ex):
        await asyncio.sleep(0)
        raise KeyError("another bug")

    def unavailable(ex):
        raise Unavailable("the disk is full", 7)

    def bad_peer(ex):
        raise ProtocolError("framing in doubt", 431)

    router = Router()
    for path, handler in [("/teapot", teapot), ("/broken", broken), ("/later", broken_later),
                          ("/unavailable", unavailable), ("/peer", bad_peer)]:
        router.add("GET", path, handler, "fails")

    def get(path: str, close: bool = False) -> bytes:
        connection = "Connection: close\r\n" if close else ""
        return f"GET {path} HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode()

    async def main() -> tuple[bytes, bytes, int]:
        async with RouterServer(router) as srv:
            kept = await srv.exchange(get("/teapot") + get("/broken") + get("/later") + get("/unavailable", close=True))
            cut = await srv.exchange(get("/peer") + get("/teapot", close=True))
            return kept, cut, srv.server.errors

    with caplog.at_level(logging.ERROR, logger="monkestream"):
        kept, cut, errors = asyncio.run(main())
    heads = re.findall(rb"HTTP/1\.1 (\d+) [^\r]*\r\n((?:[^\r]+\r\n)*)\r\n(\{[^}]*\})", kept)
    assert [(status, json.loads(body)) for status, _, body in heads] == [
        (b"418", {"error": "short and stout"}), (b"500", {"error": "internal error"}),
        (b"500", {"error": "internal error"}), (b"503", {"error": "the disk is full"})]
    assert b"X-Spout: 1\r\n" in heads[0][1] and b"Retry-After: 7\r\n" in heads[3][1]
    assert all(b"application/json" in fields for _, fields, _ in heads)
    assert cut.startswith(b"HTTP/1.1 431 ") and cut.count(b"HTTP/1.1") == 1  # answered, then closed
    assert b"Connection: close" in cut
    assert errors == 2  # the two bugs, counted; logged once each, with their traceback
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "monkestream"]
    assert [r.exc_info[1].args[0] for r in logged] == ["a bug", "another bug"]
