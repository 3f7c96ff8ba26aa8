"""The shipped nginx site (``examples/deploy/nginx-site.conf``) in a real nginx, in front of a real server.

nginx is Debian's package (``bash .ci/run`` installs it); without it these
tests skip. The site runs as shipped but for the upstream's port, the listen
lines and the certificate lines: here nginx speaks plain HTTP/1.1 on an
ephemeral port, in production TLS and HTTP/2 on 443. Its own ``nginx.conf``,
pid, logs and temporary files live in the test's folder.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, ServerProcess, SSEClient, request

from monkestream.config import Config

SITE = ROOT / "examples" / "deploy" / "nginx-site.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")

TOKEN = "nginx-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPOOFED_CLIENT = "203.0.113.7"   # what a client may claim in X-Forwarded-For


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def site(replacements: list[tuple[str, str, int]]) -> str:
    """The shipped site with ``(pattern, replacement, times)`` applied; each must match exactly ``times``."""
    text = SITE.read_text()
    for pattern, replacement, times in replacements:
        text, found = re.subn(pattern, replacement, text, flags=re.M)
        assert found == times, f"{pattern!r} matched {found} times in {SITE}, not {times}"
    return text


def plain_site(upstream_port: int, listen_port: int) -> str:
    """The site on plain HTTP at ``listen_port``, in front of the server at ``upstream_port``."""
    return site([
        (r"^(\s*)server 127\.0\.0\.1:8000;", rf"\g<1>server 127.0.0.1:{upstream_port};", 1),
        (r"^(\s*)listen 443 ssl http2;", rf"\g<1>listen 127.0.0.1:{listen_port};", 1),
        (r"^\s*listen \[::\]:443 ssl http2;\n", "", 1),
        (r"^\s*ssl_certificate(_key)? .*;\n", "", 2),
    ])


def nginx_conf(folder: Path, site_text: str) -> Path:
    """An ``nginx.conf`` that keeps everything in ``folder`` and includes ``site_text`` as the site."""
    (folder / "site.conf").write_text(site_text)
    conf = folder / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/site.conf;
}}
""")
    return conf


def check(folder: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    assert NGINX is not None
    return subprocess.run([NGINX, "-t", "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)],
                          capture_output=True, text=True, timeout=20)


class Nginx:
    """nginx running ``conf`` in the foreground until ``stop``."""

    def __init__(self, folder: Path, conf: Path, port: int) -> None:
        assert NGINX is not None
        self.folder = folder
        self.port = port
        self.proc = subprocess.Popen([NGINX, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not start: {self.errors()}") from None
                time.sleep(0.02)

    def errors(self) -> str:
        path = self.folder / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Stack:
    """The server and nginx in front of it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = folder / "db.sqlite"
        self.server = self.start_server(port=0)
        self.upstream = self.server.port
        self.port = free_port()
        conf = nginx_conf(folder, plain_site(self.upstream, self.port))
        checked = check(folder, conf)
        assert checked.returncode == 0, checked.stderr
        self.nginx = Nginx(folder, conf, self.port)

    def start_server(self, port: int) -> ServerProcess:
        return ServerProcess(self.db, "--no-demo", "--token", TOKEN, "--trusted-proxies", "127.0.0.1",
                             "--access-log", "-", "--port", str(port)).start()

    def restart_server(self) -> None:
        assert self.server.stop() == 0, self.server.read_log()
        self.server = self.start_server(self.upstream)

    def close(self) -> None:
        self.nginx.stop()
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.stop()


@pytest.fixture
def stack(tmp_path):
    stack = Stack(tmp_path)
    yield stack
    stack.close()
    # nginx refused nothing and lost no upstream: every error line would say so
    assert not re.search(r"\[(error|crit|alert|emerg)\]", stack.nginx.errors()), stack.nginx.errors()


def publish(port: int, symbol: str, price: str) -> None:
    status, _, body = request(port, "POST", f"/ticker/{symbol}/price", {"price": price}, headers=AUTH)
    assert status == 201, body


def test_the_shipped_site_passes_nginx_t_with_tls_and_http2(tmp_path):
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make a test certificate: apt-get install openssl"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                           "-subj", "/CN=stream.example.com", "-keyout", str(key), "-out", str(cert)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    text = site([(r"^(\s*ssl_certificate) .*;", rf"\g<1> {cert};", 1),
                 (r"^(\s*ssl_certificate_key) .*;", rf"\g<1> {key};", 1)])
    checked = check(tmp_path, nginx_conf(tmp_path, text))
    assert checked.returncode == 0 and "test is successful" in checked.stderr, checked.stderr
    assert re.search(r"^\s*listen 443 ssl http2;", text, re.M)
    assert re.search(r"^\s*proxy_buffering off;", text, re.M)
    timeout = re.search(r"^\s*proxy_read_timeout (\d+)s;", text, re.M)
    assert timeout and int(timeout.group(1)) >= 4 * Config().heartbeat


def test_a_stream_through_nginx_is_unbuffered_and_keeps_its_headers(stack):
    with SSEClient(stack.port, "/ticker/DOGE/event") as client:
        assert client.status == 200
        headers = client.response_headers
        assert headers["content-type"] == "text/event-stream"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        assert headers["transfer-encoding"] == "chunked"
        for n in range(5):
            sent = time.monotonic()
            publish(stack.upstream, "DOGE", f"0.0{n + 1}")
            got = client.wait_for(n + 1, timeout=2, name="price_update")
            assert len(got) == n + 1, f"event {n} did not come through nginx"
            assert time.monotonic() - sent < 1.0
            assert json.loads(got[-1].data)["price"] == float(f"0.0{n + 1}")


def test_a_resume_through_nginx_after_a_server_restart_has_no_gap(stack):
    with SSEClient(stack.port, "/ticker/DOGE/event") as client:
        publish(stack.port, "DOGE", "1.01")
        seen = client.wait_for(1, name="price_update")
        assert len(seen) == 1
    last_id = seen[0].last_event_id
    publish(stack.port, "DOGE", "1.02")            # missed by the client
    stack.restart_server()
    publish(stack.port, "DOGE", "1.03")            # published by the new run
    with SSEClient(stack.port, "/ticker/DOGE/event", headers={"Last-Event-ID": last_id}) as client:
        got = client.wait_for(2, timeout=5, name="price_update")
        client.pump(0.3)
        events = [e for e in client.events if e.type != "message"]
    assert [e.type for e in events] == ["price_update", "price_update"], events
    assert [json.loads(e.data)["price"] for e in got] == [1.02, 1.03]
    assert got[0].last_event_id.split("-")[0] == last_id.split("-")[0]   # the first run's
    assert got[1].last_event_id.split("-")[0] != last_id.split("-")[0]   # the second run's


def test_posts_deletes_and_the_chat_through_nginx(stack):
    with SSEClient(stack.port, "/events?topic=room:lobby&user=alice") as client:
        members = client.wait_for(1, name="members")
        assert members and json.loads(members[0].data)["users"] == ["alice"]
        status, _, body = request(stack.port, "POST", "/room/lobby/comments",
                                  {"user": "alice", "text": "hello through nginx"})
        assert status == 201, body
        comment = json.loads(body)
        posted = client.wait_for(1, name="comment_posted")
        assert posted and json.loads(posted[0].data)["text"] == "hello through nginx"
        status, _, body = request(stack.port, "DELETE", f"/room/lobby/comments/{comment['id']}",
                                  headers={"X-Delete-Key": comment["deleteKey"]})
        assert status == 204, body
        deleted = client.wait_for(1, name="comment_deleted")
        assert deleted and json.loads(deleted[0].data)["id"] == comment["id"]
    status, _, body = request(stack.port, "GET", "/room/lobby/comments")
    assert status == 200 and json.loads(body)["comments"] == []
    status, headers, _ = request(stack.port, "OPTIONS", "/events",
                                 headers={"Origin": "https://page.example", "Access-Control-Request-Method": "GET",
                                          "Access-Control-Request-Headers": "last-event-id"})
    assert status == 204 and "Last-Event-ID" in headers["access-control-allow-headers"]


def test_nginx_refuses_nothing_the_server_accepts(stack):
    # the largest body the server takes (--max-body, 1 MiB): a full bulk publish, padded
    tickers = json.dumps([{"symbol": f"S{i}", "price": f"{i + 1}.5"} for i in range(10_000)]).encode()
    body = tickers + b" " * (Config().max_body - len(tickers))
    status, _, answer = request(stack.port, "POST", "/tickers", body, headers=AUTH, timeout=20)
    assert status == 201, answer
    # the token passes, and so do the server's refusals, its JSON and its challenge
    status, headers, answer = request(stack.port, "POST", "/ticker/X/price", {"price": "1"})
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(answer)["error"]
    status, _, answer = request(stack.port, "GET", "/ticker/no!such/history")
    assert status == 400 and "error" in json.loads(answer)
    # the page: gzip and revalidation pass
    status, headers, page = request(stack.port, "GET", "/", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip" and headers["etag"]
    status, _, _ = request(stack.port, "GET", "/", headers={"Accept-Encoding": "gzip",
                                                           "If-None-Match": headers["etag"]})
    assert status == 304
    # a stream of 32 topics with a long Last-Event-ID
    topics = "&".join(f"topic=ticker:S{i}" for i in range(32))
    with SSEClient(stack.port, f"/events?{topics}", headers={"Last-Event-ID": "1-0" + "0" * 100}) as client:
        assert client.status == 200
    # nginx tells the server who its client is: from 127.0.0.2 (not a trusted proxy), whatever it claims
    for claimed in ({}, {"X-Forwarded-For": SPOOFED_CLIENT}):
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5, source_address=("127.0.0.2", 0))
        conn.request("GET", f"/healthz?claimed={len(claimed)}", headers=claimed)
        assert conn.getresponse().status == 200
        conn.close()
    deadline = time.monotonic() + 5
    while "/healthz?claimed=1" not in stack.server.read_log() and time.monotonic() < deadline:
        time.sleep(0.02)
    for claimed in (0, 1):
        assert re.search(rf'^127\.0\.0\.2 - - \[.*\] "GET /healthz\?claimed={claimed} HTTP/1\.1" 200 ',
                         stack.server.read_log(), re.M), stack.server.read_log()
