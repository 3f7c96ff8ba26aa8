"""Who a request is from: the peer's address, or the one a trusted proxy reports for it.

Per-client limits (rate limits, streams per client) key on this address.
Behind a reverse proxy every peer is the proxy, so they would key everyone
together; the proxy's ``X-Forwarded-For`` or ``Forwarded`` header names the
real client, but any client can send those headers too.

Theory of operation
-------------------
Rule 1: the headers are read only when the connection's peer is a trusted
        proxy; from any other peer they are ignored and the peer is the client.
Rule 2: the chain is read from the right, the hop nearest to us: the first
        address that is not itself a trusted proxy is the client. Everything
        left of it was written by that client, so it is never believed. When
        every hop is trusted, the leftmost is the client.
Rule 3: ``X-Forwarded-For`` is read when present, else ``Forwarded``
        (RFC 7239 §5.2 ``for=``). A proxy that appends to one passes the
        other through as the client sent it, so the one that proxies actually
        set (X-Forwarded-For, nearly always) wins.
Rule 4: a hop that is not an address (``unknown``, an obfuscated name, or
        garbage) ends the walk: the nearest trusted hop seen is the client.
Rule 5: addresses are normalised (an IPv4-mapped IPv6 address is its IPv4
        address; ports are dropped), so one client is always one key.
Rule 6: a relay (a monkestream serving another's events) is trusted like a
        proxy: by address, or when it presents ``X-Relay-Token`` equal to
        the publish token, or when it is a peer on the server's Unix socket
        (the workers of one machine). It names its client in X-Forwarded-For.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Iterator, Union

from .http11 import Request

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

UNIX_PEER = "local"  # the peer of a connection on a Unix socket
MAX_HOPS = 32    # hops read from the right; a longer chain is a client's invention

# RFC 7239 §4: forwarded-pair = token "=" value; value = token / quoted-string
_PAIR = re.compile(r'[ \t]*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[!#$%&\'*+.^_`|~0-9A-Za-z:\[\]-]*)[ \t]*([;,]|$)')


def parse_networks(text: str) -> tuple[Network, ...]:
    """Parse a comma-separated list of addresses and CIDR networks; ValueError names a bad one."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or a network") from None
    return tuple(networks)


def parse_address(text: str) -> Address | None:
    """An address from a header hop (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_for(value: str) -> list[str] | None:
    """The ``for=`` node of each element of a ``Forwarded`` value, left to right; None if malformed."""
    nodes: list[str] = []
    node = ""
    pos = 0
    while pos < len(value):
        match = _PAIR.match(value, pos)
        if match is None or match.end() == pos:
            return None
        name, raw, separator = match.groups()
        if name.lower() == "for":
            node = raw[1:-1].replace("\\", "") if raw.startswith('"') else raw
        if separator != ";":
            nodes.append(node)
            node = ""
        pos = match.end()
    return nodes


class TrustedProxies:
    """The proxies whose forwarding headers are believed, and the client address they give."""

    __slots__ = ("networks", "relay_token", "unix")

    def __init__(self, networks: tuple[Network, ...] = (), relay_token: str = "", unix: bool = False) -> None:
        self.networks = networks
        self.relay_token = relay_token
        self.unix = unix      # the server's Unix socket is private to its relays

    @classmethod
    def parse(cls, text: str, relay_token: str = "", unix: bool = False) -> TrustedProxies:
        return cls(parse_networks(text), relay_token, unix)

    def _relay(self, peer: str, request: Request) -> bool:
        """Rule 6: whether the peer is a relay that names its client."""
        if peer == UNIX_PEER and self.unix:
            return True
        token = request.header("x-relay-token")
        return bool(self.relay_token) and token is not None and hmac.compare_digest(
            token.encode("latin-1", "replace"), self.relay_token.encode())

    def trusts(self, address: Address | None) -> bool:
        return address is not None and any(address in net for net in self.networks)

    def client(self, peer: str, request: Request) -> str:
        """The address per-client limits key on, for a request that came from ``peer`` (Rules 1-5)."""
        relay = self._relay(peer, request)
        if not self.networks and not relay:
            return peer
        client = parse_address(peer)
        if not (relay or self.trusts(client)):
            return peer
        for hop in self._hops(request):
            address = parse_address(hop)
            if address is None:
                break               # Rule 4
            client = address
            if not self.trusts(address):
                break               # Rule 2
        return str(client) if client is not None else peer

    @staticmethod
    def _hops(request: Request) -> Iterator[str]:
        """The hops of the chain, nearest first, at most MAX_HOPS (Rule 3)."""
        xff = [v for k, v in request.headers if k == "x-forwarded-for"]
        if xff:
            hops = ",".join(xff).split(",")
        else:
            forwarded = [v for k, v in request.headers if k == "forwarded"]
            hops = (forwarded_for(",".join(forwarded)) or []) if forwarded else []
        return reversed(hops[-MAX_HOPS:])
