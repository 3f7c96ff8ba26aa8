"""The publisher: K keep-alive connections posting ``"price": seq``, each seq's send time recorded first."""

from __future__ import annotations

import argparse
import collections
import selectors
import socket

from .reader import RECV_BYTES, Target
from .shared import Shared
from .wire import take_response

RECONNECTS_MAX = 100


class PubConn:
    __slots__ = ("inbuf", "index", "pending", "sock")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index, self.sock, self.inbuf = index, sock, b""
        self.pending: collections.deque[int] = collections.deque()  # seqs posted, not answered yet


class Publisher:
    """Posts seq after seq; keeps the answers' statuses and how far every seq has been answered."""

    def __init__(self, opts: argparse.Namespace, target: Target, sel: selectors.BaseSelector,
                 shared: Shared) -> None:
        self.opts, self.address, self.sel, self.shared = opts, target.address, sel, shared
        auth = f"Authorization: Bearer {opts.token}\r\n" if opts.token else ""
        self.head = (
            f"POST /ticker/{opts.symbol}/price HTTP/1.1\r\nHost: {target.host_header}\r\n{auth}"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.conns: list[PubConn] = []
        self.seq = 0  # last seq published
        self.acked = self.non2xx = self.lost = self.reconnects = 0
        self.statuses: collections.Counter[int] = collections.Counter()

    def open(self, index: int | None = None) -> None:
        """Open every connection, or reopen connection ``index``."""
        for i in range(self.opts.pub_conns) if index is None else (index,):
            try:
                sock = socket.create_connection(self.address[:2], timeout=self.opts.connect_timeout)
            except OSError as exc:
                raise ConnectionError(f"cannot publish: {exc}") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append(PubConn(i, sock))  # in timeout mode: a send waits, boundedly
            self.sel.register(sock, selectors.EVENT_READ, self.conns[-1])

    def close(self) -> None:
        for conn in self.conns:
            self.sel.unregister(conn.sock)
            conn.sock.close()
        self.conns.clear()

    def free_conn(self) -> PubConn | None:
        conn = min(self.conns, key=lambda c: len(c.pending), default=None)
        return conn if conn is not None and len(conn.pending) < self.opts.pipeline else None

    def publish(self, conn: PubConn, now: float) -> int:
        self.seq += 1
        body = b'{"price": %d, "currency": "USD"}' % self.seq
        self.shared.sent[self.seq] = now
        self.shared.conn_of[self.seq] = conn.index
        conn.pending.append(self.seq)
        try:
            conn.sock.sendall(self.head + b"%d\r\n\r\n" % len(body) + body)
        except OSError:
            self._reconnect(conn)
        return self.seq

    def on_readable(self, conn: PubConn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except OSError:
            data = b""
        buf = conn.inbuf + data
        try:
            while data and (response := take_response(buf)):
                status, length = response
                buf = buf[length:]
                if status >= 200:
                    self.statuses[status] += 1
                    conn.pending.popleft()
                    self.acked += 200 <= status < 300
                    self.non2xx += not 200 <= status < 300
        except (ValueError, IndexError):
            data = b""  # not HTTP: start again on a new connection
        conn.inbuf = buf
        if not data:
            self._reconnect(conn)
        heads = [c.pending[0] for c in self.conns if c.pending]
        self.shared.acked[0] = min(heads) - 1 if heads else self.seq

    def _reconnect(self, conn: PubConn) -> None:
        """The connection broke: its unanswered POSTs are lost; open another."""
        self.lost += len(conn.pending)
        self.reconnects += 1
        self.sel.unregister(conn.sock)
        conn.sock.close()
        self.conns.remove(conn)
        if self.reconnects > RECONNECTS_MAX:
            raise ConnectionError("the server keeps closing publisher connections")
        self.open(conn.index)
