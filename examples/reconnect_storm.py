#!/usr/bin/env python3
"""Reconnect storm: N streams come back at once with Last-Event-ID after a server restart.

A restart drops every stream, and every browser comes back within seconds asking
for what it missed. This measures what that costs: how long after the new
server listens the last stream is live again, whether each stream got exactly
the events it missed (none lost, none twice, in order), and how long the
server's event loop stalled meanwhile, seen from outside by a client polling
``GET /healthz`` every 10 ms on its own connection.

    python3 examples/reconnect_storm.py --streams 2000
    python3 examples/reconnect_storm.py                  # 10,000 streams

Steps: start ``python3 -m monkestream --port 0 --db TMP --no-demo``; open the
streams from a few worker processes (the soft RLIMIT_NOFILE is raised to the
hard one); publish ``--events-before`` prices and wait until every stream has
them; stop the server with SIGTERM and start it again on the same port and
database; tell every stream to reconnect at once, with the id of the last frame
it read, while ``--events-after`` prices are published right away (nothing can
be published while the server is down). A stream is live again when its new
response gives its first id (a replayed event or the id-only position frame).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import resource
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monkestream.bench.reader import Target, dial, send_request  # noqa: E402 - after the path is set
from monkestream.bench.wire import StreamScanner  # noqa: E402

RECV_BYTES = 64 * 1024


# ------------------------------------------------------------------ the server


class Server:
    """``python3 -m monkestream`` in a subprocess, its log in a file."""

    def __init__(self, db: Path, extra: list[str]) -> None:
        self.db, self.extra = db, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.runs = 0

    def start(self, port: int, timeout: float = 30.0) -> float:
        """Start on ``port`` (0: any); return the time it said it listens."""
        self.runs += 1
        log_path = self.db.with_suffix(f".log{self.runs}")
        cmd = [sys.executable, "-m", "monkestream", "--port", str(port), "--db", str(self.db), "--no-demo",
               *self.extra]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(rb"listening on https?://[^:]+:(\d+)", log_path.read_bytes())
            if m:
                self.port = int(m.group(1))
                return time.monotonic()
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {log_path.read_text(errors='replace')}")
            time.sleep(0.002)
        raise TimeoutError("the server did not start")

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM; return the time it exited."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic()


def publish(port: int, first: int, count: int, symbol: str, timeout: float) -> tuple[float, int]:
    """POST prices ``first .. first+count-1`` on one keep-alive connection, in order.

    A 503 (the database is behind) is retried, as feeders do. Returns the
    seconds it took and the number of 503s.
    """
    start = time.monotonic()
    deadline = start + timeout
    refused = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        for seq in range(first, first + count):
            while True:
                conn.request("POST", f"/ticker/{symbol}/price", body=json.dumps({"price": seq}),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status == 201:
                    break
                if response.status != 503 or time.monotonic() > deadline:
                    raise RuntimeError(f"publishing {seq}: status {response.status}")
                refused += 1
                time.sleep(0.05)
    finally:
        conn.close()
    return time.monotonic() - start, refused


# ------------------------------------------------------------------ the stall probe


def probe(port: int, interval: float, ctl: Connection) -> None:
    """GET /healthz every ``interval`` s on one connection until told to stop; send back (when, seconds)."""
    samples: list[tuple[float, float]] = []
    failures = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    next_at = time.monotonic()
    while not ctl.poll(max(0.0, next_at - time.monotonic())):
        start = time.monotonic()
        next_at = start + interval
        try:
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            samples.append((start, time.monotonic() - start))
        except (OSError, http.client.HTTPException):
            failures += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()
    ctl.send((samples, failures))


# ------------------------------------------------------------------ the streams


class Stream:
    __slots__ = ("failure", "got", "scanner", "seqs", "sock", "t_conn", "t_first", "t_live")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.scanner = StreamScanner()
        self.seqs: list[int] = []  # the prices received, in order, over every connection
        self.got: set[int] = set()
        self.t_conn = self.t_first = self.t_live = 0.0  # connected, first byte, first id
        self.failure = ""


class Worker:
    """Its share of the streams: open, read, reconnect when told, and account."""

    def __init__(self, port: int, request: bytes, symbol: str, count: int, ctl: Connection) -> None:
        self.request, self.symbol, self.ctl = request, symbol, ctl
        self.target = Target(("127.0.0.1", port), socket.AF_INET, f"127.0.0.1:{port}")
        self.sel = selectors.DefaultSelector()
        self.streams = [Stream() for _ in range(count)]
        self.sel.register(ctl.fileno(), selectors.EVENT_READ, None)

    def run(self, window: int) -> None:
        todo = list(self.streams)
        while True:
            while todo and sum(1 for s in self.streams if s.sock and not s.t_live) < window:
                self._open(todo.pop(), b"")
            for key, mask in self.sel.select(0.05):
                stream = key.data
                if stream is None:
                    if self._command():
                        return
                elif mask & selectors.EVENT_WRITE:
                    self._send(stream)
                else:
                    self._read(stream)

    def _open(self, stream: Stream, last_id: bytes | None) -> None:
        stream.scanner = StreamScanner(self.symbol, last_id)
        stream.t_conn = stream.t_first = stream.t_live = 0.0
        stream.failure = ""
        sock = dial(self.target)
        if isinstance(sock, str):
            stream.failure = sock
            return
        stream.sock = sock
        self.sel.register(sock, selectors.EVENT_WRITE, stream)

    def _send(self, stream: Stream) -> None:
        assert stream.sock is not None
        stream.t_conn = time.monotonic()
        failure = send_request(stream.sock, self.request, stream.scanner.last_id)
        if failure:
            self._drop(stream, failure)
        else:
            self.sel.modify(stream.sock, selectors.EVENT_READ, stream)

    def _read(self, stream: Stream) -> None:
        assert stream.sock is not None
        try:
            data = stream.sock.recv(RECV_BYTES)
        except OSError as exc:
            data, stream.failure = b"", exc.strerror or type(exc).__name__
        now = time.monotonic()
        if data and not stream.t_first:
            stream.t_first = now
        seqs = [seq for seq, _ in stream.scanner.feed(data)]
        stream.seqs += seqs
        stream.got.update(seqs)
        if stream.scanner.first_id is not None and not stream.t_live:
            stream.t_live = now
        if not data or stream.scanner.failure or stream.scanner.ended:
            self._drop(stream, stream.scanner.failure or "")

    def _drop(self, stream: Stream, failure: str) -> None:
        if stream.sock is not None:
            self.sel.unregister(stream.sock)
            stream.sock.close()
            stream.sock = None
        stream.failure = failure or stream.failure

    def _command(self) -> bool:
        command, *args = self.ctl.recv()
        if command == "status":
            live = [s for s in self.streams if s.sock is not None and s.t_live]
            self.ctl.send({"live": len(live), "up": sum(1 for s in self.streams if s.sock is not None),
                           "complete": sum(1 for s in live if len(s.got) >= args[0])})
        elif command == "reconnect":
            for stream in self.streams:
                self._open(stream, stream.scanner.last_id)
        elif command == "report":
            self.ctl.send(self._report(args[0]))
            return True
        return False

    def _report(self, total: int) -> dict[str, Any]:
        expected = set(range(1, total + 1))
        out: dict[str, Any] = {"conn": [], "first": [], "live": [], "missing": [], "dup": [], "ooo": [],
                               "failures": {}}
        for stream in self.streams:
            out["conn"].append(stream.t_conn)
            out["first"].append(stream.t_first)
            out["live"].append(stream.t_live)
            got, had, top, ooo = stream.got, set(), 0, 0
            for seq in stream.seqs:  # a repeat counts as a duplicate only, not also out of order
                ooo += seq < top and seq not in had
                had.add(seq)
                top = max(top, seq)
            out["missing"].append(len(expected - got))
            out["dup"].append(len(stream.seqs) - len(got))
            out["ooo"].append(ooo)
            if stream.failure:
                out["failures"][stream.failure] = out["failures"].get(stream.failure, 0) + 1
            if stream.sock is not None:
                stream.sock.close()
        return out


def worker_process(port: int, request: bytes, symbol: str, count: int, window: int, ctl: Connection) -> None:
    try:
        Worker(port, request, symbol, count, ctl).run(window)
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        pass


# ------------------------------------------------------------------ the storm


class Storm:
    """The run, phase by phase, each with its deadline; then the figures."""

    def __init__(self, opts: argparse.Namespace, tmp: Path) -> None:
        self.opts = opts
        self.server = Server(tmp / "storm.db", shlex.split(opts.server_args))
        self.ctls: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def log(self, message: str) -> None:
        if not self.opts.json:
            print(f"[storm] {message}", file=sys.stderr, flush=True)

    def status(self, total: int) -> dict[str, int]:
        for ctl in self.ctls:
            ctl.send(("status", total))
        replies = [ctl.recv() for ctl in self.ctls]
        return {key: sum(r[key] for r in replies) for key in replies[0]}

    def wait(self, what: str, done: Callable[[dict[str, int]], bool], total: int) -> float:
        deadline = time.monotonic() + self.opts.timeout
        while time.monotonic() < deadline:
            if done(self.status(total)):
                return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"waiting for {what}: {self.status(total)}")

    def run(self) -> dict[str, Any]:
        opts, n = self.opts, self.opts.streams
        before, after = opts.events_before, opts.events_after
        self.server.start(0)
        port = self.server.port
        path = opts.path.replace("%s", opts.symbol)
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n".encode()
        ctx = multiprocessing.get_context("fork")
        for index in range(opts.workers):
            count = n // opts.workers + (index < n % opts.workers)
            ours, theirs = ctx.Pipe()
            window = max(1, opts.connect_window // opts.workers)
            proc = ctx.Process(target=worker_process, args=(port, request, opts.symbol, count, window, theirs),
                               daemon=True)
            proc.start()
            theirs.close()
            self.ctls.append(ours)
            self.procs.append(proc)
        start = time.monotonic()
        self.log(f"opening {n} streams on {path} (port {port}) from {opts.workers} workers...")
        self.wait("every stream live", lambda s: s["live"] == n, 0)
        connect_s = time.monotonic() - start
        publish(port, 1, before, opts.symbol, opts.timeout)
        self.wait(f"every stream to have {before} events", lambda s: s["complete"] == n, before)
        self.log(f"{n} streams live in {connect_s:.2f} s, each with the {before} events; restarting the server")

        t_term = time.monotonic()
        t_gone = self.server.stop()
        self.wait("every stream to see the server go", lambda s: s["up"] == 0, 0)
        t_listen = self.server.start(port)
        ours, theirs = ctx.Pipe()
        prober = ctx.Process(target=probe, args=(port, opts.probe_ms / 1000, theirs), daemon=True)
        prober.start()
        for ctl in self.ctls:
            ctl.send(("reconnect",))
        t_order = time.monotonic()
        publish_s, refused = publish(port, before + 1, after, opts.symbol, opts.timeout)
        total = before + after
        try:
            self.wait("every stream live with every event", lambda s: s["live"] == n and s["complete"] == n, total)
        except TimeoutError as exc:
            self.log(str(exc))
        settled_s = time.monotonic() - t_listen
        time.sleep(opts.probe_ms / 1000 * 5)  # a few more probes after the storm
        ours.send("stop")
        samples, probe_failures = ours.recv()
        prober.join(5)
        for ctl in self.ctls:
            ctl.send(("report", total))
        reports = [ctl.recv() for ctl in self.ctls]
        self.server.stop()
        return self._figures(reports, samples, probe_failures, t_term=t_term, t_gone=t_gone, t_listen=t_listen,
                             t_order=t_order,
                             connect_s=connect_s, publish_s=publish_s, refused=refused, settled_s=settled_s,
                             port=port, path=path)

    def _figures(self, reports: list[dict[str, Any]], samples: list[tuple[float, float]], probe_failures: int,
                 **t: Any) -> dict[str, Any]:
        merged: dict[str, Any] = {key: sum((r[key] for r in reports), []) for key in
                                  ("conn", "first", "live", "missing", "dup", "ooo")}
        failures: dict[str, int] = {}
        for r in reports:
            for reason, count in r["failures"].items():
                failures[reason] = failures.get(reason, 0) + count
        live = sorted(x - t["t_listen"] for x in merged["live"] if x)
        first = sorted(x - t["t_listen"] for x in merged["first"] if x)
        conn = sorted(x - t["t_listen"] for x in merged["conn"] if x)
        waits = sorted(s[1] for s in samples)
        worst = max(samples, key=lambda s: s[1], default=(t["t_listen"], 0.0))
        opts = self.opts
        return {
            "streams": opts.streams, "workers": opts.workers, "path": t["path"], "port": t["port"],
            "events_before": opts.events_before, "events_after": opts.events_after,
            "connect_s": round(t["connect_s"], 3),
            "shutdown_s": round(t["t_gone"] - t["t_term"], 3), "downtime_s": round(t["t_listen"] - t["t_term"], 3),
            "reconnected": len(live), "not_live": opts.streams - len(live),
            "reconnect_ordered_ms": round((t["t_order"] - t["t_listen"]) * 1000, 1),
            "connected_ms": _percentiles(conn), "first_byte_ms": _percentiles(first), "live_ms": _percentiles(live),
            "last_live_s": round(live[-1], 3) if live else None,
            "publish_after_s": round(t["publish_s"], 3), "publish_503s": t["refused"],
            "settled_s": round(t["settled_s"], 3),
            "streams_missing": sum(1 for x in merged["missing"] if x), "missing_total": sum(merged["missing"]),
            "streams_dup": sum(1 for x in merged["dup"] if x), "dup_total": sum(merged["dup"]),
            "streams_ooo": sum(1 for x in merged["ooo"] if x), "ooo_total": sum(merged["ooo"]),
            "exact_streams": sum(1 for flaws in zip(merged["missing"], merged["dup"], merged["ooo"]) if not any(flaws)),
            "stream_failures": failures,
            "probe_interval_ms": opts.probe_ms, "probes": len(samples), "probe_failures": probe_failures,
            "probe_p50_ms": round(_at(waits, 0.5) * 1000, 1), "probe_p99_ms": round(_at(waits, 0.99) * 1000, 1),
            "worst_stall_ms": round(worst[1] * 1000, 1), "worst_stall_at_s": round(worst[0] - t["t_listen"], 3),
        }

    def close(self) -> None:
        for proc in self.procs:
            proc.join(2)
            if proc.is_alive():
                proc.terminate()
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.stop()


def _at(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else 0.0


def _percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{int(q * 100)}": round(_at(values, q) * 1000, 1) for q in (0.5, 0.9, 0.99, 1.0)}


def summary(f: dict[str, Any]) -> str:
    conn, live, first = f["connected_ms"], f["live_ms"], f["first_byte_ms"]
    return "\n".join([
        f"{f['streams']:,} streams on {f['path']} from {f['workers']} workers, connected in {f['connect_s']:.2f} s; "
        f"{f['events_before']} events before the restart, {f['events_after']} right after it",
        f"restart: SIGTERM to exit {f['shutdown_s']:.2f} s, to the new server listening {f['downtime_s']:.2f} s",
        f"storm: {f['reconnected']:,}/{f['streams']:,} live again; after the new server listened (reconnects "
        f"ordered at {f['reconnect_ordered_ms']:.0f} ms): TCP connected "
        f"p50 {conn['p50']:.0f} ms, max {conn['p100']:.0f} ms; first byte p50 {first['p50']:.0f} ms, "
        f"max {first['p100']:.0f} ms; live (position known) p50 {live['p50']:.0f} ms, p99 {live['p99']:.0f} ms, "
        f"last {live['p100']:.0f} ms"
        + (f"; failures {f['stream_failures']}" if f["stream_failures"] else ""),
        f"gap: {f['exact_streams']:,} streams got exactly the events they missed; missing at {f['streams_missing']} "
        f"({f['missing_total']} events), duplicated at {f['streams_dup']} ({f['dup_total']}), "
        f"out of order at {f['streams_ooo']} ({f['ooo_total']}); publishing the {f['events_after']} took "
        f"{f['publish_after_s']:.2f} s" + (f" ({f['publish_503s']} answers 503, retried)" if f["publish_503s"] else "")
        + f", all delivered {f['settled_s']:.2f} s after listening",
        f"event loop: GET /healthz every {f['probe_interval_ms']:g} ms: {f['probes']} answers, p50 "
        f"{f['probe_p50_ms']:.1f} ms, p99 {f['probe_p99_ms']:.1f} ms, worst {f['worst_stall_ms']:.1f} ms "
        f"(at {f['worst_stall_at_s']:.2f} s)" + (f", {f['probe_failures']} failed" if f["probe_failures"] else ""),
    ])


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"reconnect_storm: RLIMIT_NOFILE is {hard}; {needed} descriptors are needed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=10_000, help="streams (default 10000)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="processes holding the streams (default: CPUs, at most 4)")
    p.add_argument("--events-before", type=int, default=20, help="prices before the restart (default 20)")
    p.add_argument("--events-after", type=int, default=20, help="prices right after it (default 20)")
    p.add_argument("--symbol", default="STORM", help="ticker (default STORM)")
    p.add_argument("--path", default="/ticker/%s/event", help="stream path, %%s for the symbol")
    p.add_argument("--connect-window", type=int, default=512,
                   help="streams waiting for a head at once while first connecting (default 512)")
    p.add_argument("--probe-ms", type=float, default=10.0, help="/healthz polling interval (default 10)")
    p.add_argument("--timeout", type=float, default=60.0, help="most seconds for each phase (default 60)")
    p.add_argument("--server-args", default="", help="more server options, e.g. '--retry-ms 1000'")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    opts = p.parse_args()
    if opts.streams < 1 or opts.workers < 1 or opts.events_before < 1 or opts.events_after < 0:
        p.error("--streams, --workers and --events-before must be positive, --events-after not negative")
    opts.workers = min(opts.workers, opts.streams)
    raise_nofile(opts.streams + 256)  # the server, a child of this process, holds them all
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
        storm = Storm(opts, Path(tmp))
        try:
            figures = storm.run()
        finally:
            storm.close()
    print(json.dumps(figures) if opts.json else summary(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
