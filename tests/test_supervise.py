"""Supervised pipelines on virtual time: a crash is logged at once, restarted after its backoff, and loses nothing.

The supervisor's own tests time every restart to the instant. The app's run a
real ``App`` (real SQLite file, real listening socket) on a ``VirtualScheduler``:
windows close and backoffs end only when the test advances time, while SQLite
writes run on the writer thread in real time (``settle`` waits for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from helpers import request
from marbles import marble_test
from monkestream import supervise
from monkestream.app import App
from monkestream.clock import VirtualScheduler
from monkestream.config import Config
from monkestream.demo import DemoFeed
from monkestream.ingest import IngestRefused
from monkestream.supervise import Supervisor
from monkestream.ticker import Ticker


@contextlib.contextmanager
def logged() -> Any:
    """The records the server logs meanwhile."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("monkestream")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- the supervisor ---------------------------------------------------------------------------


@marble_test
async def test_supervise_rule_1_a_pipeline_that_returns_has_finished_and_is_not_run_again(
        scheduler: VirtualScheduler) -> None:
    runs: list[float] = []

    async def pipeline() -> None:
        runs.append(scheduler.now())

    supervisor = Supervisor(scheduler)
    p = supervisor.start("once", pipeline)
    await scheduler.advance(supervise.BACKOFF_MAX_S * 2)
    assert runs == [0.0] and p.state == "finished" and p.restarts == 0 and supervisor.healthy
    await supervisor.stop()


@marble_test
async def test_supervise_rule_3_the_same_function_runs_again_with_what_it_kept(scheduler: VirtualScheduler) -> None:
    held: list[str] = []      # what the pipeline took and has not passed on yet
    passed_on: list[str] = []
    source = iter("abcd")

    async def pipeline() -> None:
        passed_on.extend(held)   # what a crashed run held goes first
        held.clear()
        for item in source:
            held.append(item)
            if item == "b" and "b" not in passed_on and len(passed_on) < 2:
                raise RuntimeError("crashed holding b")
            passed_on.extend(held)
            held.clear()

    supervisor = Supervisor(scheduler)
    with logged():
        supervisor.start("keeper", pipeline)
        await scheduler.advance(supervise.BACKOFF_MIN_S)
    assert passed_on == ["a", "b", "c", "d"] and held == []
    await supervisor.stop()


@marble_test
async def test_supervise_rule_2_a_crash_is_logged_at_once_and_restarted_after_a_doubling_backoff(scheduler: VirtualScheduler) -> None:
    runs: list[float] = []
    done = asyncio.Event()

    async def pipeline() -> None:
        runs.append(scheduler.now())
        if len(runs) <= 3:
            raise RuntimeError(f"crash {len(runs)}")
        await done.wait()

    supervisor = Supervisor(scheduler)
    with logged() as records:
        p = supervisor.start("demo", pipeline)
        await scheduler.advance(0)
        assert runs == [0.0] and p.state == "restarting" and p.restarts == 1
        (record,) = records
        assert record.getMessage() == "pipeline demo failed; restarting it in 0.5 s"
        assert record.exc_info is not None and str(record.exc_info[1]) == "crash 1"
        assert not supervisor.healthy
        await scheduler.advance(0.5 - 1e-6)
        assert runs == [0.0]
        await scheduler.advance(1e-6)                # 0.5 s, then 1 s, then 2 s
        await scheduler.advance(1.0)
        await scheduler.advance(2.0)
        assert runs == [0.0, 0.5, 1.5, 3.5]
        assert [r.getMessage().rpartition(" in ")[2] for r in records] == ["0.5 s", "1 s", "2 s"]
    assert p.state == "running" and p.restarts == 3 and p.last_error == "RuntimeError: crash 3"
    assert supervisor.healthy
    assert p.health() == {"state": "running", "restarts": 3, "lastError": "RuntimeError: crash 3"}
    done.set()
    await supervisor.stop()
    assert p.state == "finished"


@marble_test
async def test_supervise_rule_2_the_backoff_stops_doubling_at_its_cap_and_starts_over_after_a_healthy_run(
        scheduler: VirtualScheduler) -> None:
    runs: list[float] = []
    lasts = iter([0.0] * 8 + [supervise.BACKOFF_RESET_S, 0.0])

    async def pipeline() -> None:
        runs.append(scheduler.now())
        await scheduler.sleep(next(lasts, 0.0))
        if len(runs) <= 10:
            raise RuntimeError("again")

    supervisor = Supervisor(scheduler)
    with logged():
        supervisor.start("flaky", pipeline)
        await scheduler.run_until_idle()
    waits = [b - a for a, b in zip(runs, runs[1:])]
    assert waits[:8] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert waits[8] == supervise.BACKOFF_RESET_S + 0.5   # a run that long was healthy: back to the start
    assert waits[9] == 1.0
    await supervisor.stop()


@marble_test
async def test_supervise_rule_4_stop_ends_a_backoff_at_once_and_gives_up_on_a_pipeline_that_keeps_crashing(
        scheduler: VirtualScheduler) -> None:
    runs: list[float] = []
    source_closed = asyncio.Event()

    async def finishes_when_closed() -> None:
        runs.append(scheduler.now())
        if not source_closed.is_set():
            raise RuntimeError("crash")

    async def always_crashes() -> None:
        raise RuntimeError("broken")

    supervisor = Supervisor(scheduler)
    with logged() as records:
        a = supervisor.start("a", finishes_when_closed)
        b = supervisor.start("b", always_crashes)
        await scheduler.advance(0.1)
        assert a.state == b.state == "restarting"
        source_closed.set()
        await supervisor.stop()     # no time passes: the backoffs end at once
    assert runs == [0.0, 0.1] and a.state == "finished"
    assert b.state == "failed" and b.restarts == supervise.STOP_RETRIES  # once before stop(), twice after
    assert records[-1].getMessage() == "pipeline b failed while stopping; given up"


# -- the app's pipelines --------------------------------------------------------------------


async def settle(scheduler: VirtualScheduler, condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Let real time pass (SQLite's threads) without moving virtual time, until ``condition()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
        await scheduler.advance(0)


@contextlib.asynccontextmanager
async def app_on(scheduler: VirtualScheduler, db: Path, **settings: Any) -> AsyncIterator[App]:
    app = App(Config(port=0, db=str(db), no_demo=True, flush_interval=1.0, **settings), scheduler)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def tick(symbol: str, price: str) -> Ticker:
    return Ticker(symbol, price, "USD", 1_700_000_000)


def stored(db: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT symbol, price FROM tickers ORDER BY seq").fetchall()
    finally:
        conn.close()


async def get(app: App, path: str) -> Any:
    status, _, body = await asyncio.to_thread(request, app.server.port, "GET", path)
    assert status == 200
    return json.loads(body) if path != "/metrics" else body.decode()


def test_app_rule_5_a_crashed_store_pipeline_restarts_and_writes_what_it_held_first(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"

    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        async with app_on(scheduler, db) as app:
            real = app.store.append_tickers
            release = asyncio.Event()
            calls: list[int] = []

            async def crashes_once(rows: Any, count: int, last_seq: int) -> None:
                calls.append(count)
                if len(calls) == 1:
                    await release.wait()           # a write in progress ...
                    raise RuntimeError("the writer broke")
                await real(rows, count, last_seq)
            app.store.append_tickers = crashes_once  # type: ignore[method-assign]
            with logged() as records:
                app.ingest.publish([tick("A", "1")])
                await scheduler.advance(1.0)       # the first window closes: its write starts
                await settle(scheduler, lambda: calls == [1], "the first write")
                app.ingest.publish([tick("B", "2")])   # ... while the next batch is taken
                await scheduler.advance(0.5)
                release.set()
                await settle(scheduler, lambda: app.supervisor.pipelines["persist"].state == "restarting",
                             "the crash")
                (crash,) = [r for r in records if "pipeline persist failed" in r.getMessage()]
                assert crash.exc_info is not None and "the writer broke" in str(crash.exc_info[1])
                health = await get(app, "/healthz")
                assert health["status"] == "degraded"
                assert health["pipelines"]["persist"] == {"state": "restarting", "restarts": 1,
                                                          "lastError": "RuntimeError: the writer broke"}
                assert 'monkestream_pipeline_restarts_total{pipeline="persist"} 1' in await get(app, "/metrics")
                assert 'monkestream_pipeline_up{pipeline="persist"} 0' in await get(app, "/metrics")
                await scheduler.advance(supervise.BACKOFF_MIN_S)   # restarted: A and B, held, written at once
                await settle(scheduler, lambda: calls == [1, 2], "the held batches to be written")
                await settle(scheduler, lambda: app.ingest.unpersisted == 0, "ingest to hear they are written")
                assert len(stored(db)) == 2
                app.ingest.publish([tick("C", "3")])
                await scheduler.advance(1.0)
                await settle(scheduler, lambda: app.ingest.unpersisted == 0, "the next window")
                assert len(stored(db)) == 3
                health = await get(app, "/healthz")
                assert health["status"] == "ok" and health["pipelines"]["persist"]["state"] == "running"
                assert app.ingest.unpersisted == 0
        assert stored(db) == [("A", "1"), ("B", "2"), ("C", "3")]

    run()


def test_a_crashed_chart_pipeline_restarts_and_charts_go_on(tmp_path: Path) -> None:
    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        async with app_on(scheduler, tmp_path / "charts.db") as app:
            real = app.charts.add_point
            crashed: list[Ticker] = []

            def fails_once(ticker: Ticker) -> None:
                if not crashed:
                    crashed.append(ticker)
                    raise ValueError("a bad point")
                real(ticker)
            app.charts.add_point = fails_once  # type: ignore[method-assign]
            with logged() as records:
                app.ingest.publish([tick("X", "1")])
                await settle(scheduler, lambda: app.supervisor.pipelines["charts"].state == "restarting",
                             "the crash")
                assert any("pipeline charts failed" in r.getMessage() and r.exc_info for r in records)
                await scheduler.advance(supervise.BACKOFF_MIN_S)
                assert app.supervisor.pipelines["charts"].state == "running"
                app.ingest.publish([tick("Y", "2")])
                await settle(scheduler, lambda: "Y" in app.charts.series, "a point from the restarted pipeline")
                await scheduler.advance(1.0)

    run()


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


def test_ingest_rule_4_a_failing_database_is_reported_once_refuses_ingest_and_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "full.db"

    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        async with app_on(scheduler, db) as app:
            real = app.store._append_sync
            full = [True]
            attempts: list[int] = []

            def disk(rows: Any) -> None:
                attempts.append(len(list(rows)))
                if full[0]:
                    raise sqlite_error("database or disk is full", 13)
                real(iter([]))  # a write that works
            app.store._append_sync = disk  # type: ignore[method-assign]
            with logged() as records:
                app.ingest.publish([tick("D", "1"), tick("D", "2")])
                await scheduler.advance(1.0)
                await settle(scheduler, lambda: app.store.failing is not None, "the failed write")
                try:
                    app.ingest.publish([tick("D", "3")])
                except IngestRefused as exc:
                    assert str(exc) == "the database cannot be written (database or disk is full); retry later"
                    assert exc.retry_after == 5
                else:
                    raise AssertionError("ingest took a ticker while the database was failing")
                status, headers, body = await asyncio.to_thread(
                    request, app.server.port, "POST", "/ticker/D/price", {"price": "3"})
                assert status == 503 and headers["retry-after"] == "5", body
                health = await get(app, "/healthz")
                assert health["database"] == "failing: database or disk is full"
                assert health["status"] == "degraded"
                while len(attempts) < 5:           # retried every second, reported once
                    await scheduler.advance(1.0)
                    await asyncio.sleep(0.01)
                assert attempts == [2] * len(attempts)   # the same window each time
                metrics = await get(app, "/metrics")
                assert "monkestream_database_failing 1" in metrics
                assert "monkestream_database_write_failures_total 1" in metrics
                full[0] = False
                app.store._append_sync = real  # type: ignore[method-assign]
                for _ in range(100):
                    await scheduler.advance(1.0)
                    await asyncio.sleep(0.01)
                    if app.store.failing is None:
                        break
                assert (await get(app, "/healthz"))["database"] == "ok"
                app.ingest.publish([tick("D", "3")])
                await scheduler.advance(1.0)
                await settle(scheduler, lambda: len(stored(db)) == 3, "the next window")
            failing = [r for r in records if "database writes failing" in r.getMessage()]
            assert len(failing) == 1 and failing[0].exc_info is None
            assert not [r for r in records if r.exc_info]
        assert stored(db) == [("D", "1"), ("D", "2"), ("D", "3")]

    run()


# -- the demo feed --------------------------------------------------------------------------


@marble_test
async def test_the_demo_feed_skips_refusals_and_logs_other_errors_once_per_run_of_failures(
        scheduler: VirtualScheduler) -> None:
    outcomes = iter([None, IngestRefused("behind", 1), RuntimeError("bug"), RuntimeError("bug"), None,
                     RuntimeError("again")])
    published: list[Ticker] = []

    def publish(tickers: list[Ticker]) -> None:
        outcome = next(outcomes, None)
        if outcome is not None:
            raise outcome
        published.extend(tickers)

    feed = DemoFeed(publish, scheduler, lambda: 1_700_000_000, random.Random(7))
    feed.prices = {"DOGE": feed.prices["DOGE"]}
    with logged() as records:
        feed.start()
        for _ in range(6):
            await scheduler.advance(7.0)     # at least one tick each (5 s ± 30%)
        feed.stop()
    assert len(published) >= 2 and feed.failures == 3
    logged_errors = [r for r in records if "the demo feed failed" in r.getMessage()]
    assert [str(r.exc_info[1]) for r in logged_errors if r.exc_info] == ["bug", "again"]
