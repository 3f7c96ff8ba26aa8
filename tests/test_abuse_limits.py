"""Per-client limits run as attacks: join storms, clients behind a proxy, spoofed headers, small leaks.

Each test starts a real server on an ephemeral port and talks to it over
real sockets. A second client address is 127.0.0.2 (all of 127/8 is
loopback on Linux); the trusted proxy, when there is one, is 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from helpers import ROOT, AppThread, SSEClient, request
from monkestream.chat import Chat
from monkestream.config import Config
from monkestream.ratelimit import RateLimiter
from monkestream.routing import HTTPError

OTHER = "127.0.0.2"
ROOMS_32 = "&".join(f"topic=room:j{i}" for i in range(32))


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def call(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         source: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection, from ``source`` when given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                      source_address=(source, 0) if source else None)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_refused(status: int, headers: dict[str, str], body: bytes | None = None) -> None:
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    assert headers["content-type"] == "application/json"
    if body is not None:
        assert json.loads(body)["error"]


def comment(port: int, xff: str | None = None, source: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    return call(port, "POST", "/room/lobby/comments", {"user": "u", "text": "hi"}, headers, source)


def metric(port: int, name: str) -> float:
    text = request(port, "GET", "/metrics")[2].decode()
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name)))


# -- joins -----------------------------------------------------------------------------------


def test_chat_rule_6_a_join_storm_is_refused_after_the_burst_and_publishes_nothing(tmp_path):
    with AppThread(tmp_path / "storm.db") as s:   # the default join rate and burst
        with SSEClient(s.port, "/room/j0/event") as watcher:   # no user: not a join
            statuses = []
            started = time.monotonic()
            for _ in range(40):
                with SSEClient(s.port, f"/events?{ROOMS_32}&user=mallory") as c:
                    statuses.append(c.status)
                    if c.status == 200:
                        assert len(c.wait_for(32, name="members")) == 32   # joined, then left on close
                    else:
                        assert_refused(c.status, c.response_headers)
            admitted = statuses.count(200)
            refilled = (time.monotonic() - started) * Config().join_rate / 32   # 32-room joins the rate allowed since
            assert statuses[:3] == [200] * 3 and admitted <= 3 + refilled + 1, statuses
            assert statuses.count(429) == 40 - admitted
            with SSEClient(s.port, f"/events?{ROOMS_32}&user=alice", source=OTHER) as other:
                assert other.status == 200
                assert len(other.wait_for(32, name="members")) == 32
                joined = watcher.wait_for(admitted + 1, name="user_joined")
            watcher.pump(0.3)   # anything a refused join published would be here by now
        users = [json.loads(e.data)["user"] for e in watcher.events if e.type == "user_joined"]
        assert users == ["mallory"] * admitted + ["alice"], users
        assert len(joined) == admitted + 1
        assert metric(s.port, 'monkestream_rate_limited_total{limit="join"}') == 40 - admitted


def test_chat_rule_6_room_streams_count_joins_and_streams_without_a_user_do_not(tmp_path):
    with AppThread(tmp_path / "room.db", join_burst=5, join_rate=0.01) as s:
        got = []
        for i in range(8):
            with SSEClient(s.port, f"/room/r{i}/event?user=mallory") as c:
                got.append(c.status)
                if c.status == 429:
                    assert int(c.response_headers["retry-after"]) >= 90   # a token every 100 s
        assert got == [200] * 5 + [429] * 3
        with SSEClient(s.port, "/room/r0/event") as c, SSEClient(s.port, "/events?topic=room:r0") as d:
            assert (c.status, d.status) == (200, 200)
        with SSEClient(s.port, "/events?topic=room:r1&topic=ticker:A&user=mallory") as c:
            assert c.status == 429
        with SSEClient(s.port, "/events?topic=ticker:A&user=mallory") as c:   # no room: no join
            assert c.status == 200


class Clock:
    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time


def test_chat_rule_6_the_default_join_limits_admit_a_reconnecting_browser_and_refuse_a_loop():
    config, clock = Config(), Clock()
    joins = RateLimiter(config.join_rate, config.join_burst, scheduler=clock)  # type: ignore[arg-type]
    chat = Chat(None, None, RateLimiter(1, 1, scheduler=clock), joins,  # type: ignore[arg-type]
                has_token=lambda r: False, open_stream=None)  # type: ignore[arg-type]
    rooms = [f"room:r{i}" for i in range(32)]
    # a page opens three streams of 32 rooms, then reconnects one of them at the
    # shortest retry hint for an hour; another page reconnects one room ten times a second
    for _ in range(3):
        assert chat.membership(rooms, "ann", "198.51.100.1") is not None
    while clock.time < 3600:
        clock.time += config.retry_ms / 1000
        assert chat.membership(rooms, "ann", "198.51.100.1") is not None
    for _ in range(36000):
        clock.time += 0.1
        assert chat.membership(rooms[:1], "bob", "198.51.100.2") is not None
    # a loop of 32-room joins, 100 a second, gets in about as often as the rate allows
    admitted = 0
    for _ in range(1000):
        clock.time += 0.01
        try:
            chat.membership(rooms, "mallory", "203.0.113.66")
            admitted += 1
        except HTTPError as exc:
            assert exc.status == 429 and int(dict(exc.headers)["Retry-After"]) >= 1
    assert admitted <= 3 + 10 * config.join_rate / 32 + 1
    assert chat.joins_refused == 1000 - admitted


# -- behind a proxy -----------------------------------------------------------------------------


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_stream_cap(tmp_path):
    with AppThread(tmp_path / "cap.db", max_streams_per_client=2, trusted_proxies="127.0.0.1") as s:
        open_streams: list[SSEClient] = []

        def stream(headers: dict[str, str], source: str | None = None) -> int:
            client = SSEClient(s.port, "/ticker/CAP/event", headers=headers, source=source)
            open_streams.append(client)
            return client.status

        try:
            a = {"X-Forwarded-For": "203.0.113.1"}
            assert stream(a) == stream({"X-Forwarded-For": "198.51.100.9, 203.0.113.1"}) == 200
            assert stream(a) == 429
            assert stream({"X-Forwarded-For": "203.0.113.2, 203.0.113.1"}) == 429   # the left part is the client's
            b = {"X-Forwarded-For": "203.0.113.2"}
            assert stream(b) == stream(b) == 200
            assert stream(b) == 429
            assert stream({"Forwarded": 'for="[2001:db8::3]:4711";proto=http'}) == 200
            # an untrusted peer: its X-Forwarded-For changes nothing
            assert stream({"X-Forwarded-For": "203.0.113.10"}, OTHER) == 200
            assert stream({"X-Forwarded-For": "203.0.113.11"}, OTHER) == 200
            assert stream({"X-Forwarded-For": "203.0.113.12"}, OTHER) == 429
            assert s.call(lambda: dict(s.app.server.streams_by_client)) == {
                "203.0.113.1": 2, "203.0.113.2": 2, "2001:db8::3": 1, OTHER: 2}
        finally:
            for client in open_streams:
                client.close()
        wait_until(lambda: s.call(lambda: (len(s.app.server.streams), dict(s.app.server.streams_by_client)))
                   == (0, {}))
        assert stream(a) == stream(a) == 200   # released under the address it was counted for
        for client in open_streams:
            client.close()


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_rate_limits(tmp_path):
    with AppThread(tmp_path / "rate.db", trusted_proxies="10.0.0.0/8, 127.0.0.1/32", comment_burst=2,
                   comment_rate=0.01, join_burst=3, join_rate=0.01) as s:
        assert [comment(s.port, "203.0.113.1")[0] for _ in range(2)] == [201, 201]
        assert_refused(*comment(s.port, "203.0.113.1"))
        assert_refused(*comment(s.port, "203.0.113.2, 203.0.113.1"))
        assert_refused(*comment(s.port, "203.0.113.1, 10.0.0.7"))   # through a second trusted proxy
        assert comment(s.port, "203.0.113.2")[0] == 201
        assert comment(s.port)[0] == 201     # the proxy's own requests: its own address
        # an untrusted peer that makes up a new X-Forwarded-For each time is one client
        got = [comment(s.port, f"198.51.100.{i}", OTHER)[0] for i in range(4)]
        assert got == [201, 201, 429, 429]

        rooms = "/events?topic=room:a&topic=room:b&topic=room:c&user=u"
        with SSEClient(s.port, rooms, headers={"X-Forwarded-For": "203.0.113.1"}) as c:
            assert c.status == 200
        with SSEClient(s.port, rooms, headers={"X-Forwarded-For": "203.0.113.1"}) as c:
            assert_refused(c.status, c.response_headers)
        with SSEClient(s.port, rooms, headers={"X-Forwarded-For": "203.0.113.2"}) as c:
            assert c.status == 200


def test_without_trusted_proxies_forwarding_headers_are_ignored(tmp_path):
    with AppThread(tmp_path / "plain.db", comment_burst=2, comment_rate=0.01, max_streams_per_client=1) as s:
        got = [comment(s.port, f"203.0.113.{i}")[0] for i in range(3)]
        assert got == [201, 201, 429]
        assert comment(s.port, source=OTHER)[0] == 201
        with SSEClient(s.port, "/ticker/A/event", headers={"X-Forwarded-For": "203.0.113.1"}) as c1, \
                SSEClient(s.port, "/ticker/A/event", headers={"Forwarded": "for=203.0.113.2"}) as c2:
            assert (c1.status, c2.status) == (200, 429)
            assert s.call(lambda: dict(s.app.server.streams_by_client)) == {"127.0.0.1": 1}


# -- smaller leaks ------------------------------------------------------------------------------


def test_healthz_shows_no_paths_and_settings_only_to_the_token_holder(tmp_path):
    paths = {"db": str(tmp_path / "secret-dir" / "h.db"), "certfile": "/etc/secret/cert.pem",
             "keyfile": "/etc/secret/key.pem"}
    (tmp_path / "secret-dir").mkdir()
    with AppThread(paths["db"], certfile=paths["certfile"], keyfile=paths["keyfile"],
                   trusted_proxies="10.0.0.0/8") as s:   # the app is not served with TLS here
        status, _, body = request(s.port, "GET", "/healthz")
        assert status == 200 and b"secret" not in body
        config = json.loads(body)["config"]
        assert config["heartbeat"] == 15.0 and config["trusted_proxies"] == "10.0.0.0/8"
        assert not set(paths) & set(config)
    token = "t0k3n-" + "x" * 20
    bearer = {"Authorization": f"Bearer {token}"}
    with AppThread(tmp_path / "secret-dir" / "t.db", token=token) as s:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": token}]:
            status, _, body = request(s.port, "GET", "/healthz", headers=headers)
            health = json.loads(body)
            assert status == 200 and health["status"] == "ok" and "config" not in health, headers
            assert b"secret" not in body
        status, _, body = request(s.port, "GET", "/healthz", headers=bearer)
        config = json.loads(body)["config"]
        assert config["token"] == "set" and config["max_streams"] == 20000 and "db" not in config
        assert b"secret" not in body and token.encode() not in body


def test_chat_rule_4_a_delete_key_in_the_url_is_refused_and_deletes_nothing(tmp_path):
    with AppThread(tmp_path / "key.db") as s:
        status, _, body = request(s.port, "POST", "/room/r/comments", {"user": "ann", "text": "mine"})
        posted = json.loads(body)
        path = f"/room/r/comments/{posted['id']}"

        def listed() -> list[int]:
            return [c["id"] for c in json.loads(request(s.port, "GET", "/room/r/comments")[2])["comments"]]

        for query, headers in [(f"?key={posted['deleteKey']}", {}),
                               (f"?key={posted['deleteKey']}", {"X-Delete-Key": posted["deleteKey"]}),
                               ("?key=", {})]:
            status, _, body = request(s.port, "DELETE", path + query, headers=headers)
            assert status == 400 and "X-Delete-Key" in json.loads(body)["error"]
            assert listed() == [posted["id"]]
        assert request(s.port, "DELETE", path, headers={"X-Delete-Key": posted["deleteKey"]})[0] == 204
        assert listed() == []
        status, headers, _ = request(s.port, "OPTIONS", path, headers={"Origin": "https://elsewhere.example"})
        assert "X-Delete-Key" in headers["access-control-allow-headers"]   # cross-origin clients may send it


@pytest.mark.parametrize("args, env", [
    (["--token", "pässwörd"], {}),
    ([], {"MONKESTREAM_TOKEN": "\u20actoken"}),
    (["--token", " padded"], {}),
    (["--token", "tab\tinside"], {}),
])
def test_a_token_no_header_can_carry_is_refused_at_start_up(tmp_path, args, env):
    proc = subprocess.run([sys.executable, "-m", "monkestream", "--db", str(tmp_path / "x.db"), "--no-demo", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin", **env})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token" in lines[0] and "ASCII" in lines[0], proc.stderr
    secret = (args[1:] or list(env.values()))[0].strip()
    assert secret not in proc.stderr, "the token is never echoed"
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("value", ["localhost", "10.0.0.0/33", "127.0.0.1,*"])
def test_a_bad_trusted_proxy_is_refused_at_start_up(tmp_path, value):
    proc = subprocess.run([sys.executable, "-m", "monkestream", "--db", str(tmp_path / "x.db"),
                           "--trusted-proxies", value], cwd=ROOT, capture_output=True, text=True, timeout=20,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trusted-proxies" in lines[0], proc.stderr
