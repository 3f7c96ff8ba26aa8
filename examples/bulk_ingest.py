"""Bulk ingest throughput: POST /tickers batches as fast as the server takes them.

Starts a server (pinned to CPU 0 when taskset exists), sends BATCHES × 10,000 tickers
over keep-alive connections from CPU 1, then waits until SQLite holds every one. Reports
tickers per second accepted (into the hub), written to SQLite while sending (the
sustained rate), and overall until the last window is in SQLite; checks nothing was lost.

    python3 examples/bulk_ingest.py [--batches 50] [--conns 2]
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


def start_server(db: str) -> tuple[subprocess.Popen[bytes], int]:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    proc = subprocess.Popen([*pin, sys.executable, "-m", "monkestream", "--port", "0", "--no-demo", "--db", db],
                            cwd=ROOT, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    port = int(re.search(r":(\d+) \(loop", line).group(1))  # type: ignore[union-attr]
    return proc, port


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--conns", type=int, default=2)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    tmp = tempfile.mkdtemp()
    db = os.path.join(tmp, "bulk.db")
    proc, port = start_server(db)
    try:
        bodies = [json.dumps([{"symbol": f"S{i % 50}", "price": f"{b + 1}.{i:05d}"} for i in range(BATCH)]).encode()
                  for b in range(args.batches)]
        per_conn = [bodies[i::args.conns] for i in range(args.conns)]
        acked: list[int] = []
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
    return 0 if stored == total else 1


if __name__ == "__main__":
    sys.exit(main())
