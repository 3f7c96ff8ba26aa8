"""``python -m monkestream bench``: the options, their bounds, and the summary a person reads."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from ..errors import ConfigError
from .run import Run

_SYMBOL = re.compile(r"[A-Za-z0-9._~-]{1,64}")
MAX_DURATION_S = 600.0
DEFAULT_STREAM_PATH = "/ticker/%s/event"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m monkestream bench",
        description="Load an SSE server on this machine: N event streams, one publisher. Reports "
        "deliveries/s, latency percentiles, missing/duplicated/out-of-order events per stream, and with "
        "--pid the server's CPU seconds and RSS.",
    )
    add = p.add_argument
    add("--host", default="127.0.0.1", help="server address, loopback only (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="server port (default 8000)")
    add("--symbol", default="BENCH", help="ticker to publish and subscribe to (default BENCH)")
    add("--stream-path", default=DEFAULT_STREAM_PATH, metavar="TEMPLATE",
        help="path of each stream, with one %%s for the symbol, e.g. "
        "'/events?topic=ticker:%%s&topic=room:lobby'; only the symbol's price_update events count "
        f"(default {DEFAULT_STREAM_PATH.replace('%', '%%')})")
    add("--clients", type=int, default=100, metavar="N", help="event streams to open (default 100)")
    add("--late-clients", type=int, default=0, metavar="N",
        help="more streams opened while publishing, spread over the first 80%% of the window; each must "
        "get every event after its start position, once and in order (default 0)")
    add("--reconnect", type=int, default=0, metavar="K",
        help="cuts spread over the first 80%% of the window: a stream is closed, then reopened with the "
        "Last-Event-ID of the last frame it read, and must get exactly the events it missed (default 0)")
    add("--reconnect-delay", type=float, default=50.0, metavar="MS",
        help="how long a cut stream stays away before it reconnects (default 50)")
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
        ("--late-clients", opts.late_clients, 0, 100_000), ("--reconnect", opts.reconnect, 0, 1_000_000),
        ("--reconnect-delay", opts.reconnect_delay, 0, 10_000),
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
    path = opts.stream_path
    if (path.count("%s") != 1 or not path.startswith("/") or not path.isascii() or not path.isprintable()
            or " " in path):
        raise ConfigError(f"--stream-path {path!r}: a path starting with /, printable ASCII, no spaces, "
                          "with exactly one %s for the symbol")
    if opts.token is not None and not opts.token.isprintable():
        raise ConfigError("--token must be printable (no line breaks)")
    if opts.pid is not None and not os.path.exists(f"/proc/{opts.pid}/stat"):
        raise ConfigError(f"--pid {opts.pid}: no such process (or no /proc)")


def _flaws(f: dict[str, Any], prefix: str) -> str:
    return f"missing {f[prefix + 'missing']:,}, duplicated {f[prefix + 'dup']:,}, out of order {f[prefix + 'ooo']:,}"


def _summary(f: dict[str, Any]) -> str:
    mode = f"closed loop, window {f['window']}" if f["mode"] == "closed_loop" else f"{f['rate']:g} events/s"
    lines = [
        (f"{f['connected']}/{f['clients']} streams on {f['stream_path'].replace('%s', f['symbol'])} "
         f"over {f['workers']} reader(s), "
         f"{f['pub_conns']} publisher connection(s), {mode}"),
        (f"window {f['duration_s']:.2f} s: {f['published_window']:,} events ({f['publish_rate']:,.1f}/s), "
         f"{f['deliveries_window']:,} deliveries = {f['deliveries_per_s']:,.0f}/s"),
        (f"latency ms: p50 {f['lat_p50_ms']:.3f}  p90 {f['lat_p90_ms']:.3f}  p99 {f['lat_p99_ms']:.3f}  "
         f"max {f['lat_max_ms']:.3f}  (n={f['lat_n']:,})"),
        (f"missing {f['missing_total']:,} (at {f['clients_missing']} streams), duplicated {f['dup_total']:,}, "
         f"out of order {f['ooo_total']:,}; drain {f['drain_s']:.2f} s, "
         + ("complete" if f["drain_complete"] else "INCOMPLETE")),
    ]
    worst = f["worst_stream"]
    lines.append(
        f"per stream: {f['clients_missing']} missed an event, {f['streams_dup']} got one twice, "
        f"{f['streams_ooo']} got one out of order; worst: "
        + (f"{worst['stream']} (missing {worst['missing']:,}, duplicated {worst['dup']:,}, "
           f"out of order {worst['ooo']:,}, cut {worst['cuts']}x)" if worst else "none")
    )
    if f["late_clients"]:
        lines.append(f"late streams: {f['late_connected']}/{f['late_clients']} opened while publishing: "
                     + _flaws(f, "late_") + (f"; failures: {f['late_failures']}" if f["late_failures"] else ""))
    if f["reconnects"]:
        lines.append(f"reconnects: {f['reconnects']} cuts, {f['resumed']} resumed with Last-Event-ID "
                     f"({f['resumed_streams']} streams): " + _flaws(f, "resumed_")
                     + (f"; failures: {f['resume_failures']}" if f["resume_failures"] else ""))
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
        figures = Run(opts, lambda msg: quiet or print(f"[bench] {msg}", file=sys.stderr, flush=True)).run()
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
