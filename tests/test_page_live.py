"""The page live, in Chromium: new symbols announced on the stream, a chat that follows the reader,
and a flood of prices rendered without long tasks or growing memory.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time

import pytest
from helpers import ServerProcess, SSEClient, request
from monkestream.charts import ChartCache
from monkestream.clock import VirtualScheduler
from monkestream.hub import Hub
from monkestream.ingest import SYMBOLS_TOPIC, Ingest
from monkestream.ticker import Ticker
from test_browser import browser, publish, running, server, url, wait  # noqa: F401 - fixtures

SYMBOLS_FETCHES = "return performance.getEntriesByType('resource').filter(e => e.name.includes('/symbols')).length"


def test_ingest_rule_5_a_new_symbol_is_announced_once_before_its_prices():
    hub = Hub(limits={"symbols": 1}, scheduler=VirtualScheduler())
    charts = ChartCache(max_symbols=4)
    charts.note_latest(Ticker("OLD", "1", "USD", 1))        # known from an earlier run (warmed from SQLite)
    ingest = Ingest(hub, charts, flush_interval=1.0)
    ingest.publish([Ticker("EARLY", "1", "USD", 1)])       # no one listens yet: seen, not announced
    assert hub.seq == 1 and "EARLY" in charts.latest
    sub = hub.subscribe(SYMBOLS_TOPIC, "ticker:*")
    ingest.publish([Ticker("NEW", "2", "USD", 2), Ticker("OLD", "3", "USD", 2), Ticker("NEW", "4", "USD", 3)])
    ingest.publish([Ticker("NEW", "5", "USD", 4), Ticker("MORE", "6", "USD", 4), Ticker("LAST", "7", "USD", 4)])
    got = [(e.name, e.data.symbol, e.data.price) for e in sub.drain()]
    assert got[:4] == [("symbol_added", "NEW", "2"), ("price_update", "NEW", "2"), ("price_update", "OLD", "3"),
                       ("price_update", "NEW", "4")]
    # MORE fills the cache (3 symbols); LAST has no room there, so it is never "seen": not announced
    assert [g for g in got if g[0] == "symbol_added"] == [("symbol_added", "NEW", "2"), ("symbol_added", "MORE", "6")]
    sub.close()


def test_a_new_symbol_is_announced_on_the_stream_and_shown_at_once(server, browser):
    publish(server.port, "OLD", "1")
    page = browser(url(server))
    wait(lambda: page.state() == "live", what="the stream")
    wait(lambda: page.qs('.card[data-symbol="OLD"] .chart[data-state=ready]'), what="the first card")
    fetched = page.driver.execute_script(SYMBOLS_FETCHES)
    watcher = SSEClient(server.port, "/events?topic=symbols")

    publish(server.port, "FRESH", "42")
    posted = time.monotonic()
    wait(lambda: page.qs('.card[data-symbol="FRESH"]'), timeout=3, what="the new symbol's card")
    assert time.monotonic() - posted < 2.5
    assert page.attr('.card[data-symbol="FRESH"]', "data-price") == "42"
    watcher.pump(0.3)
    assert [(e.type, json.loads(e.data)["symbol"]) for e in watcher.events] == [("symbol_added", "FRESH")]
    # the page now streams the new symbol's prices, and asked nothing of /symbols for it
    publish(server.port, "FRESH", "43")
    wait(lambda: page.attr('.card[data-symbol="FRESH"]', "data-price") == "43", what="its streamed price")
    publish(server.port, "FRESH", "44")           # a known symbol is not announced again
    wait(lambda: page.attr('.card[data-symbol="FRESH"]', "data-price") == "44", what="its prices")
    # every price came by the stream, the first too: resumed from the announcement, which precedes it
    prices = page.driver.execute_script("return window.monkestream.prices('FRESH').map(e => e.price)")
    assert prices == ["42", "43", "44"]
    watcher.pump(0.3)
    assert len(watcher.events) == 1
    watcher.close()
    time.sleep(0.5)
    assert page.driver.execute_script(SYMBOLS_FETCHES) == fetched
    assert page.errors() == []


@pytest.fixture
def chatty(tmp_path):
    """A server that lets one address post fast."""
    with running(ServerProcess(tmp_path / "chat.db", "--no-demo", "--comment-rate", "1000",
                               "--comment-burst", "1000")) as srv:
        yield srv


def test_chat_follows_a_reader_at_the_bottom_and_marks_new_messages_otherwise(chatty, browser):
    server = chatty
    for i in range(30):
        assert request(server.port, "POST", "/room/lobby/comments", {"user": "bot", "text": f"line {i}"})[0] == 201
    page = browser(url(server))
    wait(lambda: len(page.comments()) == 30, what="the comments")
    at_bottom = "const l = document.getElementById('comments'); return l.scrollHeight - l.scrollTop - l.clientHeight < 2"
    assert page.driver.execute_script("const l = document.getElementById('comments'); return l.scrollHeight > l.clientHeight")
    wait(lambda: page.driver.execute_script(at_bottom), what="the list at its newest")

    request(server.port, "POST", "/room/lobby/comments", {"user": "bot", "text": "while at the bottom"})
    wait(lambda: len(page.comments()) == 31, what="the new comment")
    assert page.driver.execute_script(at_bottom) and not page.q("#new-messages").is_displayed()

    page.driver.execute_script("document.getElementById('comments').scrollTop = 0")   # reading back
    for text in ("one", "two"):
        request(server.port, "POST", "/room/lobby/comments", {"user": "bot", "text": text})
    wait(lambda: len(page.comments()) == 33, what="two more")
    assert page.driver.execute_script("return document.getElementById('comments').scrollTop") == 0
    marker = page.q("#new-messages")
    assert marker.is_displayed() and marker.get_attribute("data-count") == "2"
    marker.click()
    wait(lambda: page.driver.execute_script(at_bottom), what="the jump to the newest")
    assert not marker.is_displayed()
    assert page.driver.execute_script("return document.activeElement.id") == "comments"
    assert page.errors() == []


def test_the_composer_keeps_its_text_across_a_reconnect_and_a_reload(server, browser):
    page = browser(url(server))
    wait(lambda: page.state() == "live", what="the stream")
    page.join("drafter")
    wait(lambda: page.members() == ["drafter"], what="joined")
    page.q("#comment-text").send_keys("half a thought")
    port = server.port
    assert server.stop() == 0
    wait(lambda: page.state() == "reconnecting", what="the page to notice")
    with running(ServerProcess(server.db, *server.args)):
        wait(lambda: page.state() in ("resumed", "live"), timeout=15, what="the page to resume")
        assert page.q("#comment-text").get_attribute("value") == "half a thought"
        page.driver.refresh()
        wait(lambda: page.state() == "live", what="the reloaded page")
        assert page.q("#comment-text").get_attribute("value") == "half a thought"
        page.q("#comment-text").send_keys(", finished", "\n")
        wait(lambda: list(page.comments().values()) == ["half a thought, finished"], what="the post")
        assert page.q("#comment-text").get_attribute("value") == ""
        assert request(port, "GET", "/healthz")[0] == 200
    assert page.errors(network_too=False) == []


FLOOD_SYMBOLS = [f"F{i:02d}" for i in range(20)]
FLOOD_RATE = 1000        # price events a second, across the symbols
FLOOD_S = 10


def flood(port: int, seconds: float, stop: threading.Event, sent: list[int]) -> None:
    """POST /tickers in batches of a tenth of a second's prices, on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    rng = random.Random(7)
    prices = {s: 100.0 for s in FLOOD_SYMBOLS}
    started = time.monotonic()
    tick = 0
    while not stop.is_set() and time.monotonic() - started < seconds:
        batch = []
        for _ in range(FLOOD_RATE // 10 // len(FLOOD_SYMBOLS)):
            for s in FLOOD_SYMBOLS:
                prices[s] = max(1.0, prices[s] * (1 + rng.gauss(0, 0.002)))
                batch.append({"symbol": s, "price": f"{prices[s]:.4f}"})
        conn.request("POST", "/tickers", body=json.dumps(batch), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status == 201:
            sent[0] += len(batch)
            sent[1:] = [batch[-len(FLOOD_SYMBOLS):]]   # the last price of each symbol
        tick += 1
        time.sleep(max(0.0, started + tick * 0.1 - time.monotonic()))
    conn.close()


def heap(page) -> int:
    page.driver.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
    return page.driver.execute_cdp_cmd("Runtime.getHeapUsage", {})["usedSize"]


def test_a_flood_of_prices_stays_smooth_and_memory_stays_flat(server, browser):
    status, _, _ = request(server.port, "POST", "/tickers", [{"symbol": s, "price": "100"} for s in FLOOD_SYMBOLS])
    assert status == 201
    page = browser(url(server))
    wait(lambda: len(page.qs(".card .chart[data-state=ready]")) == 20, what="20 charts")
    stop = threading.Event()
    sent: list = [0, []]
    warmup = threading.Thread(target=flood, args=(server.port, 1.0, stop, sent))
    warmup.start()
    warmup.join()
    time.sleep(0.3)
    before = heap(page)
    stats_before = page.driver.execute_script("return window.monkestream.stats()")
    page.driver.execute_script("""
        window.longTasks = [];
        window.longTaskObserver = new PerformanceObserver(list => {
          for (const e of list.getEntries()) longTasks.push(e.duration);
        });
        longTaskObserver.observe({type: 'longtask'});
    """)
    sent[0] = 0
    worker = threading.Thread(target=flood, args=(server.port, FLOOD_S, stop, sent))
    worker.start()
    worker.join(FLOOD_S + 5)
    stop.set()
    assert sent[0] >= FLOOD_RATE * FLOOD_S * 0.9, sent[0]
    last = {t["symbol"]: t["price"] for t in sent[1]}
    wait(lambda: all(page.attr(f'.card[data-symbol="{s}"]', "data-price") == p.rstrip("0").rstrip(".")
                     for s, p in last.items()), what="the last prices on the cards")
    long_tasks = page.driver.execute_script("longTaskObserver.disconnect(); return longTasks")
    stats = page.driver.execute_script("return window.monkestream.stats()")
    after = heap(page)
    events = stats["events"] - stats_before["events"]
    frames = stats["frames"] - stats_before["frames"]
    assert long_tasks == [] or max(long_tasks) <= 50, long_tasks
    assert events >= sent[0] * 0.5, (events, sent[0])          # the page kept up with the stream
    assert frames <= (FLOOD_S + 2) * 65 and frames * 5 < events  # drawn per frame, not per event
    assert after - before < 1_000_000, (before, after)
    assert page.errors() == []
