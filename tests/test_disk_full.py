"""A database on a tiny file system: full, then freed, losing nothing acknowledged; read-only, refusing to start.

The tests mount a size-limited tmpfs (they run as root here and in CI) and
start the real server on it. Where mounting is not permitted they are skipped,
saying so. (While the server runs, its database and WAL files are open, so a
directory turning read-only stops no write; the file system refusing them,
full or remounted read-only by the kernel, is the failure that can happen.)
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import ServerProcess, healthz, request

FS_SIZE = "4m"
BULK = 10_000          # tickers per POST: a window larger than any WAL the database had so far


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {FS_SIZE} tmpfs here ({done.stderr.strip() or 'not root'}); "
                    "these tests run as root in CI")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system has no room left; return it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 4096, 512):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def remount(directory: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(directory)], check=True)


def post(port: int, tickers: list[dict[str, Any]]) -> tuple[int, dict[str, str], Any]:
    status, headers, body = request(port, "POST", "/tickers", tickers, timeout=10)
    return status, headers, json.loads(body, parse_float=str, parse_int=str)   # prices as sent: exact text


def batch(symbol: str, first: int, count: int) -> list[dict[str, Any]]:
    return [{"symbol": symbol, "price": f"{first + i}.5"} for i in range(count)]


def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def stored(db: Path) -> set[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        return set(conn.execute("SELECT symbol, price FROM tickers"))
    finally:
        conn.close()


def acked(tickers: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(t["symbol"], t["price"]) for t in tickers}


def refused_until_recovered(port: int, symbol: str, failing: str) -> None:
    """Ingest answers 503 while the database is failing, and /healthz says why."""
    wait_for(lambda: healthz(port)["database"].startswith("failing: "), "/healthz to report the failure")
    health = healthz(port)
    assert failing in health["database"] and health["status"] == "degraded"
    status, headers, body = post(port, batch(symbol, 0, 1))
    assert status == 503 and headers["retry-after"] == "5"
    assert body["error"].startswith("the database cannot be written"), body


def test_store_rule_6_a_full_disk_refuses_ingest_until_freed_and_loses_nothing_acknowledged(tiny_fs):
    db = tiny_fs / "full.db"
    accepted: list[dict[str, Any]] = []
    with ServerProcess(db, "--no-demo", "--flush-interval", "0.2") as srv:
        status, _, body = post(srv.port, batch("PRE", 0, 100))
        assert status == 201
        accepted += body
        wait_for(lambda: healthz(srv.port)["unpersisted"] == 0, "the first window")
        filler = fill(tiny_fs)
        status, _, body = post(srv.port, batch("BIG", 0, BULK))   # taken: its window will not fit
        assert status == 201
        accepted += body
        refused_until_recovered(srv.port, "LATE", "database or disk is full")
        time.sleep(2.5)                                           # a few retries, one report
        filler.unlink()
        wait_for(lambda: healthz(srv.port)["database"] == "ok", "the retried window to be written")
        assert healthz(srv.port)["status"] == "ok"
        status, _, body = post(srv.port, batch("AFTER", 0, 100))
        assert status == 201
        accepted += body
        wait_for(lambda: healthz(srv.port)["unpersisted"] == 0, "the last window")
        status, _, metrics = request(srv.port, "GET", "/metrics")
        assert b"monkestream_database_write_failures_total 1\n" in metrics
        assert b"monkestream_database_failing 0\n" in metrics
    log = srv.read_log()
    failing = [line for line in log.splitlines() if "database writes failing" in line]
    assert len(failing) == 1 and "database or disk is full" in failing[0], log
    assert "Traceback" not in log, log
    assert stored(db) == acked(accepted)
    assert len(stored(db)) == 100 + BULK + 100


def test_store_rule_6_a_database_that_cannot_be_opened_stops_start_up_in_one_line(tiny_fs):
    remount(tiny_fs, "ro")
    srv = ServerProcess(tiny_fs / "nowhere.db", "--no-demo")
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start()
    assert srv.proc is not None and srv.proc.wait(5) == 1
    log = srv.read_log()
    srv.proc.stdout.close()  # type: ignore[union-attr]
    assert f"the database cannot be opened: unable to open database file ({srv.db}); exiting" in log, log
    assert sum("database" in line for line in log.splitlines()) == 1 and "Traceback" not in log, log
    assert os.listdir(tiny_fs) == []
