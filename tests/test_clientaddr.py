"""clientaddr: the client address behind trusted proxies, and only behind them."""

from __future__ import annotations

import pytest

from monkestream.clientaddr import MAX_HOPS, UNIX_PEER, TrustedProxies, forwarded_for, parse_address, parse_networks
from monkestream.http11 import Request

PROXY = "10.0.0.1"


def req(*headers: tuple[str, str]) -> Request:
    return Request("GET", "/", "/", "", "1.1", [(k.lower(), v) for k, v in headers], b"", True)


def xff(value: str) -> Request:
    return req(("X-Forwarded-For", value))


TRUSTED = TrustedProxies.parse("10.0.0.0/8, 127.0.0.1, fd00::/8")


def test_clientaddr_rule_1_without_trusted_proxies_the_peer_is_the_client():
    assert TrustedProxies.parse("").client(PROXY, xff("203.0.113.7")) == PROXY
    assert TrustedProxies().client("::1", req(("Forwarded", "for=203.0.113.7"))) == "::1"


@pytest.mark.parametrize("peer", ["192.0.2.1", "2001:db8::1", "local", ""])
def test_clientaddr_rule_1_headers_from_an_untrusted_peer_are_ignored(peer):
    for request in [xff("203.0.113.7"), xff("10.0.0.5"), req(("Forwarded", "for=203.0.113.7"))]:
        assert TRUSTED.client(peer, request) == peer


@pytest.mark.parametrize("chain, client", [
    ("203.0.113.7", "203.0.113.7"),
    ("198.51.100.1, 203.0.113.7", "203.0.113.7"),           # what the client wrote itself is not believed
    ("198.51.100.1, 203.0.113.7, 10.0.0.2", "203.0.113.7"),  # a trusted inner proxy is skipped
    ("203.0.113.7,10.9.9.9,10.0.0.2", "203.0.113.7"),
    ("10.0.0.3, 10.0.0.2", "10.0.0.3"),                      # every hop trusted: the leftmost
])
def test_clientaddr_rule_2_the_rightmost_untrusted_hop_of_x_forwarded_for_is_the_client(chain, client):
    assert TRUSTED.client(PROXY, xff(chain)) == client


@pytest.mark.parametrize("chain, client", [
    ("203.0.113.7, unknown", PROXY),                         # the nearest trusted hop: here the peer
    ("203.0.113.7, garbage, 10.0.0.2", "10.0.0.2"),
    ("203.0.113.7, _hidden", PROXY),
    ("203.0.113.7, 10.0.0.0/8", PROXY),
    ("", PROXY),
    (" , ", PROXY),
])
def test_clientaddr_rule_4_a_hop_that_is_not_an_address_ends_the_walk(chain, client):
    assert TRUSTED.client(PROXY, xff(chain)) == client


@pytest.mark.parametrize("chain, client", [
    ("203.0.113.7:4711", "203.0.113.7"),
    ("[2001:db8::7]:4711", "2001:db8::7"),
    ("[2001:db8::7]", "2001:db8::7"),
    ("2001:DB8:0::7", "2001:db8::7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    (" 203.0.113.7 ", "203.0.113.7"),
])
def test_clientaddr_rule_5_one_client_is_one_key_whatever_its_spelling(chain, client):
    assert TRUSTED.client(PROXY, xff(chain)) == client


def test_clientaddr_rule_2_repeated_x_forwarded_for_fields_are_one_list():
    request = req(("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.1, 10.0.0.2"))
    assert TRUSTED.client(PROXY, request) == "198.51.100.1"


def test_clientaddr_rule_5_an_ipv4_mapped_or_ipv6_peer_can_be_trusted():
    assert TRUSTED.client("::ffff:127.0.0.1", xff("203.0.113.7")) == "203.0.113.7"
    assert TRUSTED.client("fd00::2", xff("2001:db8::1")) == "2001:db8::1"


@pytest.mark.parametrize("value, client", [
    ("for=203.0.113.7", "203.0.113.7"),
    ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60"),
    ('For="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
    ("for=198.51.100.1, for=203.0.113.7", "203.0.113.7"),
    ('for=198.51.100.1, for=203.0.113.7;proto=https, for="10.0.0.2"', "203.0.113.7"),
    ("proto=https;for=203.0.113.7", "203.0.113.7"),
    ("for=unknown", PROXY),
    ("for=_hidden, for=10.0.0.2", "10.0.0.2"),
    ("for=203.0.113.7, proto=https", PROXY),     # the nearest element names no client
    ("for=203.0.113.7 junk", PROXY),             # malformed: ignored whole
    ('for="203.0.113.7', PROXY),
])
def test_clientaddr_rule_3_forwarded_for_is_read_the_same_way(value, client):
    assert TRUSTED.client(PROXY, req(("Forwarded", value))) == client


def test_clientaddr_rule_3_x_forwarded_for_wins_over_forwarded():
    # a proxy that appends to X-Forwarded-For passes a client's own Forwarded through untouched
    request = req(("Forwarded", "for=198.51.100.66"), ("X-Forwarded-For", "203.0.113.7"))
    assert TRUSTED.client(PROXY, request) == "203.0.113.7"


def test_clientaddr_rule_2_a_long_chain_is_read_only_so_far():
    chain = ", ".join(["203.0.113.7"] + ["10.0.0.2"] * (MAX_HOPS + 5))
    assert TRUSTED.client(PROXY, xff(chain)) == "10.0.0.2"
    chain = ", ".join(["203.0.113.7"] + ["10.0.0.2"] * (MAX_HOPS - 1))
    assert TRUSTED.client(PROXY, xff(chain)) == "203.0.113.7"


def test_forwarded_parsing():
    assert forwarded_for('for=a;by=b, for="[::1]:80", proto=x') == ["a", "[::1]:80", ""]
    assert forwarded_for('for="a\\"b"') == ['a"b']
    assert forwarded_for("for") is None and forwarded_for("=x") is None


@pytest.mark.parametrize("text, address", [
    ("1.2.3.4", "1.2.3.4"), ("1.2.3.4:80", "1.2.3.4"), ("[::1]", "::1"), ("[::1]:80", "::1"), ("::1", "::1"),
    ("::ffff:1.2.3.4", "1.2.3.4"), ("unknown", None), ("", None), ("1.2.3", None), ("1.2.3.4:80:1", None),
])
def test_parse_address(text, address):
    got = parse_address(text)
    assert (str(got) if got is not None else None) == address


def test_parse_networks():
    assert [str(n) for n in parse_networks(" 127.0.0.1 ,10.1.2.3/8,,::1, fd00::/8")] == [
        "127.0.0.1/32", "10.0.0.0/8", "::1/128", "fd00::/8"]
    for bad in ["localhost", "10.0.0.0/33", "1.2.3.4.5", "*"]:
        with pytest.raises(ValueError, match="not an address"):
            parse_networks(f"127.0.0.1,{bad}")


# -- relays (Rule 6) ---------------------------------------------------------------------

RELAY = "192.0.2.50"      # a relay's address, in no trusted network
TOKEN = "s3cret-token"


def relayed(client: str, token: str | None = None) -> Request:
    headers = [("X-Forwarded-For", client)]
    if token is not None:
        headers.append(("X-Relay-Token", token))
    return req(*headers)


def test_clientaddr_rule_6_a_relay_is_trusted_by_its_address_like_a_proxy():
    proxies = TrustedProxies.parse(RELAY, relay_token=TOKEN)
    assert proxies.client(RELAY, relayed("203.0.113.7")) == "203.0.113.7"
    assert proxies.client("192.0.2.51", relayed("203.0.113.7")) == "192.0.2.51"   # another peer: not a relay


def test_clientaddr_rule_6_a_relay_presenting_the_token_is_trusted_from_any_address():
    proxies = TrustedProxies(relay_token=TOKEN)   # no trusted network at all
    assert proxies.client(RELAY, relayed("203.0.113.7", TOKEN)) == "203.0.113.7"
    assert proxies.client("2001:db8::50", relayed("198.51.100.1, 203.0.113.7", TOKEN)) == "203.0.113.7"
    assert proxies.client(RELAY, req(("X-Relay-Token", TOKEN))) == RELAY   # it names no client: the peer
    assert proxies.client(RELAY, relayed("unknown", TOKEN)) == RELAY
    # trusted by the token, not by its address: what its client wrote further left is not believed
    assert TrustedProxies(TRUSTED.networks, TOKEN).client(RELAY, relayed("198.51.100.1, 10.0.0.2", TOKEN)) == "198.51.100.1"


@pytest.mark.parametrize("token", ["", "s3cret-toke", "s3cret-token ", "S3CRET-TOKEN", "s3cret-tokenX", "s3cret-tökén"])
def test_clientaddr_rule_6_a_wrong_relay_token_is_not_trusted(token):
    proxies = TrustedProxies(relay_token=TOKEN)
    assert proxies.client(RELAY, relayed("203.0.113.7", token)) == RELAY
    assert proxies.client(RELAY, relayed("203.0.113.7")) == RELAY   # none at all


@pytest.mark.parametrize("token", ["", "anything"])
def test_clientaddr_rule_6_with_no_token_configured_the_relay_header_is_ignored(token):
    proxies = TrustedProxies()
    assert proxies.client(RELAY, relayed("203.0.113.7", token)) == RELAY
    # and beside trusted proxies it changes nothing either
    assert TRUSTED.client(RELAY, relayed("203.0.113.7", token)) == RELAY
    assert TRUSTED.client(PROXY, relayed("203.0.113.7", token)) == "203.0.113.7"


def test_clientaddr_rule_6_the_relay_token_is_compared_in_constant_time(monkeypatch):
    import hmac

    import monkestream.clientaddr
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)
    monkeypatch.setattr(monkestream.clientaddr.hmac, "compare_digest", recording)
    proxies = TrustedProxies(relay_token=TOKEN)
    assert proxies.client(RELAY, relayed("203.0.113.7", TOKEN)) == "203.0.113.7"
    assert proxies.client(RELAY, relayed("203.0.113.7", "nope")) == RELAY
    assert compared == [(TOKEN.encode(), TOKEN.encode()), (b"nope", TOKEN.encode())]


def test_clientaddr_rule_6_a_peer_on_the_unix_socket_is_a_relay_only_when_the_socket_is_the_servers():
    assert UNIX_PEER == "local"
    on_socket = TrustedProxies.parse("", unix=True)
    assert on_socket.client(UNIX_PEER, relayed("203.0.113.7")) == "203.0.113.7"
    assert on_socket.client(UNIX_PEER, relayed("198.51.100.1, 203.0.113.7")) == "203.0.113.7"
    assert on_socket.client(UNIX_PEER, req()) == UNIX_PEER           # it names no client
    assert on_socket.client(UNIX_PEER, relayed("garbage")) == UNIX_PEER
    assert on_socket.client("192.0.2.1", relayed("203.0.113.7")) == "192.0.2.1"   # a TCP peer is not
    for proxies in (TrustedProxies(), TRUSTED, TrustedProxies(relay_token=TOKEN)):
        assert proxies.client(UNIX_PEER, relayed("203.0.113.7")) == UNIX_PEER
    # without unix=True a peer there is trusted only as any other is: by the token
    assert TrustedProxies(relay_token=TOKEN).client(UNIX_PEER, relayed("203.0.113.7", TOKEN)) == "203.0.113.7"
    assert TrustedProxies(relay_token=TOKEN).client(UNIX_PEER, relayed("203.0.113.7", "nope")) == UNIX_PEER


def _comment_over_unix(path: str, client: str) -> int:
    import json
    import socket
    body = json.dumps({"user": "ann", "text": "hi"}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"POST /room/r/comments HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Forwarded-For: "
                     + client.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_clientaddr_rule_6_a_real_server_keys_its_limits_on_the_client_a_relay_names(tmp_path):
    import tempfile

    from helpers import AppThread, request
    comment = {"user": "ann", "text": "hi"}
    with tempfile.TemporaryDirectory(prefix="ms-ca") as folder:   # short: a socket path has a limit
        socket_path = f"{folder}/s.sock"
        with AppThread(tmp_path / "ca.db", token=TOKEN, unix_socket=socket_path,
                       comment_burst=1, comment_rate=0.001) as s:
            def post(client: str, token: str | None = None) -> int:
                headers = {"X-Forwarded-For": client, **({"X-Relay-Token": token} if token is not None else {})}
                return request(s.port, "POST", "/room/r/comments", comment, headers=headers)[0]
            # through a relay with the token: each client named has its own budget
            assert [post("203.0.113.1", TOKEN), post("203.0.113.2", TOKEN), post("203.0.113.1", TOKEN)] == [201, 201, 429]
            # without it (or with a wrong one) the header is the peer's invention: every request is the peer's
            assert post("203.0.113.3") == 201
            assert [post("203.0.113.4"), post("203.0.113.5", "wrong")] == [429, 429]
            # on the server's Unix socket: its peers are relays
            assert [_comment_over_unix(socket_path, "198.51.100.1"), _comment_over_unix(socket_path, "198.51.100.2"),
                    _comment_over_unix(socket_path, "198.51.100.1")] == [201, 201, 429]
