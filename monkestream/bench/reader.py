"""A reader process: its share of the streams, opened, read, cut, resumed and accounted.

The main process tells each reader ``go`` (the measured window) and ``stop``
(the window's seqs); the reader answers with progress and, at the end, its
figures. Everything here runs in the forked child.
"""

from __future__ import annotations

import argparse
import collections
import errno
import heapq
import itertools
import json
import os
import selectors
import socket
import time
import traceback
from array import array
from multiprocessing.connection import Connection
from typing import NamedTuple

from .shared import Shared
from .wire import StreamScanner, id_number

RECV_BYTES = 64 * 1024
HOLES_PER_STREAM_MAX = 65536
OOO_SCAN_EVENTS = 4096
HIST_MAX_US = 2**31
HIST_BUCKETS = 26 * 64 + 128  # 64 per power of two: bucket width < 1.6 % of the value
SCHEDULE_SPAN = 0.8  # late opens and cuts happen in the first 80 % of the window
CATCH_UP_S = 1.0  # at stop, how long late streams may take to reach the last event

INITIAL, LATE = "initial", "late"


class Share(NamedTuple):
    """One reader's part of the run: which reader it is and how many initial streams it opens."""

    index: int
    clients: int


class Target(NamedTuple):
    """Where the server is: a socket address, its family, and the Host header that names it."""

    address: tuple
    family: int
    host_header: str


def dial(target: Target) -> socket.socket | str:
    """A non-blocking socket connecting to ``target``, or why it could not start to."""
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex(target.address)
    if err in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
        return sock
    sock.close()
    return os.strerror(err)


def send_request(sock: socket.socket, head: bytes, last_id: bytes | None) -> str | None:
    """``sock`` connected, or failed to: send ``head`` (resuming after ``last_id``); why not, or None."""
    request = head + (b"Last-Event-ID: %s\r\n" % last_id if last_id else b"") + b"\r\n"
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    try:
        sent = 0 if err else sock.send(request)
    except OSError as exc:
        err = exc.errno or errno.EPIPE
    if err:
        return os.strerror(err)
    return None if sent == len(request) else "short send"


class _Stream:
    __slots__ = ("base", "cuts", "dup", "evicted_below", "evicted_missing", "hi", "holes", "kind", "label",
                 "live", "ooo", "scanner", "sock", "t_live", "tracked", "waiting")

    def __init__(self, kind: str, label: str, symbol: str, base: int = 0) -> None:
        self.kind, self.label = kind, label
        self.sock: socket.socket | None = None
        self.scanner = StreamScanner(symbol)
        self.tracked = kind == INITIAL  # the publisher's window waits for it
        self.base = base  # every seq up to here was answered before the stream was asked for
        self.hi = base  # highest seq received
        self.holes: set[int] = set()  # seqs below hi not received (yet)
        self.evicted_below = 0  # holes below this were forgotten...
        self.evicted_missing = 0  # ...and those sent in the window counted missing
        self.live = False  # streaming, or cut and coming back: events are owed to it
        self.waiting = True  # its request is out, the response head is not in yet
        self.t_live = 0.0
        self.dup = self.ooo = self.cuts = 0


class Reader:
    """One worker process's streams: connect them, then read and account until told to stop."""

    def __init__(self, opts: argparse.Namespace, target: Target, share: Share, ctl: Connection,
                 shared: Shared) -> None:
        self.opts, self.target, self.share, self.ctl, self.shared = opts, target, share, ctl, shared
        self.sel = selectors.DefaultSelector()
        self.streams: list[_Stream] = []
        self.late: list[_Stream] = []
        self.live = 0  # initial streams live: an event is done here when this many have it
        self.failures: dict[str, collections.Counter[str]] = {
            kind: collections.Counter() for kind in (INITIAL, LATE, "resume")}
        self.seen = array("I", bytes(4 * opts.max_events))  # how many initial streams here have each seq
        self.done = array("q")  # seqs every stream here now has, to report
        self.due: list[tuple[float, int, str, _Stream | None]] = []  # (when, order, action, stream)
        self.order = itertools.count()
        self.t0 = self.t1 = float("inf")
        self.cpu0: float | None = None
        self.cpu1: float | None = None
        self.hist = [0] * HIST_BUCKETS
        self.max_us = self.received = self.received_in_window = 0
        self.bogus = self.closed = self.cuts = self.resumed = self.parse_errors = 0
        auth = f"Authorization: Bearer {opts.token}\r\n" if opts.token else ""
        self.request = (
            f"GET {opts.stream_path.replace('%s', opts.symbol)} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{auth}"
        ).encode()

    # -- opening streams ------------------------------------------------------------------

    def connect_all(self) -> None:
        """Open the initial streams, with at most ``--connect-window`` (our share) waiting for a head."""
        window = max(1, self.opts.connect_window // self.opts.workers)
        deadline = time.monotonic() + self.opts.connect_timeout
        todo, waiting = self.share.clients, set()
        while (todo or waiting) and time.monotonic() < deadline:
            while todo and len(waiting) < window:
                todo -= 1
                label = f"stream {self.share.index}.{self.share.clients - todo - 1}"
                stream = _Stream(INITIAL, label, self.opts.symbol)
                if self._open(stream):
                    waiting.add(stream)
            for key, mask in self.sel.select(0.05):
                stream = key.data
                if mask & selectors.EVENT_WRITE:
                    self._send_request(stream)
                    continue
                try:
                    data = stream.sock.recv(RECV_BYTES)
                except OSError as exc:
                    data, stream.scanner.failure = b"", exc.strerror or type(exc).__name__
                stream.scanner.feed(data)
                if not data or stream.scanner.failure:
                    self._close(stream, stream.scanner.failure or "closed before its head")
                elif stream.scanner.streaming:  # read again once publishing starts
                    self.sel.unregister(stream.sock)
                    stream.waiting, stream.live = False, True
                    self.streams.append(stream)
                    self.live += 1
            waiting = {s for s in waiting if s.waiting}
        for stream in waiting:
            self._close(stream, "timeout")
        if todo:
            self.failures[INITIAL]["timeout"] += todo

    def _open(self, stream: _Stream) -> bool:
        """Start connecting ``stream``'s socket; False (and counted) when that fails at once."""
        stream.waiting = True
        sock = dial(self.target)
        if isinstance(sock, str):
            self._close(stream, sock)
            return False
        stream.sock = sock
        self.sel.register(sock, selectors.EVENT_WRITE, stream)
        return True

    def _send_request(self, stream: _Stream) -> None:
        """The socket connected (or failed to): send the request, resuming after the last id if any."""
        failure = send_request(stream.sock, self.request, stream.scanner.last_id)
        if failure:
            self._close(stream, failure)
        else:
            self.sel.modify(stream.sock, selectors.EVENT_READ, stream)

    def _close(self, stream: _Stream, reason: str) -> None:
        """Forget ``stream``'s socket: a failure if it never streamed, a close by the server if it did."""
        if stream.sock is not None:
            self.sel.unregister(stream.sock)
            stream.sock.close()
            stream.sock = None
        if stream.waiting:
            stream.waiting = False
            self.failures["resume" if stream.cuts else stream.kind][reason] += 1
        elif stream.live:
            self.closed += 1
        if stream.live:
            stream.live = False
            if stream.tracked:
                self.live -= 1
                self._say("live", live=self.live)

    # -- the run ------------------------------------------------------------------------

    def run(self) -> None:
        """Read and account until the publisher says ``stop``; then send the figures back."""
        self.sel.register(self.ctl.fileno(), selectors.EVENT_READ, None)
        for stream in self.streams:
            self.sel.register(stream.sock, selectors.EVENT_READ, stream)
        self._say("ready", connected=self.live, failures=dict(self.failures[INITIAL]))
        batch_s, parent, monotonic = self.opts.batch_ms / 1000, os.getppid(), time.monotonic
        next_pass = 0.0
        while True:
            if batch_s:  # at most one pass per batch_s, so one read takes several events
                pause = next_pass - monotonic()
                if pause > 0:
                    time.sleep(pause)
                next_pass = monotonic() + batch_s
            timeout = min(0.1, max(0.0, self.due[0][0] - monotonic())) if self.due else 0.1
            command = self._pass(timeout)
            if command is None and os.getppid() != parent:
                return
            if self.due:
                self._act(monotonic())
            if self.done:
                self.ctl.send_bytes(b"D" + self.done.tobytes())
                del self.done[:]
            now = monotonic()
            if self.cpu0 is None and now >= self.t0:
                self.cpu0 = time.process_time()
            if self.cpu1 is None and now >= self.t1:
                self.cpu1 = time.process_time()
            if command and self._command():
                return

    def _pass(self, timeout: float) -> bool | None:
        """One select: connect, read and account what is ready; None when nothing was."""
        ready = self.sel.select(timeout)
        if not ready:
            return None
        received, command, monotonic = [], False, time.monotonic
        for key, mask in ready:  # read all first, so a late socket's time is not our work's
            stream = key.data
            if stream is None:
                command = True
            elif mask & selectors.EVENT_WRITE:
                self._send_request(stream)
            else:
                try:
                    received.append((stream, stream.sock.recv(RECV_BYTES), monotonic()))
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    received.append((stream, b"", monotonic()))
        for stream, data, now in received:
            self._account(stream, data, now)
        return command

    def _account(self, stream: _Stream, data: bytes, now: float) -> None:
        """Count the events in one read: order, duplicates, latency, completion (the hot path)."""
        sent, seen, hist, done, live = self.shared.sent, self.seen, self.hist, self.done, self.live
        t0, t1, hi, tracked = self.t0, self.t1, stream.hi, stream.tracked
        events = stream.scanner.feed(data) if data else ()
        if stream.waiting and stream.scanner.streaming:
            self._on_head(stream, now)
        for s, ident in events:
            if s > hi:
                if s >= self.opts.max_events:
                    self.bogus += 1
                    continue
                if s != hi + 1:
                    self._open_gap(stream, hi, s)
                hi = s
            elif s in stream.holes:
                stream.holes.discard(s)
                if self.opts.pub_conns == 1 or self._overtaken(stream, s, hi):
                    stream.ooo += 1
            else:
                if s <= stream.base:  # published before this late stream was asked for
                    stream.ooo += 1
                else:
                    stream.dup += s >= stream.evicted_below
                continue
            sent_at = sent[s]
            if t0 <= sent_at < t1:
                us = int((now - sent_at) * 1e6)
                if us > self.max_us:
                    self.max_us = us = min(us, HIST_MAX_US - 1)
                elif us < 0:
                    us = 0
                shift = us.bit_length() - 7  # hist_index(), inlined
                hist[(shift << 6) + (us >> shift) if shift > 0 else us] += 1
            if tracked:
                n = seen[s] + 1
                seen[s] = n
                if n == 1:
                    self.shared.id_of[s] = id_number(ident)
                if n == live:
                    done.append(s)
        stream.hi = hi
        self.received += len(events)
        if t0 <= now < t1:
            self.received_in_window += len(events)
        if not data or stream.scanner.failure or stream.scanner.ended:
            self._close(stream, stream.scanner.failure or "closed before its head")

    def _on_head(self, stream: _Stream, now: float) -> None:
        stream.waiting = False
        if stream.kind == LATE:
            stream.live, stream.t_live = True, now
        else:
            self.resumed += 1

    def _in_window(self, seq: int) -> bool:
        return self.t0 <= self.shared.sent[seq] < self.t1

    def _open_gap(self, stream: _Stream, hi: int, s: int) -> None:
        """Remember seqs ``hi+1 .. s-1`` as not received; past the bound, forget the oldest."""
        start = max(hi + 1, s - HOLES_PER_STREAM_MAX)
        stream.evicted_missing += sum(map(self._in_window, range(hi + 1, start)))
        stream.holes.update(range(start, s))
        if len(stream.holes) > HOLES_PER_STREAM_MAX:
            oldest = sorted(stream.holes)[: len(stream.holes) // 2]
            stream.holes.difference_update(oldest)
            stream.evicted_missing += sum(map(self._in_window, oldest))
            stream.evicted_below = oldest[-1] + 1

    def _overtaken(self, stream: _Stream, s: int, hi: int) -> bool:
        """Did this stream get a later seq from the same publisher connection before ``s``?"""
        conn_of, end = self.shared.conn_of, min(hi, s + OOO_SCAN_EVENTS)
        return hi > end or any(conn_of[x] == conn_of[s] and x not in stream.holes for x in range(s + 1, end + 1))

    # -- late opens and cuts ------------------------------------------------------------

    def _schedule(self) -> None:
        """Spread the run's late opens and cuts over the window; this reader takes every W-th."""
        span, workers, index = SCHEDULE_SPAN * (self.t1 - self.t0), self.opts.workers, self.share.index
        for action, total in (("open", self.opts.late_clients), ("cut", self.opts.reconnect)):
            for j in range(index, total, workers):
                target = self.streams[(j // workers) % len(self.streams)] if action == "cut" and self.streams else None
                heapq.heappush(self.due, (self.t0 + span * (j + 0.5) / total, next(self.order), action, target))

    def _act(self, now: float) -> None:
        """Do the late opens, cuts and reconnections that are due."""
        while self.due and self.due[0][0] <= now:
            action, stream = heapq.heappop(self.due)[2:]
            if action == "open":
                stream = _Stream(LATE, f"late {self.share.index}.{len(self.late)}", self.opts.symbol,
                                 base=self.shared.acked[0])
                self.late.append(stream)
                self._open(stream)
            elif action == "cut" and stream is not None and stream.live and not stream.waiting:
                self.sel.unregister(stream.sock)
                stream.sock.close()
                stream.sock = None
                stream.cuts += 1
                self.cuts += 1
                self.parse_errors += stream.scanner.parse_errors
                heapq.heappush(self.due, (now + self.opts.reconnect_delay / 1000, next(self.order), "resume", stream))
            elif action == "resume":
                stream.scanner = StreamScanner(self.opts.symbol, stream.scanner.last_id)
                self._open(stream)

    # -- the end --------------------------------------------------------------------------

    def _command(self) -> bool:
        """Obey the publisher; True when this reader is done."""
        try:
            command, *args = self.ctl.recv()
        except EOFError:
            return True
        if command == "go":
            self.t0, self.t1 = args
            self._schedule()
            return False
        self._catch_up(args[2])
        self._report(*args)
        return True

    def _catch_up(self, last: int) -> None:
        """Late streams are not waited for by the publisher: give them a moment to reach ``last``."""
        self.sel.unregister(self.ctl.fileno())
        deadline = time.monotonic() + CATCH_UP_S
        while time.monotonic() < deadline and any(s.live and s.hi < last for s in self.late):
            self._pass(0.05)

    def _report(self, w0: int | None, w1: int | None, last: int) -> None:
        totals: dict[str, int] = collections.Counter()
        worst, worst_score = None, 0
        for stream in self.streams + self.late:
            if stream.kind == LATE and not stream.t_live:
                continue  # it never streamed: counted among the failures
            missing = self._late_missing(stream, last) if stream.kind == LATE else self._missing(stream, w0, w1)
            for group in ("all", stream.kind) + (("resumed",) if stream.cuts else ()):
                totals[f"{group}_missing"] += missing
                totals[f"{group}_dup"] += stream.dup
                totals[f"{group}_ooo"] += stream.ooo
                totals[f"{group}_streams_missing"] += missing > 0
                totals[f"{group}_streams_dup"] += stream.dup > 0
                totals[f"{group}_streams_ooo"] += stream.ooo > 0
            if missing + stream.dup + stream.ooo > worst_score:
                worst_score = missing + stream.dup + stream.ooo
                worst = {"stream": stream.label, "cuts": stream.cuts, "missing": missing,
                         "dup": stream.dup, "ooo": stream.ooo}
            if stream.sock is not None:
                stream.sock.close()
        if self.cpu0 is None:
            cpu_s = 0.0
        else:
            cpu_s = (self.cpu1 if self.cpu1 is not None else time.process_time()) - self.cpu0
        self._say(
            "result", hist=self.hist, max_us=self.max_us, cpu_s=cpu_s,
            deliveries_total=self.received - self.bogus, deliveries_window=self.received_in_window,
            missing_total=totals["all_missing"], clients_missing=totals["all_streams_missing"],
            dup_total=totals["all_dup"], ooo_total=totals["all_ooo"],
            streams_dup=totals["all_streams_dup"], streams_ooo=totals["all_streams_ooo"], worst_stream=worst,
            bogus_seq=self.bogus, clients_closed_by_server=self.closed, clients_live_end=self.live,
            parse_errors=self.parse_errors + sum(s.scanner.parse_errors for s in self.streams + self.late),
            late_connected=sum(1 for s in self.late if s.t_live), late_failures=dict(self.failures[LATE]),
            late_missing=totals["late_missing"], late_dup=totals["late_dup"], late_ooo=totals["late_ooo"],
            reconnects=self.cuts, resumed=self.resumed, resume_failures=dict(self.failures["resume"]),
            resumed_streams=sum(1 for s in self.streams if s.cuts), resumed_missing=totals["resumed_missing"],
            resumed_dup=totals["resumed_dup"], resumed_ooo=totals["resumed_ooo"],
        )

    def _missing(self, stream: _Stream, w0: int | None, w1: int | None) -> int:
        """An initial stream misses the window's events it never got."""
        lost = stream.evicted_missing
        if w0 is not None:
            lost += sum(1 for x in stream.holes if w0 <= x <= w1)
            lost += max(0, w1 - max(stream.hi, w0 - 1))
        return lost

    def _late_missing(self, stream: _Stream, last: int) -> int:
        """A late stream misses the events after its start that it never got.

        Its start is the first event id it saw (a replayed event's or the
        id-only position frame's): it is owed every event the server numbered
        after that, as the initial streams saw them numbered. Events no initial
        stream saw, or servers whose ids are not ``EPOCH-SEQ``, fall back to send
        times: an event sent after the stream's head arrived is owed to it.
        """
        start, id_of, sent = id_number(stream.scanner.first_id), self.shared.id_of, self.shared.sent

        def owed(s: int) -> bool:
            n = id_of[s]
            return n > start if n and start else sent[s] >= stream.t_live

        return stream.evicted_missing + sum(map(owed, stream.holes)) + sum(map(owed, range(stream.hi + 1, last + 1)))

    def _say(self, kind: str, **fields: object) -> None:
        self.ctl.send_bytes(b"M" + json.dumps([kind, fields]).encode())


def reader_process(opts: argparse.Namespace, target: Target, share: Share, ctl: Connection, shared: Shared,
                   inherited: list[Connection]) -> None:
    for conn in inherited:
        conn.close()
    try:
        reader = Reader(opts, target, share, ctl, shared)
        reader.connect_all()
        reader.run()
    except (KeyboardInterrupt, BrokenPipeError):  # interrupted, or the main process is gone
        pass
    except Exception:  # noqa: BLE001 - the process root: the main process reports it and stops
        ctl.send_bytes(b"M" + json.dumps(["error", {"trace": traceback.format_exc()}]).encode())
