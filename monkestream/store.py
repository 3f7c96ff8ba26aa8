"""SQLite persistence: ticker history, chat comments, and the record of server runs.

Theory of operation
-------------------
Rule 1: the event loop never touches SQLite. Writes go through one writer
        thread with its own connection; reads go through one reader thread
        with another. WAL mode lets them run side by side.
Rule 2: tickers arrive in windows (``append_tickers``), each written in one
        transaction, so a crash loses at most the window being collected.
Rule 3: each server run has a row in ``runs``, keyed by its epoch (the first
        half of its event ids). Epochs only grow. A run that ends cleanly
        records the last seq it issued; a run without that record crashed,
        and what it published after its last flushed window is unknown.
Rule 4: every query is bounded by a LIMIT; callers never get an unbounded list.
Rule 5: history older than the retention is deleted in small chunks, each its
        own transaction on the writer thread, so windows keep flowing. The
        horizon is recorded (``meta.pruned_before``): a resume from a run that
        started before it is not covered, since its tickers may be gone.
Rule 6: a write the disk or the file system refuses (full, read-only, I/O
        error, cannot open) raises ``Unavailable``; the transaction is rolled
        back whole, and the caller may retry it. ``failing`` says why while
        writes fail; the first failure of an episode is logged in one line,
        and the first write to succeed ends the episode. Temporary files stay
        in memory, so no write needs a new descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .errors import Unavailable
from .sse import EventId
from .ticker import Ticker

log = logging.getLogger("monkestream")

T = TypeVar("T")

HISTORY_LIMIT_MAX = 10000
REPLAY_LIMIT_EVENTS = 10000
COMMENTS_LIMIT_MAX = 500
PRUNE_CHUNK_ROWS = 10000
PRUNE_SYMBOLS_MAX = 1_000_000   # symbols one prune walks (far above any --max-topics)
RUNS_KEPT = 1000                # earlier runs whose ends are known to resumes
ROWS_PER_INSERT = 100     # rows per INSERT statement: 500 variables (600 with their epochs), under even old SQLite's 999
THREAD_NICE = 5           # the SQLite threads' niceness (the loop keeps the process's)
FAILING_RETRY_S = 5       # what a client is told to wait while the database cannot be written
# SQLite's primary result codes for a disk or file system that refuses (Rule 6)
REFUSED_BY_DISK = {3: "SQLITE_PERM", 7: "SQLITE_NOMEM", 8: "SQLITE_READONLY", 10: "SQLITE_IOERR",
                   13: "SQLITE_FULL", 14: "SQLITE_CANTOPEN"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    epoch INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL,
    last_seq INTEGER
);
CREATE TABLE IF NOT EXISTS tickers (
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    symbol TEXT NOT NULL,
    price TEXT NOT NULL,
    currency TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (symbol, epoch, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tickers_by_symbol_time ON tickers (symbol, created_at);
CREATE TABLE IF NOT EXISTS comments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    room TEXT NOT NULL,
    user TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    delete_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS comments_by_room ON comments (room, id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value
);
"""


def _insert_statement(epoch: int, rows: int) -> str:
    """INSERT of ``rows`` tickers of this run: the epoch is written in, a constant, not bound."""
    values = f"({int(epoch)},?,?,?,?,?)"
    return ("INSERT OR IGNORE INTO tickers (epoch, seq, symbol, price, currency, created_at) VALUES "
            + ",".join([values] * rows))


def _logged_insert_statement(rows: int) -> str:
    """INSERT of ``rows`` tickers read from a broker's log, each with its own epoch."""
    return ("INSERT OR IGNORE INTO tickers (epoch, seq, symbol, price, currency, created_at) VALUES "
            + ",".join(["(?,?,?,?,?,?)"] * rows))


def _insert_rows(conn: sqlite3.Connection, statement: Callable[[int], str], width: int, flat: list[Any]) -> None:
    """Insert ``flat`` (``width`` values a row), ROWS_PER_INSERT rows per statement.

    sqlite3 releases the GIL at every step, and on one core each release is a
    thread switch that the event loop pays for: many rows per step, few steps.
    """
    step = ROWS_PER_INSERT * width
    whole = len(flat) - len(flat) % step
    if whole:
        conn.executemany(statement(ROWS_PER_INSERT), (flat[i:i + step] for i in range(0, whole, step)))
    if whole < len(flat):
        conn.executemany(statement(1), (flat[i:i + width] for i in range(whole, len(flat), width)))


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT; on any error the transaction is rolled back whole and the error raised (Rule 6)."""
    conn.execute("BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # a full disk may have rolled it back already, or failed the COMMIT and left it open
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


@dataclass(frozen=True, slots=True)
class StoredTicker:
    """A ticker as read back, with the id it was published under."""

    id: EventId
    ticker: Ticker


@dataclass(frozen=True, slots=True)
class Comment:
    id: int
    room: str
    user: str
    text: str
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "room": self.room, "user": self.user,
                "text": self.text, "createdAt": self.created_at}


def _yield_to_loop() -> None:
    """Lower this thread's scheduling priority, so a big window never delays the event loop.

    On one core the writer and the loop share the CPU; with a higher nice value
    the kernel runs the loop first whenever it has work, and the writer in the
    time left over. Where the platform does not allow it, nothing changes.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), THREAD_NICE)
    except (AttributeError, OSError):
        pass


def _refused_by_disk(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in REFUSED_BY_DISK


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class Store:
    """The database, reached only through its two threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.epoch = 0
        self.flushed_seq = 0          # every ticker of this run up to here is on disk
        self.batches_written = 0
        self.rows_written = 0
        self.flush_seconds_total = 0.0
        self.last_batch_rows = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="monkestream-writer", initializer=_yield_to_loop)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="monkestream-reader", initializer=_yield_to_loop)
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self.clean_runs: dict[int, int | None] = {}  # epoch -> last_seq (None: crashed)
        self.pruned_before = 0        # unix seconds: tickers older than this may be deleted
        self.rows_pruned = 0
        self.failing: str | None = None   # why writes fail, while they do (Rule 6)
        self.write_failures = 0       # episodes of failing writes
        self.log_applied = EventId(0, 0)  # with --broker: the last log id whose tickers are on disk

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)
        except sqlite3.Error as exc:
            if not _refused_by_disk(exc):
                raise
            if self.failing is None:
                self.write_failures += 1
                log.error("database writes failing: %s (%s); retried until they succeed", exc, self.path)
            self.failing = str(exc)
            raise Unavailable(f"the database cannot be written: {exc}", FAILING_RETRY_S) from None
        self.failing = None
        return result

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    # -- life cycle -----------------------------------------------------------

    async def open(self) -> int:
        """Create the schema, start a new run and return its epoch (Unavailable when the file cannot be)."""
        try:
            self.epoch = await asyncio.get_running_loop().run_in_executor(self._writer, self._open_sync)
            self._rconn = await self._read(_connect, self.path)
        except sqlite3.Error as exc:
            raise Unavailable(f"the database cannot be opened: {exc}") from None
        return self.epoch

    def _open_sync(self) -> int:
        conn = self._wconn = _connect(self.path)
        conn.executescript(SCHEMA)
        now_ms = time.time_ns() // 1_000_000
        (last,) = conn.execute("SELECT COALESCE(MAX(epoch), 0) FROM runs").fetchone()
        epoch = max(now_ms, last + 1)
        conn.execute("INSERT INTO runs (epoch, started_at) VALUES (?, ?)", (epoch, time.time()))
        # the latest runs only: a resume from a run older than these is not covered (a reset)
        self.clean_runs = dict(conn.execute("SELECT epoch, last_seq FROM runs WHERE epoch < ? "
                                            "ORDER BY epoch DESC LIMIT ?", (epoch, RUNS_KEPT)))
        row = conn.execute("SELECT value FROM meta WHERE key = 'pruned_before'").fetchone()
        self.pruned_before = int(row[0]) if row else 0
        return epoch

    async def close(self, last_seq: int) -> None:
        """Record a clean end of this run (every ticker is flushed) and close the database."""
        await self._write(self._close_sync, last_seq)
        await self._read(self._close_reader)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    def _close_sync(self, last_seq: int) -> None:
        assert self._wconn is not None
        self._wconn.execute("UPDATE runs SET ended_at = ?, last_seq = ? WHERE epoch = ?",
                            (time.time(), last_seq, self.epoch))
        self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._wconn.close()
        self._wconn = None

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    # -- tickers --------------------------------------------------------------

    async def append_tickers(self, rows: Iterable[tuple[int, Ticker]], count: int, last_seq: int) -> None:
        """Write one window of ``count`` (seq, ticker) rows, up to ``last_seq``, in one transaction.

        ``rows`` may be a generator: it is consumed on the writer thread.
        """
        if not count:
            return
        started = time.perf_counter()
        await self._write(self._append_sync, rows)
        self.flush_seconds_total += time.perf_counter() - started
        self.batches_written += 1
        self.rows_written += count
        self.last_batch_rows = count
        self.flushed_seq = max(self.flushed_seq, last_seq)

    def _append_sync(self, rows: Iterable[tuple[int, Ticker]]) -> None:
        assert self._wconn is not None
        conn = self._wconn
        flat: list[Any] = []
        add = flat.extend
        for seq, ticker in rows:
            add((seq, *ticker))
        with _transaction(conn):
            _insert_rows(conn, lambda n: _insert_statement(self.epoch, n), 5, flat)

    async def history(self, symbol: str, since: int | None, until: int | None, limit: int) -> list[Ticker]:
        """The newest ``limit`` tickers of a symbol in [since, until], oldest first."""
        return await self._read(self._history_sync, symbol, since, until, min(limit, HISTORY_LIMIT_MAX))

    def _history_sync(self, symbol: str, since: int | None, until: int | None, limit: int) -> list[Ticker]:
        assert self._rconn is not None
        rows = self._rconn.execute(
            "SELECT symbol, price, currency, created_at FROM tickers WHERE symbol = ? "
            "AND created_at >= ? AND created_at <= ? ORDER BY created_at DESC, epoch DESC, seq DESC LIMIT ?",
            (symbol, since if since is not None else -1, until if until is not None else 2**62, limit)).fetchall()
        rows.reverse()
        return [Ticker(*row) for row in rows]

    async def latest(self, limit: int) -> list[Ticker]:
        """The last ticker of each symbol (at most ``limit`` symbols)."""
        return await self._read(self._latest_sync, limit)

    def _latest_sync(self, limit: int) -> list[Ticker]:
        assert self._rconn is not None
        conn = self._rconn
        symbols = [row[0] for row in conn.execute("SELECT DISTINCT symbol FROM tickers LIMIT ?", (limit,))]
        return [Ticker(*conn.execute(
            "SELECT symbol, price, currency, created_at FROM tickers WHERE symbol = ? "
            "ORDER BY epoch DESC, seq DESC LIMIT 1", (symbol,)).fetchone()) for symbol in symbols]

    async def chart_seed(self, since: int, bucket_s: int, limit: int) -> list[Ticker]:
        """The first ticker of each symbol in each ``bucket_s``-second bucket since ``since``."""
        return await self._read(self._chart_seed_sync, since, bucket_s, limit)

    def _chart_seed_sync(self, since: int, bucket_s: int, limit: int) -> list[Ticker]:
        assert self._rconn is not None
        # SQLite: with MIN() the bare columns come from the row holding the minimum
        rows = self._rconn.execute(
            "SELECT symbol, price, currency, created_at, MIN(created_at) "
            "FROM tickers WHERE created_at >= ? GROUP BY symbol, created_at / ? "
            "ORDER BY created_at LIMIT ?", (since, bucket_s, limit)).fetchall()
        return [Ticker(*row[:4]) for row in rows]

    def covers(self, after: EventId) -> bool:
        """Whether SQLite holds every ticker published after ``after`` by earlier runs.

        True when ``after``'s run and every run since (but this one) ended cleanly,
        and ``after`` is an id that run issued.
        """
        if after.epoch == self.epoch:
            return True
        if after.epoch < self.pruned_before * 1000:
            return False
        last_seq = self.clean_runs.get(after.epoch)
        if last_seq is None or after.seq > last_seq:
            return False
        return all(seq is not None for epoch, seq in self.clean_runs.items() if epoch > after.epoch)

    def ends_previous_run(self, after: EventId) -> bool:
        """Whether ``after`` is the last id of the run before this one, which ended cleanly.

        Nothing was published between such an id and this run's first event:
        a client that saw a run to its end resumes at the start of the next.
        """
        earlier = max(self.clean_runs, default=None)
        return after.epoch == earlier and self.clean_runs[earlier] == after.seq

    async def replay_many(self, symbols: list[str], after: EventId, limit: int,
                          most: int = REPLAY_LIMIT_EVENTS) -> dict[str, list[StoredTicker] | None]:
        """Per symbol, the first ``limit`` stored tickers after ``after`` in id order.

        None for a symbol with more than ``most`` after it: too far behind to
        replay. One call on the reader thread, however many symbols.
        """
        return await self._read(self._replay_many_sync, symbols, after, limit, most)

    def _replay_many_sync(self, symbols: list[str], after: EventId, limit: int,
                          most: int) -> dict[str, list[StoredTicker] | None]:
        assert self._rconn is not None
        out: dict[str, list[StoredTicker] | None] = {}
        where = "WHERE symbol = ? AND (epoch > ? OR (epoch = ? AND seq > ?))"
        for symbol in symbols:
            key = (symbol, after.epoch, after.epoch, after.seq)
            (count,) = self._rconn.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM tickers {where} LIMIT ?)", (*key, most + 1)).fetchone()
            if count > most:
                out[symbol] = None
                continue
            rows = self._rconn.execute(
                f"SELECT epoch, seq, symbol, price, currency, created_at FROM tickers {where} "
                "ORDER BY epoch, seq LIMIT ?", (*key, limit)).fetchall()
            out[symbol] = [StoredTicker(EventId(r[0], r[1]), Ticker(*r[2:])) for r in rows]
        return out

    async def prune(self, before: int) -> int:
        """Delete tickers created before ``before`` (unix seconds), chunk by chunk; the count deleted."""
        if before > self.pruned_before:
            await self._write(self._set_pruned_before, before)
            self.pruned_before = before
        deleted = 0
        for symbol in await self._read(self._symbols_sync):
            while True:
                count = await self._write(self._prune_chunk_sync, symbol, before)
                deleted += count
                self.rows_pruned += count
                if count < PRUNE_CHUNK_ROWS:
                    break
        return deleted

    def _set_pruned_before(self, before: int) -> None:
        assert self._wconn is not None
        self._wconn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('pruned_before', ?)", (before,))

    def _symbols_sync(self) -> list[str]:
        assert self._rconn is not None
        return [row[0] for row in self._rconn.execute("SELECT DISTINCT symbol FROM tickers LIMIT ?",
                                                      (PRUNE_SYMBOLS_MAX,))]

    def _prune_chunk_sync(self, symbol: str, before: int) -> int:
        assert self._wconn is not None
        cur = self._wconn.execute(
            "DELETE FROM tickers WHERE (symbol, epoch, seq) IN (SELECT symbol, epoch, seq FROM tickers "
            "WHERE symbol = ? AND created_at < ? LIMIT ?)", (symbol, before, PRUNE_CHUNK_ROWS))
        return cur.rowcount

    # -- the broker's log (with --broker) ----------------------------------------

    async def log_state(self) -> dict[str, str]:
        """What this database knows of the broker's log: ``applied``, ``since``, ``marker`` (absent: nothing)."""
        return await self._read(self._log_state_sync)

    def _log_state_sync(self) -> dict[str, str]:
        assert self._rconn is not None
        rows = self._rconn.execute("SELECT key, value FROM meta WHERE key IN ('log_applied', 'log_since', 'log_marker') LIMIT 3")
        return {key[len("log_"):]: str(value) for key, value in rows}

    async def set_log_state(self, **values: str) -> None:
        await self._write(self._set_log_state_sync, values)

    def _set_log_state_sync(self, values: dict[str, str]) -> None:
        assert self._wconn is not None
        self._wconn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                [("log_" + key, value) for key, value in values.items()])

    async def append_logged(self, rows: Iterable[tuple[int, int, Ticker]], count: int, last: EventId) -> None:
        """Write one window of tickers read from the log, each under its log id, and the log position applied.

        One transaction: the position never runs ahead of the rows.
        """
        if not count:
            return
        started = time.perf_counter()
        await self._write(self._append_logged_sync, rows, f"{last.epoch}-{last.seq}")
        self.flush_seconds_total += time.perf_counter() - started
        self.batches_written += 1
        self.rows_written += count
        self.last_batch_rows = count
        self.log_applied = max(self.log_applied, last)

    def _append_logged_sync(self, rows: Iterable[tuple[int, int, Ticker]], last: str) -> None:
        assert self._wconn is not None
        conn = self._wconn
        flat: list[Any] = []
        add = flat.extend
        for epoch, seq, ticker in rows:
            add((epoch, seq, *ticker))
        with _transaction(conn):
            _insert_rows(conn, _logged_insert_statement, 6, flat)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('log_applied', ?)", (last,))

    async def max_comment_id(self) -> int:
        """The largest comment id stored (0 with none)."""
        return await self._read(self._max_comment_id_sync)

    def _max_comment_id_sync(self) -> int:
        assert self._rconn is not None
        return int(self._rconn.execute("SELECT COALESCE(MAX(id), 0) FROM comments").fetchone()[0])

    async def put_comment(self, comment: Comment, delete_key: str) -> None:
        """Store a comment read from the log under its own id (again is a no-op)."""
        await self._write(self._put_comment_sync, comment, delete_key)

    def _put_comment_sync(self, c: Comment, delete_key: str) -> None:
        assert self._wconn is not None
        self._wconn.execute("INSERT OR IGNORE INTO comments (id, room, user, text, created_at, delete_key) "
                            "VALUES (?,?,?,?,?,?)", (c.id, c.room, c.user, c.text, c.created_at, delete_key))

    # -- comments -------------------------------------------------------------

    async def add_comment(self, room: str, user: str, text: str, created_at: int, delete_key: str) -> Comment:
        return await self._write(self._add_comment_sync, room, user, text, created_at, delete_key)

    def _add_comment_sync(self, room: str, user: str, text: str, created_at: int, delete_key: str) -> Comment:
        assert self._wconn is not None
        cur = self._wconn.execute(
            "INSERT INTO comments (room, user, text, created_at, delete_key) VALUES (?,?,?,?,?)",
            (room, user, text, created_at, delete_key))
        return Comment(int(cur.lastrowid or 0), room, user, text, created_at)

    async def comment_key(self, room: str, comment_id: int) -> str | None:
        """The deletion key of a comment, or None if there is no such comment."""
        return await self._read(self._comment_key_sync, room, comment_id)

    def _comment_key_sync(self, room: str, comment_id: int) -> str | None:
        assert self._rconn is not None
        row = self._rconn.execute("SELECT delete_key FROM comments WHERE room = ? AND id = ?",
                                  (room, comment_id)).fetchone()
        return None if row is None else row[0]

    async def delete_comment(self, room: str, comment_id: int) -> bool:
        return await self._write(self._delete_comment_sync, room, comment_id)

    def _delete_comment_sync(self, room: str, comment_id: int) -> bool:
        assert self._wconn is not None
        cur = self._wconn.execute("DELETE FROM comments WHERE room = ? AND id = ?", (room, comment_id))
        return cur.rowcount > 0

    async def comments(self, room: str, limit: int) -> list[Comment]:
        """The newest ``limit`` comments of a room, oldest first."""
        return await self._read(self._comments_sync, room, min(limit, COMMENTS_LIMIT_MAX))

    def _comments_sync(self, room: str, limit: int) -> list[Comment]:
        assert self._rconn is not None
        rows = self._rconn.execute(
            "SELECT id, room, user, text, created_at FROM comments WHERE room = ? ORDER BY id DESC LIMIT ?",
            (room, limit)).fetchall()
        rows.reverse()
        return [Comment(*row) for row in rows]


def integrity_ok(path: str) -> bool:
    """PRAGMA integrity_check on a database file (used by tests and operators)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


__all__: Iterable[str] = ["Store", "StoredTicker", "Comment", "integrity_ok"]
