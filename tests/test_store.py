"""The SQLite store on its own: its two threads, its runs and their epochs, and its bounded queries."""

from __future__ import annotations

import ast
import asyncio
import sqlite3
import threading
from pathlib import Path


import monkestream.store
from monkestream.sse import EventId
from monkestream.store import COMMENTS_LIMIT_MAX, HISTORY_LIMIT_MAX, Store
from monkestream.ticker import Ticker

STORE_SOURCE = Path(monkestream.store.__file__).read_text(encoding="utf-8")


def tickers(count: int, symbols: int = 1, first_seq: int = 1) -> list[tuple[int, Ticker]]:
    return [(seq, Ticker(f"S{seq % symbols}", str(seq), "USD", 1000 + seq))
            for seq in range(first_seq, first_seq + count)]


async def append(store: Store, rows: list[tuple[int, Ticker]]) -> None:
    await store.append_tickers(rows, len(rows), rows[-1][0])


def test_store_rule_1_the_loop_never_touches_sqlite_one_writer_thread_one_reader_thread(tmp_path, monkeypatch):
    calls: list[tuple[str, int, str]] = []

    class Recording(sqlite3.Connection):
        def _note(self, sql: str) -> None:
            calls.append((threading.current_thread().name, id(self), sql.split(None, 1)[0].upper()))

        def execute(self, sql, *args):  # type: ignore[override]
            self._note(sql)
            return super().execute(sql, *args)

        def executemany(self, sql, *args):  # type: ignore[override]
            self._note(sql)
            return super().executemany(sql, *args)

        def executescript(self, sql):  # type: ignore[override]
            self._note(sql)
            return super().executescript(sql)

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: connect(*args, factory=Recording, **kwargs))

    async def main() -> None:
        store = Store(str(tmp_path / "threads.db"))
        await store.open()
        await append(store, tickers(300, symbols=3))
        await store.history("S1", None, None, 10)
        await store.latest(10)
        await store.chart_seed(0, 5, 10)
        await store.replay_many(["S1", "S2"], EventId(store.epoch, 0), 10)
        comment = await store.add_comment("r", "u", "text", 1, "hash")
        await store.comment_key("r", comment.id)
        await store.comments("r", 10)
        await store.delete_comment("r", comment.id)
        await store.prune(1100)
        await store.close(300)

    asyncio.run(main())
    monkeypatch.undo()
    threads = {name.rpartition("_")[0] for name, _, _ in calls}
    assert threads == {"monkestream-writer", "monkestream-reader"}  # never the loop's (MainThread)
    writer = {conn for name, conn, _ in calls if name.startswith("monkestream-writer")}
    reader = {conn for name, conn, _ in calls if name.startswith("monkestream-reader")}
    assert len(writer) == len(reader) == 1 and writer != reader
    read_verbs = {verb for name, _, verb in calls if name.startswith("monkestream-reader")}
    assert read_verbs == {"PRAGMA", "SELECT"}
    write_verbs = {verb for name, _, verb in calls if name.startswith("monkestream-writer")}
    assert {"INSERT", "DELETE", "UPDATE", "BEGIN", "COMMIT"} <= write_verbs
    conn = sqlite3.connect(tmp_path / "threads.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


def test_store_rule_3_epochs_only_grow_and_only_a_clean_end_records_the_last_seq(tmp_path, monkeypatch):
    db = str(tmp_path / "runs.db")
    now_ns = [1_900_000_000_000 * 1_000_000]
    monkeypatch.setattr(monkestream.store.time, "time_ns", lambda: now_ns[0])

    async def main() -> list[int]:
        first = Store(db)
        one = await first.open()
        await append(first, tickers(41))
        await first.close(41)
        now_ns[0] -= 3600 * 10**9  # the clock went back an hour
        crashed = Store(db)
        two = await crashed.open()
        assert two == one + 1
        assert crashed.clean_runs == {one: 41}
        assert crashed.covers(EventId(one, 30)) and not crashed.covers(EventId(one, 42))  # 42 was never issued
        await append(crashed, tickers(5))
        for executor, conn in ((crashed._writer, crashed._wconn), (crashed._reader, crashed._rconn)):
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)  # gone, without close()
            executor.shutdown()
        third = Store(db)
        three = await third.open()
        assert three > two > one
        assert third.clean_runs == {one: 41, two: None}
        assert not third.covers(EventId(one, 30))  # the crashed run's tickers after its last window are unknown
        assert not third.covers(EventId(two, 5))
        assert third.covers(EventId(three, 0))
        await third.close(0)
        return [one, two, three]

    epochs = asyncio.run(main())
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT epoch, last_seq FROM runs ORDER BY epoch").fetchall() == list(
            zip(epochs, [41, None, 0]))
    finally:
        conn.close()


def test_store_rule_4_no_caller_gets_an_unbounded_list(tmp_path):
    async def main() -> None:
        store = Store(str(tmp_path / "bounded.db"))
        await store.open()
        await append(store, tickers(HISTORY_LIMIT_MAX + 50, symbols=1))
        await append(store, tickers(20, symbols=5, first_seq=HISTORY_LIMIT_MAX + 51))
        for i in range(COMMENTS_LIMIT_MAX + 5):
            await store.add_comment("r", "u", f"c{i}", i, "hash")
        assert len(await store.history("S0", None, None, 10**9)) == HISTORY_LIMIT_MAX
        assert len(await store.comments("r", 10**9)) == COMMENTS_LIMIT_MAX
        assert len(await store.latest(3)) == 3
        assert len(await store.chart_seed(0, 1, 7)) == 7
        start = EventId(store.epoch, 0)
        assert [len(rows) for rows in (await store.replay_many(["S1", "S2"], start, 3)).values()] == [3, 3]
        assert await store.replay_many(["S0"], start, 5, most=100) == {"S0": None}  # too far behind to replay
        await store.close(0)

    asyncio.run(main())


def _unbounded_selects(source: str) -> list[str]:
    """SELECTs run without a LIMIT whose rows are not read with fetchone()."""
    tree = ast.parse(source)
    fetched_one = {id(node.func.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and isinstance(node.func, ast.Attribute) and node.func.attr == "fetchone"}
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany") and node.args and id(node) not in fetched_one):
            sql = " ".join(part.value for part in ast.walk(node.args[0])
                           if isinstance(part, ast.Constant) and isinstance(part.value, str))
            if sql.lstrip().upper().startswith("SELECT") and "LIMIT" not in sql.upper():
                found.append(sql)
    return found


def test_store_rule_4_every_query_is_bounded_by_a_limit():
    assert _unbounded_selects('c.execute("SELECT a FROM t LIMIT ?", (1,))\nc.execute("SELECT a FROM t").fetchone()') == []
    assert _unbounded_selects('rows = list(c.execute("SELECT a FROM t"))') == ["SELECT a FROM t"]
    assert _unbounded_selects(STORE_SOURCE) == []
