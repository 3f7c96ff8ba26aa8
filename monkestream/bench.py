"""Load generator: open N event streams, publish prices, measure what arrives and when.

``python -m monkestream bench`` ships with the server, as redis-benchmark ships
with redis, so users can measure their own machine. It speaks the wire contract
only (``POST /ticker/{SYMBOL}/price``, ``GET /ticker/{SYMBOL}/event``), so it
measures any server that does.

Theory of operation
-------------------
Rule 1: event number ``seq`` is published as ``"price": seq``. Readers never
        parse SSE on the hot path: they undo chunked framing and look for the
        ``"price":`` marker with bytes searches. A marker or number cut by a read
        or a chunk boundary waits in a short tail for the next read, so every
        event is counted once however the bytes are split.
Rule 2: the publisher writes each seq's send time (``time.monotonic()``, one
        clock for every process on Linux) to shared memory before sending its
        POST. Readers compute latency as they receive and keep histograms only.
Rule 3: an event belongs to the measured window iff it was *sent* inside it.
        Send times grow with seq and publishing stops when the window closes,
        so the window is one seq range ``[w0, w1]``.
Rule 4: each reader reports a seq once all its streams have it. With
        ``--rate 0`` the publisher keeps at most ``--window`` events not yet at
        every stream; an event still missing somewhere after ``--window-timeout``
        stops counting, so a lossy server cannot stall the run.
Rule 5: every phase has a deadline: the run ends by itself, and the worker
        processes it started are always reaped.

Figures follow the kit's C loader (ssebench): ``missing_total`` counts window
events a stream never got; ``dup_total`` and ``ooo_total`` count, over the whole
run, events received twice or after a later event from the same publisher
connection (HTTP orders nothing across connections). They are exact while a
stream's unfilled gaps stay under HOLES_PER_STREAM_MAX events. A comment line
that happened to contain the marker would count as an event.
"""

from __future__ import annotations

import argparse
import collections
import errno
import ipaddress
import json
import math
import mmap
import multiprocessing
import os
import re
import selectors
import socket
import sys
import time
import traceback
from array import array

from monkestream.benchwire import StreamScanner, hist_value, percentile_us, take_response
from monkestream.errors import ConfigError

_SYMBOL = re.compile(r"[A-Za-z0-9._~-]{1,64}")

RECV_BYTES = 64 * 1024
HOLES_PER_STREAM_MAX = 65536
OOO_SCAN_EVENTS = 4096
HIST_MAX_US = 2**31
HIST_BUCKETS = 26 * 64 + 128  # 64 per power of two: bucket width < 1.6 % of the value
RESULT_TIMEOUT_S = 10.0
REFUSED_POSTS_MAX = 10  # answers that are not 2xx, with none that is, before giving up
REAP_TIMEOUT_S = 2.0
MAX_DURATION_S = 600.0


# ------------------------------------------------------------------ reader processes


class _Stream:
    __slots__ = ("evicted_below", "evicted_missing", "hi", "holes", "live", "scanner", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.scanner = StreamScanner()
        self.hi = 0  # highest seq received
        self.holes: set[int] = set()  # seqs below hi not received (yet)
        self.evicted_below = 0  # holes below this were forgotten...
        self.evicted_missing = 0  # ...and those sent in the window counted missing
        self.live = False


class _Reader:
    """One worker process's streams: connect them, then read and account until told to stop."""

    def __init__(self, opts: argparse.Namespace, target: tuple, count: int, ctl, sent, conn_of) -> None:
        self.opts, self.target, self.count, self.ctl = opts, target, count, ctl
        self.sent, self.conn_of = sent, conn_of
        self.sel = selectors.DefaultSelector()
        self.streams: list[_Stream] = []
        self.live = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.seen = array("I", bytes(4 * opts.max_events))  # how many streams here have each seq
        self.done = array("q")  # seqs every stream here now has, to report
        self.t0 = self.t1 = math.inf
        self.cpu0: float | None = None
        self.cpu1: float | None = None
        self.hist = [0] * HIST_BUCKETS
        self.max_us = self.received = self.received_in_window = 0
        self.dup = self.ooo = self.bogus = self.closed = 0

    def connect_all(self) -> None:
        """Open every stream, with at most ``--connect-window`` (our share) waiting for a head."""
        address, family, host_header = self.target
        auth = f"Authorization: Bearer {self.opts.token}\r\n" if self.opts.token else ""
        request = (
            f"GET /ticker/{self.opts.symbol}/event HTTP/1.1\r\nHost: {host_header}\r\n"
            f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{auth}\r\n"
        ).encode()
        window = max(1, self.opts.connect_window // self.opts.workers)
        deadline = time.monotonic() + self.opts.connect_timeout
        todo, waiting = self.count, set()
        while (todo or waiting) and time.monotonic() < deadline:
            while todo and len(waiting) < window:
                todo -= 1
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex(address)
                if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                    self.failures[os.strerror(err)] += 1
                    sock.close()
                    continue
                stream = _Stream(sock)
                waiting.add(stream)
                self.sel.register(sock, selectors.EVENT_WRITE, stream)
            for key, mask in self.sel.select(0.05):
                stream = key.data
                if mask & selectors.EVENT_WRITE:
                    err = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err or stream.sock.send(request) != len(request):
                        self._fail(stream, waiting, os.strerror(err) if err else "short send")
                    else:
                        self.sel.modify(stream.sock, selectors.EVENT_READ, stream)
                    continue
                try:
                    data = stream.sock.recv(RECV_BYTES)
                except OSError as exc:
                    self._fail(stream, waiting, exc.strerror or type(exc).__name__)
                    continue
                stream.scanner.feed(data)
                if not data or stream.scanner.failure:
                    self._fail(stream, waiting, stream.scanner.failure or "closed before its head")
                elif stream.scanner.streaming:  # read again once publishing starts
                    waiting.discard(stream)
                    self.sel.unregister(stream.sock)
                    stream.live = True
                    self.streams.append(stream)
                    self.live += 1
        for stream in list(waiting):
            self._fail(stream, waiting, "timeout")
        if todo:
            self.failures["timeout"] += todo

    def _fail(self, stream: _Stream, waiting: set, reason: str) -> None:
        waiting.discard(stream)
        self.failures[reason] += 1
        self.sel.unregister(stream.sock)
        stream.sock.close()

    def run(self) -> None:
        """Read and account until the publisher says ``stop``; then send the figures back."""
        self.sel.register(self.ctl.fileno(), selectors.EVENT_READ, None)
        for stream in self.streams:
            self.sel.register(stream.sock, selectors.EVENT_READ, stream)
        self._say("ready", connected=self.live, failures=dict(self.failures))
        batch_s, parent, monotonic = self.opts.batch_ms / 1000, os.getppid(), time.monotonic
        next_pass = 0.0
        while True:
            if batch_s:  # at most one pass per batch_s, so one read takes several events
                pause = next_pass - monotonic()
                if pause > 0:
                    time.sleep(pause)
                next_pass = monotonic() + batch_s
            ready = self.sel.select(0.1)
            if not ready and os.getppid() != parent:
                return
            received, command = [], False
            for key, _ in ready:  # read all first, so a late socket's time is not our work's
                if key.data is None:
                    command = True
                    continue
                try:
                    received.append((key.data, key.data.sock.recv(RECV_BYTES), monotonic()))
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    received.append((key.data, b"", monotonic()))
            for stream, data, now in received:
                self._account(stream, data, now)
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

    def _account(self, stream: _Stream, data: bytes, now: float) -> None:
        """Count the events in one read: order, duplicates, latency, completion (the hot path)."""
        sent, seen, hist, done, live = self.sent, self.seen, self.hist, self.done, self.live
        t0, t1, hi = self.t0, self.t1, stream.hi
        seqs = stream.scanner.feed(data) if data else ()
        for s in seqs:
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
                    self.ooo += 1
            else:
                self.dup += s >= stream.evicted_below
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
            n = seen[s] + 1
            seen[s] = n
            if n == live:
                done.append(s)
        stream.hi = hi
        self.received += len(seqs)
        if t0 <= now < t1:
            self.received_in_window += len(seqs)
        if not data or stream.scanner.failure or stream.scanner.ended:
            self._close(stream)

    def _in_window(self, seq: int) -> bool:
        return self.t0 <= self.sent[seq] < self.t1

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
        conn, end = self.conn_of[s], min(hi, s + OOO_SCAN_EVENTS)
        return hi > end or any(
            self.conn_of[x] == conn and x not in stream.holes for x in range(s + 1, end + 1)
        )

    def _close(self, stream: _Stream) -> None:
        self.sel.unregister(stream.sock)
        stream.sock.close()
        stream.live = False
        self.closed += 1
        self.live -= 1
        self._say("live", live=self.live)

    def _command(self) -> bool:
        """Obey the publisher; True when this reader is done."""
        try:
            command, *args = self.ctl.recv()
        except EOFError:
            return True
        if command == "go":
            self.t0, self.t1 = args
            return False
        self._report(*args)
        return True

    def _report(self, w0: int | None, w1: int | None) -> None:
        missing = clients_missing = 0
        for stream in self.streams:
            lost = stream.evicted_missing
            if w0 is not None:
                lost += sum(1 for x in stream.holes if w0 <= x <= w1)
                lost += max(0, w1 - max(stream.hi, w0 - 1))
            missing += lost
            clients_missing += lost > 0
            if stream.live:
                stream.sock.close()
        if self.cpu0 is None:
            cpu_s = 0.0
        else:
            cpu_s = (self.cpu1 if self.cpu1 is not None else time.process_time()) - self.cpu0
        self._say(
            "result", hist=self.hist, max_us=self.max_us, cpu_s=cpu_s,
            deliveries_total=self.received - self.bogus, deliveries_window=self.received_in_window,
            missing_total=missing, clients_missing=clients_missing, dup_total=self.dup,
            ooo_total=self.ooo, bogus_seq=self.bogus, clients_closed_by_server=self.closed,
            clients_live_end=self.live, parse_errors=sum(s.scanner.parse_errors for s in self.streams),
        )

    def _say(self, kind: str, **fields) -> None:
        self.ctl.send_bytes(b"M" + json.dumps([kind, fields]).encode())


def _reader_process(opts, target, count, ctl, sent_mm: mmap.mmap, conn_mm: mmap.mmap, inherited) -> None:
    for conn in inherited:
        conn.close()
    try:
        reader = _Reader(opts, target, count, ctl, memoryview(sent_mm).cast("d"), memoryview(conn_mm))
        reader.connect_all()
        reader.run()
    except (KeyboardInterrupt, BrokenPipeError):  # interrupted, or the main process is gone
        pass
    except Exception:  # noqa: BLE001 - the process root: the main process reports it and stops
        ctl.send_bytes(b"M" + json.dumps(["error", {"trace": traceback.format_exc()}]).encode())


# ------------------------------------------------------------------ publisher


class _PubConn:
    __slots__ = ("inbuf", "index", "pending", "sock")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index, self.sock, self.inbuf = index, sock, b""
        self.pending = 0  # POSTs not answered yet


class _Publisher:
    """K keep-alive connections posting ``"price": seq``; records each seq's send time."""

    def __init__(self, opts: argparse.Namespace, target: tuple, sel: selectors.BaseSelector, sent, conn_of):
        self.opts, self.address, self.sel = opts, target[0], sel
        self.sent, self.conn_of = sent, conn_of
        auth = f"Authorization: Bearer {opts.token}\r\n" if opts.token else ""
        self.head = (
            f"POST /ticker/{opts.symbol}/price HTTP/1.1\r\nHost: {target[2]}\r\n{auth}"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.conns: list[_PubConn] = []
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
            self.conns.append(_PubConn(i, sock))  # in timeout mode: a send waits, boundedly
            self.sel.register(sock, selectors.EVENT_READ, self.conns[-1])

    def close(self) -> None:
        for conn in self.conns:
            self.sel.unregister(conn.sock)
            conn.sock.close()
        self.conns.clear()

    def free_conn(self) -> _PubConn | None:
        conn = min(self.conns, key=lambda c: c.pending, default=None)
        return conn if conn is not None and conn.pending < self.opts.pipeline else None

    def publish(self, conn: _PubConn, now: float) -> int:
        self.seq += 1
        body = b'{"price": %d, "currency": "USD"}' % self.seq
        self.sent[self.seq] = now
        self.conn_of[self.seq] = conn.index
        conn.pending += 1
        try:
            conn.sock.sendall(self.head + b"%d\r\n\r\n" % len(body) + body)
        except OSError:
            self._reconnect(conn)
        return self.seq

    def on_readable(self, conn: _PubConn) -> None:
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
                    conn.pending -= 1
                    self.acked += 200 <= status < 300
                    self.non2xx += not 200 <= status < 300
        except (ValueError, IndexError):
            data = b""  # not HTTP: start again on a new connection
        conn.inbuf = buf
        if not data:
            self._reconnect(conn)

    def _reconnect(self, conn: _PubConn) -> None:
        """The connection broke: its unanswered POSTs are lost; open another."""
        self.lost += conn.pending
        self.reconnects += 1
        self.sel.unregister(conn.sock)
        conn.sock.close()
        self.conns.remove(conn)
        if self.reconnects > 100:
            raise ConnectionError("the server keeps closing publisher connections")
        self.open(conn.index)


# ------------------------------------------------------------------ the run


def _server_stats(pid: int) -> dict:
    """CPU seconds (utime + stime, all threads) and memory of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    stats = {"server_cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                stats["server_rss_kb" if key == "VmRSS" else "server_hwm_kb"] = int(value.split()[0])
    return stats


def loopback_address(host: str, port: int) -> tuple[tuple, int]:
    """Resolve ``host``; refuse anything that is not a loopback address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc}") from None
    for *_, address in infos:
        if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            raise ConfigError(f"--host {host}: {address[0]} is not a loopback address (bench loads this machine)")
    return infos[0][4], infos[0][0]


class _Worker:
    """The main process's view of one reader process."""

    def __init__(self, process, ctl) -> None:
        self.process, self.ctl = process, ctl
        self.ready = self.gone = False
        self.connected = self.live = 0
        self.failures: dict[str, int] = {}
        self.result: dict | None = None


class _Run:
    """One bench run: readers, publisher, the phases and their deadlines, the figures."""

    def __init__(self, opts: argparse.Namespace, log) -> None:
        self.opts, self.log = opts, log
        address, family = loopback_address(opts.host, opts.port)
        host = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
        self.target = (address, family, f"{host}:{opts.port}")
        self.sel = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        self.active = 0  # workers with a live stream: an event is complete when all have it
        self.wdone = array("H", bytes(2 * opts.max_events))  # workers done with each seq
        self.incomplete: set[int] = set()  # published, not yet at every stream
        self.expired: set[int] = set()  # incomplete, but no longer holding the window
        self.order: collections.deque[int] = collections.deque()  # for expiry, in publish order
        self.last_progress = 0.0
        self.timeouts = 0
        self.w0: int | None = None
        self.max_lag_s = 0.0
        self.fig: dict = {"tool": "monkestream-bench", "mode": "closed_loop" if opts.rate <= 0 else "open_loop"}

    def run(self) -> dict:
        sent_mm = mmap.mmap(-1, 8 * self.opts.max_events)
        conn_mm = mmap.mmap(-1, self.opts.max_events)
        sent, conn_of = memoryview(sent_mm).cast("d"), memoryview(conn_mm)
        try:
            self._spawn(sent_mm, conn_mm)
            self._connect_phase()
            publisher = _Publisher(self.opts, self.target, self.sel, sent, conn_of)
            try:
                publisher.open()
                stats = self._publish_phase(publisher, sent)
                self._drain_phase(publisher)
                return self._figures(publisher, *stats)
            finally:
                publisher.close()
        finally:
            self._reap()
            sent.release()
            conn_of.release()
            sent_mm.close()
            conn_mm.close()

    def _spawn(self, sent_mm: mmap.mmap, conn_mm: mmap.mmap) -> None:
        ctx = multiprocessing.get_context("fork")  # the shared maps are inherited, not pickled
        n, w = self.opts.clients, self.opts.workers
        for index in range(w):
            ours, theirs = ctx.Pipe()
            inherited = [worker.ctl for worker in self.workers] + [ours]  # so EOF reaches readers
            args = (self.opts, self.target, n // w + (index < n % w), theirs, sent_mm, conn_mm, inherited)
            process = ctx.Process(target=_reader_process, args=args, name=f"bench-reader-{index}", daemon=True)
            process.start()
            theirs.close()
            self.workers.append(_Worker(process, ours))
            self.sel.register(ours.fileno(), selectors.EVENT_READ, self.workers[-1])

    def _reap(self) -> None:
        for worker in self.workers:
            if not worker.gone:
                self.sel.unregister(worker.ctl.fileno())
            worker.ctl.close()
        deadline = time.monotonic() + REAP_TIMEOUT_S
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(REAP_TIMEOUT_S)
        self.sel.close()

    def _pump(self, timeout: float, publisher: _Publisher | None = None) -> None:
        """Wait up to ``timeout`` s for reader reports and publisher responses, and handle them."""
        for key, _ in self.sel.select(timeout):
            if isinstance(key.data, _Worker):
                self._from_worker(key.data)
            else:
                publisher.on_readable(key.data)

    def _wait_for(self, predicate, deadline: float, publisher: _Publisher | None = None) -> bool:
        while not predicate():
            now = time.monotonic()
            if now >= deadline or all(w.gone for w in self.workers):
                return predicate()
            self._pump(min(0.05, deadline - now), publisher)
        return True

    def _from_worker(self, worker: _Worker) -> None:
        try:
            raw = worker.ctl.recv_bytes()
        except (EOFError, OSError):
            worker.gone = True
            self.sel.unregister(worker.ctl.fileno())
            self._set_live(worker, 0)
            return
        if raw[:1] == b"D":
            wdone, active = self.wdone, self.active
            for s in array("q", raw[1:]):
                wdone[s] += 1
                if wdone[s] == active:
                    self.incomplete.discard(s)
                    self.expired.discard(s)
                    self.last_progress = time.monotonic()
            return
        kind, fields = json.loads(raw[1:])
        if kind == "error":
            raise RuntimeError("a reader process failed:\n" + fields["trace"])
        if kind == "ready":
            worker.ready, worker.connected, worker.failures = True, fields["connected"], fields["failures"]
            self._set_live(worker, fields["connected"])
        elif kind == "live":
            self._set_live(worker, fields["live"])
        elif kind == "result":
            worker.result = fields

    def _set_live(self, worker: _Worker, live: int) -> None:
        self.active += (live > 0) - (worker.live > 0)
        worker.live = live

    def _connect_phase(self) -> None:
        opts = self.opts
        self.log(f"connecting {opts.clients} streams from {opts.workers} reader process(es)...")
        start = time.monotonic()
        self._wait_for(lambda: all(w.ready or w.gone for w in self.workers), start + opts.connect_timeout + 5)
        failures: collections.Counter[str] = collections.Counter()
        for worker in self.workers:
            failures.update(worker.failures)
        connected = sum(w.connected for w in self.workers)
        self.fig.update(
            clients=opts.clients, connected=connected, connect_failed=opts.clients - connected,
            connect_failures=dict(failures), connect_s=round(time.monotonic() - start, 3),
        )
        self.log(f"connected {connected}/{opts.clients} in {self.fig['connect_s']:.2f} s"
                 + (f"; failures: {dict(failures)}" if failures else ""))
        if not connected:
            raise ConnectionError(f"no stream connected to {self.target[2]}: {dict(failures) or 'no answer'}")
        self._wait_for(lambda: False, time.monotonic() + opts.settle)  # servers may subscribe after the head

    def _publish_phase(self, publisher: _Publisher, sent) -> tuple[dict, dict]:
        """Publish through warm-up and the window; return the snapshots taken at its two ends."""
        opts = self.opts
        t_start = time.monotonic()
        t0 = t_start + opts.warmup
        t1 = t0 + opts.duration
        for worker in self.workers:
            if not worker.gone:
                worker.ctl.send(("go", t0, t1))
        self.log(f"warm-up {opts.warmup:g} s, then measuring {opts.duration:g} s...")
        start_stats: dict = {}
        while (now := time.monotonic()) < t1:
            if not start_stats and now >= t0:
                start_stats = self._snapshot()
            if opts.rate <= 0:
                self._expire(now, sent)
            self._publish_due(publisher, now, t_start, t0, t1)
            if publisher.non2xx >= REFUSED_POSTS_MAX and not publisher.acked:
                hint = " (does it need --token?)" if {401, 403} & publisher.statuses.keys() else ""
                raise RuntimeError(f"the server refuses to publish: answers {dict(publisher.statuses)}{hint}")
            wake_at = t0 if now < t0 else t1
            if opts.rate > 0 and publisher.free_conn() is not None:
                wake_at = min(wake_at, t_start + publisher.seq / opts.rate)
            self._pump(min(0.01, max(0.0, wake_at - now)), publisher)
        end_stats = self._snapshot()
        w1 = publisher.seq if self.w0 is not None else None
        self.incomplete = {s for s in self.incomplete if self.w0 is not None and s >= self.w0}
        self.fig.update(
            seq_first_window=self.w0, seq_last_window=w1,
            events_total=publisher.seq, published_window=w1 - self.w0 + 1 if self.w0 is not None else 0,
            max_events_hit=publisher.seq + 1 >= opts.max_events,
        )
        return start_stats or end_stats, end_stats

    def _publish_due(self, publisher: _Publisher, now: float, t_start: float, t0: float, t1: float) -> None:
        """Publish what the schedule (--rate) or the window (closed loop) allows now."""
        opts = self.opts
        while publisher.seq + 1 < opts.max_events:
            if opts.rate <= 0:
                if len(self.incomplete) - len(self.expired) >= opts.window:
                    return
                due_at = None
            else:
                due_at = t_start + publisher.seq / opts.rate
                if due_at > now:
                    return
            conn = publisher.free_conn()
            now = time.monotonic()
            if conn is None or now >= t1:
                return
            seq = publisher.publish(conn, now)
            self.incomplete.add(seq)
            if due_at is None:
                self.order.append(seq)
            if now >= t0:
                if self.w0 is None:
                    self.w0 = seq
                if due_at is not None:
                    self.max_lag_s = max(self.max_lag_s, now - due_at)

    def _expire(self, now: float, sent) -> None:
        """Events still not everywhere after ``--window-timeout`` stop holding the window."""
        while self.order:
            s = self.order[0]
            if s in self.incomplete:
                if now - sent[s] < self.opts.window_timeout:
                    return
                self.expired.add(s)
                self.timeouts += 1
            self.order.popleft()

    def _drain_phase(self, publisher: _Publisher) -> None:
        """Wait (bounded) for the window's events to reach every stream, then collect figures."""
        opts = self.opts
        self.log("draining...")
        start = self.last_progress = time.monotonic()
        complete = self._wait_for(
            lambda: not self.incomplete or time.monotonic() - self.last_progress >= opts.drain_idle,
            start + opts.drain,
            publisher,
        ) and not self.incomplete
        self.fig.update(drain_s=round(time.monotonic() - start, 3), drain_complete=complete)
        for worker in self.workers:
            if not worker.gone:
                worker.ctl.send(("stop", self.fig["seq_first_window"], self.fig["seq_last_window"]))
        self._wait_for(lambda: all(w.gone or w.result for w in self.workers),
                       time.monotonic() + RESULT_TIMEOUT_S, publisher)
        if any(w.connected and not w.result for w in self.workers):
            raise RuntimeError("a reader process did not report its figures")

    def _snapshot(self) -> dict:
        stats = {"t": time.monotonic(), "publisher_cpu_s": time.process_time()}
        if self.opts.pid:
            stats.update(_server_stats(self.opts.pid))
        return stats

    def _figures(self, publisher: _Publisher, start: dict, end: dict) -> dict:
        opts, fig = self.opts, self.fig
        results = [w.result for w in self.workers if w.result]
        window_s = end["t"] - start["t"]
        hist = [sum(column) for column in zip(*(r["hist"] for r in results))]
        for key in SUMMED_FIGURES:
            fig[key] = sum(r[key] for r in results)
        lat_n = sum(hist)
        publisher_cpu_s = end["publisher_cpu_s"] - start["publisher_cpu_s"]
        readers_cpu_s = sum(r["cpu_s"] for r in results)
        fig.update(
            workers=opts.workers, pub_conns=opts.pub_conns, pipeline=opts.pipeline, rate=opts.rate,
            window=opts.window, batch_ms=opts.batch_ms, warmup_s=opts.warmup, duration_s=round(window_s, 3),
            publish_rate=round(fig["published_window"] / window_s, 2),
            max_publish_lag_ms=round(self.max_lag_s * 1000, 3),
            deliveries_per_s=round(fig["deliveries_window"] / window_s, 1),
            lat_n=lat_n,
            **{f"lat_p{p}_ms": round(percentile_us(hist, p / 100) / 1000, 3) for p in (50, 90, 99)},
            lat_max_ms=round(max(r["max_us"] for r in results) / 1000, 3),
            lat_mean_ms=round(sum(hist_value(i) * c for i, c in enumerate(hist)) / max(1, lat_n) / 1000, 3),
            pub_sent=publisher.seq, pub_acked=publisher.acked, pub_non2xx=publisher.non2xx,
            pub_statuses={str(k): v for k, v in sorted(publisher.statuses.items())},
            pub_lost=publisher.lost, pub_reconnects=publisher.reconnects, window_timeouts=self.timeouts,
            loader_cpu_s=round(publisher_cpu_s + readers_cpu_s, 3),
            loader_cpu_util=round((publisher_cpu_s + readers_cpu_s) / window_s, 3),
            publisher_cpu_s=round(publisher_cpu_s, 3), readers_cpu_s=round(readers_cpu_s, 3),
        )
        if opts.pid:
            cpu_s = end["server_cpu_s"] - start["server_cpu_s"]
            fig.update(
                server_pid=opts.pid, server_cpu_s=round(cpu_s, 3), server_cpu_util=round(cpu_s / window_s, 3),
                deliveries_per_server_cpu_s=round(fig["deliveries_window"] / cpu_s, 1) if cpu_s > 0 else None,
                server_rss_kb=end["server_rss_kb"], server_hwm_kb=end["server_hwm_kb"],
            )
        return fig


SUMMED_FIGURES = (
    "deliveries_total", "deliveries_window", "missing_total", "clients_missing", "dup_total", "ooo_total",
    "bogus_seq", "parse_errors", "clients_closed_by_server", "clients_live_end",
)


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m monkestream bench",
        description="Load an SSE server on this machine: N event streams, one publisher. Reports "
        "deliveries/s, latency percentiles, missing/duplicated/out-of-order events, and with --pid "
        "the server's CPU seconds and RSS.",
    )
    add = p.add_argument
    add("--host", default="127.0.0.1", help="server address, loopback only (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="server port (default 8000)")
    add("--symbol", default="BENCH", help="ticker to publish and subscribe to (default BENCH)")
    add("--clients", type=int, default=100, metavar="N", help="event streams to open (default 100)")
    add("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), metavar="W",
        help="reader processes the streams are spread over (default: CPUs - 1)")
    add("--rate", type=float, default=0.0, metavar="R",
        help="events/s on a fixed schedule; 0 = closed loop on delivery (default 0)")
    add("--window", type=int, default=64, metavar="E",
        help="closed loop: most events published and not yet at every stream (default 64)")
    add("--window-timeout", type=float, default=2.0, metavar="S",
        help="closed loop: an event not everywhere after S stops holding the window (default 2)")
    add("--duration", type=float, default=10.0, metavar="S", help="measured seconds (default 10)")
    add("--warmup", type=float, default=3.0, metavar="S", help="seconds of publishing before (default 3)")
    add("--drain", type=float, default=10.0, metavar="S", help="most seconds to wait for stragglers (default 10)")
    add("--drain-idle", type=float, default=3.0, metavar="S",
        help="stop waiting after this long without progress (default 3)")
    add("--settle", type=float, default=0.5, metavar="S", help="pause between connecting and "
        "publishing, for servers that subscribe a stream after sending its head (default 0.5)")
    add("--pub-conns", type=int, default=2, metavar="K", help="publisher keep-alive connections (default 2)")
    add("--pipeline", type=int, default=1, metavar="D", help="POSTs in flight per connection (default 1)")
    add("--connect-window", type=int, default=64, metavar="C",
        help="streams waiting for their response head at once (default 64)")
    add("--connect-timeout", type=float, default=15.0, metavar="S", help="seconds to connect (default 15)")
    add("--batch-ms", type=float, metavar="MS", help="readers poll at most once per MS, so one read "
        "takes several events (default 2 in closed loop, 0 with --rate)")
    add("--max-events", type=int, default=2_000_000, metavar="N", help="publish at most N events (default 2M)")
    add("--token", help="send 'Authorization: Bearer TOKEN' with every request")
    add("--pid", type=int, help="server process id: its CPU seconds and RSS over the window")
    add("--json", action="store_true", help="print one JSON line with every figure")
    add("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _check(opts: argparse.Namespace) -> None:
    """Refuse settings that would make a run unbounded or meaningless."""
    bounds = [
        ("--port", opts.port, 1, 65535), ("--clients", opts.clients, 1, 1_000_000),
        ("--workers", opts.workers, 1, 256), ("--rate", opts.rate, 0, 1_000_000),
        ("--window", opts.window, 1, 1_000_000), ("--window-timeout", opts.window_timeout, 0.01, 60),
        ("--duration", opts.duration, 0.1, MAX_DURATION_S), ("--warmup", opts.warmup, 0, MAX_DURATION_S),
        ("--drain", opts.drain, 0, 60), ("--drain-idle", opts.drain_idle, 0.1, 60),
        ("--settle", opts.settle, 0, 60), ("--pub-conns", opts.pub_conns, 1, 64),
        ("--pipeline", opts.pipeline, 1, 1024), ("--connect-window", opts.connect_window, 1, 100_000),
        ("--connect-timeout", opts.connect_timeout, 0.1, 120), ("--batch-ms", opts.batch_ms, 0, 100),
        ("--max-events", opts.max_events, 16, 50_000_000),
    ]
    for flag, value, low, high in bounds:
        if not low <= value <= high:
            raise ConfigError(f"{flag} {value:g} is outside [{low:g}, {high:g}]")
    if not _SYMBOL.fullmatch(opts.symbol):
        raise ConfigError(f"--symbol {opts.symbol!r}: use letters, digits and . _ ~ - only")
    if opts.token is not None and not opts.token.isprintable():
        raise ConfigError("--token must be printable (no line breaks)")
    if opts.pid is not None and not os.path.exists(f"/proc/{opts.pid}/stat"):
        raise ConfigError(f"--pid {opts.pid}: no such process (or no /proc)")


def _summary(f: dict) -> str:
    mode = f"closed loop, window {f['window']}" if f["mode"] == "closed_loop" else f"{f['rate']:g} events/s"
    lines = [
        (f"{f['connected']}/{f['clients']} streams over {f['workers']} reader(s), "
         f"{f['pub_conns']} publisher connection(s), {mode}"),
        (f"window {f['duration_s']:.2f} s: {f['published_window']:,} events ({f['publish_rate']:,.1f}/s), "
         f"{f['deliveries_window']:,} deliveries = {f['deliveries_per_s']:,.0f}/s"),
        (f"latency ms: p50 {f['lat_p50_ms']:.3f}  p90 {f['lat_p90_ms']:.3f}  p99 {f['lat_p99_ms']:.3f}  "
         f"max {f['lat_max_ms']:.3f}  (n={f['lat_n']:,})"),
        (f"missing {f['missing_total']:,} (at {f['clients_missing']} streams), duplicated {f['dup_total']:,}, "
         f"out of order {f['ooo_total']:,}; drain {f['drain_s']:.2f} s, "
         + ("complete" if f["drain_complete"] else "INCOMPLETE")),
    ]
    if f["connect_failed"]:
        lines.append(f"connect failures: {f['connect_failures']}")
    if f["max_events_hit"]:
        lines.append("publishing stopped early: --max-events reached")
    if f["pub_non2xx"] or f["pub_lost"]:
        lines.append(f"publisher: answers {f['pub_statuses']}, {f['pub_lost']} POSTs lost")
    if "server_cpu_s" in f:
        lines.append(
            f"server pid {f['server_pid']}: {f['server_cpu_s']:.2f} CPU s ({f['server_cpu_util']:.0%} of a core), "
            f"RSS {f['server_rss_kb']:,} kB -> {f['deliveries_per_server_cpu_s'] or 0:,.0f} deliveries "
            "per server CPU-second"
        )
    lines.append(f"loader: {f['loader_cpu_s']:.2f} CPU s ({f['loader_cpu_util']:.0%} of a core)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; 0 when it ran, 1 when it could not, 2 for bad options."""
    try:
        opts = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    opts.workers = min(opts.workers, opts.clients)
    if opts.batch_ms is None:
        opts.batch_ms = 2.0 if opts.rate <= 0 else 0.0
    quiet = opts.quiet
    try:
        _check(opts)
        figures = _Run(opts, lambda msg: quiet or print(f"[bench] {msg}", file=sys.stderr, flush=True)).run()
    except ConfigError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(figures) if opts.json else _summary(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
