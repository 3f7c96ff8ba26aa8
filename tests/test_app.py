"""The application: what it wires together, on which clock, and the order it stops in."""

from __future__ import annotations

import ast
import asyncio
import sqlite3
from pathlib import Path

from helpers import AppThread, SSEClient, request
from monkestream import app as app_module
from monkestream.app import App
from monkestream.clock import VirtualScheduler
from monkestream.config import Config
from monkestream.ticker import Ticker

APP_SOURCE = Path(app_module.__file__).read_text(encoding="utf-8")
ROUTE_MODULES = {f"monkestream.{name}" for name in ("tickers", "chat", "streams", "static", "metrics")}


def test_app_rule_1_the_app_answers_no_request_its_routes_live_with_their_concepts(tmp_path):
    app = App(Config(port=0, db=str(tmp_path / "wired.db"), no_demo=True))
    handlers = [handler for _, methods in app.router._routes for handler in methods.values()]
    assert len(handlers) >= 10
    assert {handler.__module__ for handler in handlers} == ROUTE_MODULES
    assert app.server.router is app.router and app.tickers.ingest is app.ingest
    tree = ast.parse(APP_SOURCE)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    assert not [ast.unparse(c) for c in calls if c.func.attr in ("add", "describe")
                and "router" in ast.unparse(c.func.value)]  # it registers no route of its own
    annotated = [arg.annotation for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for arg in node.args.args if arg.annotation is not None]
    assert "Exchange" not in {ast.unparse(a) for a in annotated}  # and takes no request
    demo = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and ast.unparse(c.func) == "DemoFeed"]
    assert [ast.unparse(c.args[0]) for c in demo] == ["app.ingest.publish"]  # the demo's prices come in through ingest


def test_app_rule_2_the_store_pipeline_windows_on_the_apps_clock(tmp_path):
    async def main() -> None:
        scheduler = VirtualScheduler()
        app = App(Config(port=0, db=str(tmp_path / "clock.db"), no_demo=True, flush_interval=5.0), scheduler)
        assert app.chat.limiter._scheduler is scheduler
        await app.start()
        try:
            app.ingest.publish([Ticker("CLK", "1.5", "USD", 1)])
            await scheduler.advance(4.9)
            assert app.store.batches_written == 0  # the window is still open on virtual time
            await scheduler.advance(0.2)  # it closes: written on the writer thread
            for _ in range(500):
                if app.store.batches_written:
                    break
                await asyncio.sleep(0.01)
            assert app.store.batches_written == 1 and app.ingest.unpersisted == 0
        finally:
            await app.stop()

    asyncio.run(main())


def test_app_rule_4_shutdown_stops_accepting_ends_streams_writes_the_last_window_then_records_the_end(tmp_path):
    db = tmp_path / "stop.db"
    steps: list[tuple] = []
    with AppThread(db, flush_interval=30) as s:  # a window this long is still open at shutdown
        app = s.app
        with SSEClient(s.port, "/ticker/END/event") as client:
            for price in ("1", "2", "3"):
                assert request(s.port, "POST", "/ticker/END/price", {"price": price})[0] == 201
            assert len(client.wait_for(3)) == 3
            close_all, append, close = app.hub.close_all_streams, app.store.append_tickers, app.store.close

            def ending_streams(*args):
                steps.append(("streams end", app.server.accepting))
                return close_all(*args)

            async def writing(*args):
                steps.append(("window written", app.hub.stream_count, all(sub.closed for sub in app._subs)))
                return await append(*args)

            async def closing(last_seq):
                steps.append(("database closed", last_seq == app.hub.seq, app.store.batches_written))
                return await close(last_seq)

            def wrap() -> None:
                app.hub.close_all_streams, app.store.append_tickers, app.store.close = ending_streams, writing, closing
            s.call(wrap)
    assert steps == [("streams end", False), ("window written", 0, True), ("database closed", True, 1)]
    last_seq = s.app.hub.seq
    conn = sqlite3.connect(db)
    try:
        assert [row[0] for row in conn.execute("SELECT price FROM tickers ORDER BY seq")] == ["1", "2", "3"]
        assert conn.execute("SELECT last_seq FROM runs").fetchall() == [(last_seq,)]
    finally:
        conn.close()
