"""HTTPS with ``--certfile/--keyfile``: a self-signed certificate made here, real TLS clients.

The certificate comes from the ``openssl`` command (Debian package ``openssl``);
without it these tests fail and say so, rather than skip.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time

import pytest
from helpers import ServerProcess, SSEClient

HEADER_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """(certfile, keyfile) of a fresh self-signed certificate for localhost and 127.0.0.1."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make a test certificate: apt-get install openssl"
    folder = tmp_path_factory.mktemp("certs")
    cert, key = folder / "cert.pem", folder / "key.pem"
    made = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, f"openssl could not make a certificate: {made.stderr}"
    return cert, key


@pytest.fixture(scope="module")
def tls_server(certificate, tmp_path_factory):
    cert, key = certificate
    db = tmp_path_factory.mktemp("tls") / "tls.db"
    with ServerProcess(db, "--no-demo", "--certfile", str(cert), "--keyfile", str(key),
                       "--header-timeout", str(HEADER_TIMEOUT_S)) as srv:
        srv.context = ssl.create_default_context(cafile=str(cert))
        yield srv
        assert srv.proc.poll() is None, srv.read_log()


def https(srv, method: str, path: str, body=None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("localhost", srv.port, context=srv.context, timeout=5)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def tls_stream(srv, path: str) -> SSEClient:
    """An SSEClient reading ``path`` over TLS."""
    sock = srv.context.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5),
                                   server_hostname="localhost")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        got = sock.recv(65536)
        assert got, head
        head += got
    head, _, rest = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nTransfer-Encoding: chunked" in head, head
    client = SSEClient(srv.port, path, connect=False)
    client.sock = sock
    client._chunked = True
    client._feed(rest)
    return client


def test_post_and_read_over_https(tls_server):
    status, body = https(tls_server, "POST", "/ticker/TLS/price", {"price": "1.25"})
    assert status == 201 and json.loads(body)["price"] == 1.25
    status, body = https(tls_server, "GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_event_stream_over_tls(tls_server):
    with tls_stream(tls_server, "/ticker/TLSS/event") as client:
        client.pump(0.2)
        tickers = [{"symbol": "TLSS", "price": str(p)} for p in range(1, 201)]
        assert https(tls_server, "POST", "/tickers", tickers)[0] == 201
        got = client.wait_for(200)
        assert [json.loads(e.data)["price"] for e in got] == list(range(1, 201))


@pytest.mark.parametrize("data", [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                                  b"GET /ticker/A/event HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64])
def test_plain_bytes_on_the_tls_port_harm_nothing(tls_server, data):
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=3) as sock:
        sock.sendall(data)
        out = b""
        try:
            while got := sock.recv(65536):
                out += got
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1 200" not in out  # nothing is served in clear text
    assert https(tls_server, "GET", "/healthz")[0] == 200


def test_a_silent_tls_client_gets_408(tls_server):
    sock = tls_server.context.wrap_socket(socket.create_connection(("127.0.0.1", tls_server.port), timeout=3),
                                          server_hostname="localhost")
    with sock:
        started = time.monotonic()
        out = b""
        while got := sock.recv(65536):
            out += got
        assert out.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 1


def test_a_stalled_tls_handshake_is_cut_at_the_header_timeout(tls_server):
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=HEADER_TIMEOUT_S + 2) as sock:
        started = time.monotonic()
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
        assert closed and time.monotonic() - started < HEADER_TIMEOUT_S + 1.5


def test_a_relay_follows_an_https_upstream_that_its_trust_store_knows(tls_server, certificate, tmp_path):
    """``--upstream https://``: verified against the system's trust store, here SSL_CERT_FILE."""
    cert, _key = certificate
    upstream = f"https://localhost:{tls_server.port}"
    unknown = ServerProcess(tmp_path / "a.db", "--upstream", upstream, env={"SSL_CERT_FILE": str(tmp_path / "none")})
    with pytest.raises(TimeoutError):  # an unverified upstream is never followed
        unknown.start(timeout=3)
    assert "certificate verify failed" in unknown.read_log()
    unknown.stop()
    with ServerProcess(tmp_path / "b.db", "--upstream", upstream, env={"SSL_CERT_FILE": str(cert)}) as relay:
        with SSEClient(relay.port, "/ticker/TLS/event") as client:
            status, _ = https(tls_server, "POST", "/ticker/TLS/price", {"price": "1.25"})
            assert status == 201
            assert [e.data for e in client.wait_for(1, name="price_update")][0].startswith('{"symbol":"TLS"')
