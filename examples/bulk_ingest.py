"""Bulk ingest throughput: POST /tickers batches as fast as the server takes them.

Starts a server (pinned to CPU 0 when taskset exists), sends BATCHES × 10,000 tickers
over keep-alive connections from CPU 1, then waits until SQLite holds every one. Reports
tickers per second accepted (into the hub), written to SQLite while sending (the
sustained rate), and overall until the last window is in SQLite; checks nothing was lost.
On Linux it also reports the server's CPU time per ticker, split between the SQLite
threads and the rest (the event loop), a figure the machine's noise moves less.

    python3 examples/bulk_ingest.py [--batches 50] [--conns 2] [--checkout DIR] [--broker redis://...]

With --broker the server appends every batch to that Redis log and writes SQLite from
what it reads back: "accepted" is then "in the log", and the rest is end to end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 10_000


def start_server(db: str, checkout: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    proc = subprocess.Popen([*pin, sys.executable, "-m", "monkestream", "--port", "0", "--no-demo", "--db", db, *extra],
                            cwd=checkout, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    while True:  # notices about limits may come first
        line = proc.stderr.readline().decode()
        if not line:
            raise RuntimeError("the server exited before listening")
        found = re.search(r":(\d+) \(loop", line)
        if found:
            return proc, int(found.group(1))


def sender(port: int, bodies: list[bytes], acked: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for body in bodies:
        while True:
            conn.request("POST", "/tickers", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 201:
                acked.append(BATCH)
                break
            if resp.status != 503:
                raise RuntimeError(f"unexpected status {resp.status}")
            time.sleep(0.05)  # the database is behind: back off, as a feeder should
    conn.close()


def rows_written(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return int(re.search(r"^monkestream_sqlite_rows_total (\d+)", text, re.M).group(1))  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by ``pid``: its SQLite threads (the ones
    with a raised nice value) and the rest (the event loop)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {"sqlite": 0.0, "loop": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        kind = "sqlite" if int(fields[16]) > 0 else "loop"
        out[kind] += (int(fields[11]) + int(fields[12])) / ticks
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--conns", type=int, default=2)
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="run the server from this checkout (to compare two versions side by side)")
    parser.add_argument("--broker", default="", help="run the server as a node on this Redis log")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    tmp = tempfile.mkdtemp()
    db = os.path.join(tmp, "bulk.db")
    proc, port = start_server(db, args.checkout, ["--broker", args.broker] if args.broker else [])
    try:
        bodies = [json.dumps([{"symbol": f"S{i % 50}", "price": f"{b + 1}.{i:05d}"} for i in range(BATCH)]).encode()
                  for b in range(args.batches)]
        per_conn = [bodies[i::args.conns] for i in range(args.conns)]
        acked: list[int] = []
        cpu_before = cpu_seconds(proc.pid) if os.path.isdir("/proc") else {}
        started = time.perf_counter()
        threads = [threading.Thread(target=sender, args=(port, part, acked)) for part in per_conn]
        for t in threads:
            t.start()
        time.sleep(2)  # past the first windows: from here on the writer runs steadily
        steady_from, steady_rows = time.perf_counter(), rows_written(port)
        for t in threads:
            t.join()
        accepted_s = time.perf_counter() - started
        steady = (rows_written(port) - steady_rows) / (time.perf_counter() - steady_from)
        total = sum(acked)
        while rows_written(port) < total:
            if time.perf_counter() - started > 300:
                raise RuntimeError("SQLite did not catch up")
            time.sleep(0.02)
        persisted_s = time.perf_counter() - started
        cpu_after = cpu_seconds(proc.pid) if cpu_before else {}
    finally:
        proc.terminate()
        proc.wait(30)
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT COUNT(*) FROM tickers").fetchone()[0]
    conn.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{total} tickers: accepted at {total / accepted_s:,.0f}/s, written to SQLite at {steady:,.0f}/s "
          f"while sending, all in SQLite at {total / persisted_s:,.0f}/s (last window included); "
          f"stored {stored}, lost {total - stored}")
    if cpu_after:
        sqlite_s, loop_s = (cpu_after[kind] - cpu_before[kind] for kind in ("sqlite", "loop"))
        print(f"server CPU per ticker: {(sqlite_s + loop_s) / total * 1e6:.2f} us "
              f"(SQLite threads {sqlite_s / total * 1e6:.2f} us, event loop {loop_s / total * 1e6:.2f} us)")
    return 0 if stored == total else 1


if __name__ == "__main__":
    sys.exit(main())
