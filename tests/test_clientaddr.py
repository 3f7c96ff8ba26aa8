"""clientaddr: the client address behind trusted proxies, and only behind them."""

from __future__ import annotations

import pytest

from monkestream.clientaddr import MAX_HOPS, TrustedProxies, forwarded_for, parse_address, parse_networks
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
