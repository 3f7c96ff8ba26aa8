"""One bench run in the main process: spawn the readers, publish, drain, and gather the figures."""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import multiprocessing
import os
import selectors
import socket
import time
from array import array
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from ..errors import ConfigError
from .publisher import Publisher
from .reader import Share, Target, reader_process
from .shared import Shared
from .wire import hist_value, percentile_us

RESULT_TIMEOUT_S = 10.0
REFUSED_POSTS_MAX = 10  # answers that are not 2xx, with none that is, before giving up
REAP_TIMEOUT_S = 2.0

SUMMED_FIGURES = (
    "deliveries_total", "deliveries_window", "missing_total", "clients_missing", "dup_total", "ooo_total",
    "streams_dup", "streams_ooo", "bogus_seq", "parse_errors", "clients_closed_by_server", "clients_live_end",
    "late_connected", "late_missing", "late_dup", "late_ooo", "reconnects", "resumed", "resumed_streams",
    "resumed_missing", "resumed_dup", "resumed_ooo",
)


def server_stats(pid: int) -> dict[str, float]:
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


def loopback_target(host: str, port: int) -> Target:
    """Resolve ``host``; refuse anything that is not a loopback address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc}") from None
    for *_, address in infos:
        if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            raise ConfigError(f"--host {host}: {address[0]} is not a loopback address (bench loads this machine)")
    address, family = infos[0][4], infos[0][0]
    name = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
    return Target(address, family, f"{name}:{port}")


def shares(total: int, workers: int) -> list[int]:
    """``total`` spread over ``workers`` as evenly as whole numbers allow."""
    return [total // workers + (index < total % workers) for index in range(workers)]


class _Worker:
    """The main process's view of one reader process."""

    def __init__(self, process: BaseProcess, ctl: Connection) -> None:
        self.process, self.ctl = process, ctl
        self.ready = self.gone = False
        self.connected = self.live = 0
        self.failures: dict[str, int] = {}
        self.result: dict[str, Any] | None = None


class Run:
    """One bench run: readers, publisher, the phases and their deadlines, the figures."""

    def __init__(self, opts: argparse.Namespace, log: Callable[[str], object]) -> None:
        self.opts, self.log = opts, log
        self.target = loopback_target(opts.host, opts.port)
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
        self.fig: dict[str, Any] = {"tool": "monkestream-bench",
                                    "mode": "closed_loop" if opts.rate <= 0 else "open_loop"}

    def run(self) -> dict[str, Any]:
        shared = Shared(self.opts.max_events)
        try:
            self._spawn(shared)
            self._connect_phase()
            publisher = Publisher(self.opts, self.target, self.sel, shared)
            try:
                publisher.open()
                stats = self._publish_phase(publisher)
                self._drain_phase(publisher)
                return self._figures(publisher, *stats)
            finally:
                publisher.close()
        finally:
            self._reap()
            shared.close()

    def _spawn(self, shared: Shared) -> None:
        ctx = multiprocessing.get_context("fork")  # the shared maps are inherited, not pickled
        opts, w = self.opts, self.opts.workers
        for index, clients in enumerate(shares(opts.clients, w)):
            ours, theirs = ctx.Pipe()
            inherited = [worker.ctl for worker in self.workers] + [ours]  # so EOF reaches readers
            args = (opts, self.target, Share(index, clients), theirs, shared, inherited)
            process = ctx.Process(target=reader_process, args=args, name=f"bench-reader-{index}", daemon=True)
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

    def _pump(self, timeout: float, publisher: Publisher | None = None) -> None:
        """Wait up to ``timeout`` s for reader reports and publisher responses, and handle them."""
        for key, _ in self.sel.select(timeout):
            if isinstance(key.data, _Worker):
                self._from_worker(key.data)
            elif publisher is not None:
                publisher.on_readable(key.data)

    def _wait_for(self, predicate: Callable[[], bool], deadline: float, publisher: Publisher | None = None) -> bool:
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
        self.log(f"connecting {opts.clients} streams to {opts.stream_path.replace('%s', opts.symbol)} "
                 f"from {opts.workers} reader process(es)...")
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
            raise ConnectionError(f"no stream connected to {self.target.host_header}: "
                                  f"{dict(failures) or 'no answer'}")
        self._wait_for(lambda: False, time.monotonic() + opts.settle)  # servers may subscribe after the head

    def _publish_phase(self, publisher: Publisher) -> tuple[dict[str, float], dict[str, float]]:
        """Publish through warm-up and the window; return the snapshots taken at its two ends."""
        opts = self.opts
        t_start = time.monotonic()
        t0 = t_start + opts.warmup
        t1 = t0 + opts.duration
        for worker in self.workers:
            if not worker.gone:
                worker.ctl.send(("go", t0, t1))
        self.log(f"warm-up {opts.warmup:g} s, then measuring {opts.duration:g} s...")
        start_stats: dict[str, float] = {}
        while (now := time.monotonic()) < t1:
            if not start_stats and now >= t0:
                start_stats = self._snapshot()
            if opts.rate <= 0:
                self._expire(now, publisher.shared.sent)
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

    def _publish_due(self, publisher: Publisher, now: float, t_start: float, t0: float, t1: float) -> None:
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

    def _expire(self, now: float, sent: memoryview) -> None:
        """Events still not everywhere after ``--window-timeout`` stop holding the window."""
        while self.order:
            s = self.order[0]
            if s in self.incomplete:
                if now - sent[s] < self.opts.window_timeout:
                    return
                self.expired.add(s)
                self.timeouts += 1
            self.order.popleft()

    def _drain_phase(self, publisher: Publisher) -> None:
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
                worker.ctl.send(("stop", self.fig["seq_first_window"], self.fig["seq_last_window"], publisher.seq))
        self._wait_for(lambda: all(w.gone or w.result for w in self.workers),
                       time.monotonic() + RESULT_TIMEOUT_S, publisher)
        if any(w.connected and not w.result for w in self.workers):
            raise RuntimeError("a reader process did not report its figures")

    def _snapshot(self) -> dict[str, float]:
        stats = {"t": time.monotonic(), "publisher_cpu_s": time.process_time()}
        if self.opts.pid:
            stats.update(server_stats(self.opts.pid))
        return stats

    def _figures(self, publisher: Publisher, start: dict[str, float], end: dict[str, float]) -> dict[str, Any]:
        opts, fig = self.opts, self.fig
        results = [w.result for w in self.workers if w.result]
        window_s = end["t"] - start["t"]
        hist = [sum(column) for column in zip(*(r["hist"] for r in results))]
        for key in SUMMED_FIGURES:
            fig[key] = sum(r[key] for r in results)
        for key in ("late_failures", "resume_failures"):
            fig[key] = dict(sum((collections.Counter(r[key]) for r in results), collections.Counter()))
        worst = [r["worst_stream"] for r in results if r["worst_stream"]]
        fig["worst_stream"] = max(worst, key=lambda w: w["missing"] + w["dup"] + w["ooo"], default=None)
        lat_n = sum(hist)
        publisher_cpu_s = end["publisher_cpu_s"] - start["publisher_cpu_s"]
        readers_cpu_s = sum(r["cpu_s"] for r in results)
        fig.update(
            symbol=opts.symbol, stream_path=opts.stream_path, late_clients=opts.late_clients,
            reconnect_delay_ms=opts.reconnect_delay,
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
