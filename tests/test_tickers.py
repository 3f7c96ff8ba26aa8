"""The ticker routes' ingest handlers, called as the server calls them: refusals in one place, each answer counted."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import monkestream.tickers
from monkestream.charts import ChartCache
from monkestream.clock import VirtualScheduler
from monkestream.http11 import Request
from monkestream.hub import Hub
from monkestream.ingest import BEHIND_RETRY_S, MAX_UNPERSISTED, TOPICS_RETRY_S, Ingest
from monkestream.routing import Exchange, HTTPError
from monkestream.ticker import Ticker
from monkestream.tickers import TickerRoutes


def post(path: str, body: bytes, symbol: str | None = None) -> Exchange:
    request = Request("POST", path, path, "", "1.1", [("content-type", "application/json")], body, True)
    return Exchange(request, {} if symbol is None else {"symbol": symbol}, "127.0.0.1")


def routes_on(hub: Hub) -> TickerRoutes:
    ingest = Ingest(hub, ChartCache(), flush_interval=1.0)
    return TickerRoutes(ingest, None, ingest.charts, authorize=lambda request: None,  # type: ignore[arg-type]
                        open_stream=None)  # type: ignore[arg-type]


def answer(handler, ex: Exchange) -> tuple[int, dict[str, str], bytes]:
    try:
        response = handler(ex)
    except HTTPError as exc:
        return exc.status, dict(exc.headers), json.dumps({"error": exc.message}).encode()
    return response.status, dict(response.headers), response.body


def test_tickers_rule_1_ingest_refusals_are_answered_in_one_place_and_every_answer_is_counted():
    async def main() -> None:
        routes = routes_on(Hub(epoch=1, scheduler=VirtualScheduler(), limits={"ticker": 1}))
        price = routes.post_price
        assert answer(price, post("/ticker/A/price", b'{"price": 1}', "A"))[0] == 201
        assert answer(price, post("/ticker/A/price", b'{"price": -1}', "A"))[0] == 422  # a bad ticker
        assert answer(price, post("/ticker/A/price", b'{"price": ', "A"))[0] == 400  # a body that is no JSON
        too_many = answer(price, post("/ticker/B/price", b'{"price": 1}', "B"))  # a second symbol, over the budget
        assert too_many[:2] == (503, {"Retry-After": str(TOPICS_RETRY_S)})
        routes.ingest.unpersisted = MAX_UNPERSISTED
        behind = answer(routes.post_tickers, post("/tickers", b'[{"symbol": "A", "price": 2}]'))  # SQLite behind
        assert behind[:2] == (503, {"Retry-After": str(BEHIND_RETRY_S)})
        assert routes.ingest_by_status == {201: 1, 422: 1, 400: 1, 503: 2}

    asyncio.run(main())
    tree = ast.parse(Path(monkestream.tickers.__file__).read_text(encoding="utf-8"))
    callers = {func.name for func in ast.walk(tree) if isinstance(func, ast.FunctionDef)
               for node in ast.walk(func) if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("http_error")}
    assert callers == {"_ingesting"}


def test_tickers_rule_2_a_bulk_publish_checks_capacity_first_and_encodes_each_ticker_once(monkeypatch):
    encoded: list[str] = []
    to_json = Ticker.to_json
    monkeypatch.setattr(Ticker, "to_json", lambda self: encoded.append(self.symbol) or to_json(self))

    async def main() -> None:
        scheduler = VirtualScheduler()
        hub = Hub(epoch=1, scheduler=scheduler)
        routes = routes_on(hub)
        for symbol in "ABC":  # symbols already known: no first-seen announcement to encode
            routes.charts.note_latest(Ticker(symbol, "1", "USD", 1))
        first = routes.ingest.publish([Ticker("A", "1", "USD", 1)])[0]
        await scheduler.advance(10.0)  # and SQLite has not written it: behind
        refused = answer(routes.post_tickers, post("/tickers", b"not JSON at all"))
        assert refused[0] == 503  # the capacity is checked before the body is read
        routes.ingest.written(1, first.seq)
        encoded.clear()
        sub = hub.subscribe("ticker:*")
        status, _, body = answer(routes.post_tickers, post(
            "/tickers", b'[{"symbol": "A", "price": 1.50}, {"symbol": "B", "price": 2}, {"symbol": "C", "price": 3}]'))
        assert status == 201 and encoded == ["A", "B", "C"]
        texts = [event.frame.split(b"\ndata: ")[1].split(b"\n")[0] for event in sub.drain()]
        assert body == b"[" + b",".join(texts) + b"]"  # the same text in the answer and in each event
        assert [t["price"] for t in json.loads(body)] == [1.5, 2, 3]

    asyncio.run(main())

