"""The ticker API: publishing prices, their history, charts and symbols, and a symbol's stream.

Theory of operation
-------------------
Rule 1: requests are read with ``params`` and prices published with
        ``Ingest``. An ingest handler's domain refusals (a bad ticker, a
        database that is behind, too many symbols) are caught in one place,
        ``_ingesting``, and answered through ``params.http_error``; it also
        counts every ingest answer by status for ``/metrics``.
Rule 2: a bulk publish checks capacity before it parses the body, the costly
        part, and encodes each ticker's JSON once, for its event and the
        answer alike.
"""

from __future__ import annotations

import time
from typing import Callable

from . import params
from .charts import WINDOWS, ChartCache
from .http11 import Request
from .ingest import Ingest, IngestRefused
from .jsontext import array
from .routing import EventStream, Exchange, HTTPError, Response, Router, json_response
from .store import Store
from .ticker import MAX_BULK_TICKERS, InvalidTicker, parse_ticker, parse_tickers, ticker_topic

HISTORY_DEFAULT_LIMIT = 500
HISTORY_MAX_LIMIT = 10_000
MAX_UNIX_S = 2**40
DEFAULT_WINDOW = "5m"


class TickerRoutes:
    """The routes of prices, on the ingest service, the store and the chart cache they are given."""

    def __init__(self, ingest: Ingest, store: Store, charts: ChartCache, *,
                 authorize: Callable[[Request], None],
                 open_stream: Callable[[Exchange, list[str]], EventStream]) -> None:
        self.ingest = ingest
        self.store = store
        self.charts = charts
        self.authorize = authorize        # raises HTTPError 401 unless the request may publish
        self.open_stream = open_stream
        self.ingest_by_status: dict[int, int] = {}

    def register(self, router: Router) -> None:
        add = router.add
        add("GET", "/symbols", self.get_symbols, "every symbol the server knows, with its last ticker")
        add("POST", "/tickers", self.post_tickers,
            f"publish a JSON array of tickers, each with its symbol (up to {MAX_BULK_TICKERS}), all or nothing -> 201")
        add("POST", "/ticker/{symbol}/price", self.post_price,
            'publish {"price","currency"} -> 201 with the ticker')
        add("GET", "/ticker/{symbol}/event", self.events, "the SSE stream of one symbol (price_update events)")
        add("GET", "/ticker/{symbol}/history", self.get_history,
            f"stored tickers, oldest first: ?since=&until= (unix seconds), ?limit= up to {HISTORY_MAX_LIMIT}"
            f" ({HISTORY_DEFAULT_LIMIT})")
        add("GET", "/ticker/{symbol}/chart", self.get_chart,
            f"the chart cache's points: ?window={'|'.join(WINDOWS)} ({DEFAULT_WINDOW})")
        add("GET", "/charts", self.get_charts,
            f"every symbol's chart points in one answer (a relay warms its cache with it): ?window= ({DEFAULT_WINDOW})")

    # -- publishing -------------------------------------------------------------

    def post_price(self, ex: Exchange) -> Response:
        return self._ingesting(self._post_price, ex)

    def post_tickers(self, ex: Exchange) -> Response:
        return self._ingesting(self._post_tickers, ex)

    def _ingesting(self, handler: Callable[[Exchange], Response], ex: Exchange) -> Response:
        """Run an ingest handler: its domain refusals answered as HTTP errors, every answer counted (Rule 1)."""
        try:
            response = handler(ex)
        except (InvalidTicker, IngestRefused) as exc:
            error = params.http_error(exc)
        except HTTPError as exc:
            error = exc
        else:
            self._count(response.status)
            return response
        self._count(error.status)
        raise error from None

    def _count(self, status: int) -> None:
        self.ingest_by_status[status] = self.ingest_by_status.get(status, 0) + 1

    def _post_price(self, ex: Exchange) -> Response:
        self.authorize(ex.request)
        symbol = params.symbol(ex)
        ticker = parse_ticker(params.json_body(ex), symbol)
        text = ticker.to_json()
        self.ingest.publish([ticker], [text])
        return Response(201, text.encode())

    def _post_tickers(self, ex: Exchange) -> Response:
        self.authorize(ex.request)
        self.ingest.check_capacity()  # before the parsing, which costs more than the rest (Rule 2)
        tickers = parse_tickers(params.json_body(ex))
        texts = [t.to_json() for t in tickers]
        self.ingest.publish(tickers, texts)
        return Response(201, array(texts).encode())

    # -- reading ------------------------------------------------------------------

    def events(self, ex: Exchange) -> EventStream:
        return self.open_stream(ex, [ticker_topic(params.symbol(ex))])

    async def get_history(self, ex: Exchange) -> Response:
        symbol = params.symbol(ex)
        query = ex.request.query_params()
        since = params.int_param(query, "since", None, 0, MAX_UNIX_S)
        until = params.int_param(query, "until", None, 0, MAX_UNIX_S)
        limit = params.int_param(query, "limit", HISTORY_DEFAULT_LIMIT, 1, HISTORY_MAX_LIMIT)
        rows = await self.store.history(symbol, since, until, limit or HISTORY_DEFAULT_LIMIT)
        return json_response({"symbol": symbol, "tickers": [t.to_dict() for t in rows]})

    def get_chart(self, ex: Exchange) -> Response:
        symbol = params.symbol(ex)
        window = _window(ex)
        points = self.charts.points(symbol, window, time.time())
        return json_response({"symbol": symbol, "window": window, "points": points})

    def get_charts(self, ex: Exchange) -> Response:
        window = _window(ex)
        now = time.time()
        charts = {symbol: self.charts.points(symbol, window, now) for symbol in sorted(self.charts.series)}
        return json_response({"window": window, "charts": charts})

    def get_symbols(self, ex: Exchange) -> Response:
        latest = sorted(self.charts.latest.values())
        return json_response({"symbols": [t.to_dict() for t in latest]})


def _window(ex: Exchange) -> str:
    window = params.one(ex.request.query_params(), "window")
    if window is None:
        return DEFAULT_WINDOW
    if window not in WINDOWS:
        raise HTTPError(400, f"window: must be one of {', '.join(WINDOWS)}")
    return window
