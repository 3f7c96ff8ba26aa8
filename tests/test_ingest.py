"""Ingest on its own, on virtual time: the one way prices come in, all or none, and within what SQLite keeps up with."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from monkestream.charts import ChartCache
from monkestream.clock import VirtualScheduler
from monkestream.demo import COINS, DemoFeed
from monkestream.errors import MonkestreamError
from monkestream.http11 import Request
from monkestream.hub import Hub
from monkestream.ingest import MAX_UNPERSISTED, MAX_WRITE_LAG_S, Ingest, IngestRefused, TooManyTopics
from monkestream.routing import Exchange, HTTPError
from monkestream.ticker import Ticker, parse_ticker
from monkestream.tickers import TickerRoutes

FLUSH_S = 1.0


def prices(*symbols: str) -> list[Ticker]:
    return [Ticker(symbol, str(i + 1), "USD", 1000) for i, symbol in enumerate(symbols)]


def make_ingest(scheduler: VirtualScheduler, **budgets: int) -> Ingest:
    hub = Hub(epoch=1, scheduler=scheduler, limits=budgets)
    return Ingest(hub, ChartCache(), flush_interval=FLUSH_S, scheduler=scheduler)


def post(path: str, body: bytes, symbol: str | None = None) -> Exchange:
    request = Request("POST", path, path, "", "1.1", [("content-type", "application/json")], body, True)
    return Exchange(request, {} if symbol is None else {"symbol": symbol}, "127.0.0.1")


def test_ingest_rule_1_every_price_from_http_or_the_demo_feed_enters_through_ingest_publish():
    async def main() -> list[tuple[str, str, bool]]:
        scheduler = VirtualScheduler()
        ingest = make_ingest(scheduler)
        hub = ingest.hub
        published: list[tuple[str, str, bool]] = []
        inside = [False]
        hub_publish, ingest_publish = hub.publish, ingest.publish

        def publish_on_the_hub(topic: str, name: str, data: Any, **kwargs: Any):
            published.append((topic, name, inside[0]))
            return hub_publish(topic, name, data, **kwargs)

        def publish_through_ingest(tickers: list[Ticker], texts: list[str] | None = None):
            inside[0] = True
            try:
                return ingest_publish(tickers, texts)
            finally:
                inside[0] = False

        hub.publish, ingest.publish = publish_on_the_hub, publish_through_ingest  # type: ignore[method-assign]
        routes = TickerRoutes(ingest, None, ingest.charts, authorize=lambda request: None,  # type: ignore[arg-type]
                              open_stream=None)  # type: ignore[arg-type]
        assert routes.post_price(post("/ticker/one/price", b'{"price": "1.5"}', "one")).status == 201
        assert routes.post_tickers(post("/tickers", b'[{"symbol": "two", "price": 2}, {"symbol": "one", "price": 3}]'
                                        )).status == 201
        demo = DemoFeed(ingest.publish, scheduler, lambda: 1000.0, random.Random(7))
        demo.start()
        await scheduler.advance(20.0)
        demo.stop()
        return published

    published = asyncio.run(main())
    prices_published = [(topic, inside) for topic, name, inside in published if name == "price_update"]
    assert all(inside and topic.startswith("ticker:") for topic, inside in prices_published)
    assert {topic for topic, _ in prices_published} == {f"ticker:{s}" for s in ("ONE", "TWO", *COINS)}


def test_ingest_rule_2_every_limit_is_checked_before_the_first_ticker_and_refused_as_a_domain_error():
    async def main() -> None:
        ingest = make_ingest(VirtualScheduler(), ticker=2)
        hub = ingest.hub
        ingest.publish(prices("A"))
        before = (hub.seq, sorted(hub.topics), ingest.unpersisted)
        with pytest.raises(TooManyTopics) as too_many:
            ingest.publish(prices("A", "B", "C"))  # B fits the budget of two, C does not: neither is taken
        assert (hub.seq, sorted(hub.topics), ingest.unpersisted) == before
        ingest.unpersisted = MAX_UNPERSISTED - 1
        with pytest.raises(IngestRefused) as behind:
            ingest.publish(prices("A", "A"))
        assert (hub.seq, sorted(hub.topics)) == before[:2]
        for refusal in (too_many.value, behind.value):
            assert isinstance(refusal, MonkestreamError) and not isinstance(refusal, HTTPError)
            assert refusal.retry_after >= 1
        ingest.unpersisted = before[2]
        assert [e.data.symbol for e in ingest.publish(prices("A", "B"))] == ["A", "B"]

    asyncio.run(main())


def test_ingest_rule_3_unwritten_tickers_are_bounded_in_number_and_in_age():
    async def main() -> None:
        scheduler = VirtualScheduler()
        ingest = make_ingest(scheduler)
        ingest.unpersisted = MAX_UNPERSISTED - 2
        ingest.publish(prices("A", "A"))
        with pytest.raises(IngestRefused):
            ingest.publish(prices("A"))  # one more would pass MAX_UNPERSISTED
        ingest.written(MAX_UNPERSISTED, ingest.hub.seq)
        assert ingest.unpersisted == 0
        first = ingest.publish(prices("A"))[0]
        await scheduler.advance(FLUSH_S + MAX_WRITE_LAG_S)
        ingest.publish(prices("A"))  # the oldest unwritten is exactly as old as allowed
        await scheduler.advance(0.01)
        with pytest.raises(IngestRefused):
            ingest.publish(prices("A"))  # now older: the writer lags
        ingest.written(1, first.seq)  # its window is written; the next oldest is young enough
        ingest.publish(prices("A"))
        assert ingest.unpersisted == 2

    asyncio.run(main())


def _validated(ticker: Ticker) -> Ticker:
    return parse_ticker({"price": ticker.price, "currency": ticker.currency}, ticker.symbol, ticker.created_at)


def test_ingest_rule_1_a_price_from_http_comes_in_validated():
    async def main() -> list[Ticker]:
        ingest = make_ingest(VirtualScheduler())
        routes = TickerRoutes(ingest, None, ingest.charts, authorize=lambda request: None,  # type: ignore[arg-type]
                              open_stream=None)  # type: ignore[arg-type]
        sub = ingest.hub.subscribe("ticker:*")
        routes.post_price(post("/ticker/one/price", b'{"price": "00.50", "currency": "eur"}', "one"))
        routes.post_tickers(post("/tickers", b'[{"symbol": "two", "price": 2.500}]'))
        return [e.data for e in sub.drain()]

    tickers = asyncio.run(main())
    assert [(t.symbol, t.price, t.currency) for t in tickers] == [("ONE", "0.5", "EUR"), ("TWO", "2.5", "USD")]
    assert all(_validated(t) == t for t in tickers)


def test_ingest_rule_1_the_demo_feeds_prices_come_in_validated():
    taken: list[Ticker] = []

    async def main() -> None:
        scheduler = VirtualScheduler()
        demo = DemoFeed(taken.extend, scheduler, lambda: 1000.0, random.Random(7))
        demo.start()
        await scheduler.advance(20.0)
        demo.stop()

    asyncio.run(main())
    assert len(taken) > 6
    assert [t for t in taken if _validated(t) != t] == []
