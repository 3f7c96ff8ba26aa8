"""Ingest: the one way prices come in, published on the hub within what SQLite can keep up with.

Theory of operation
-------------------
Rule 1: every price, from HTTP or from the demo feed, enters through
        ``Ingest.publish``: validated already (``ticker.parse_ticker``),
        published on ``ticker:SYMBOL`` and nothing else. The store and the
        chart cache are subscribers like any other.
Rule 2: all or none. ``publish`` checks every limit before it publishes the
        first ticker, and refuses with a domain error, never an HTTP one:
        ``IngestRefused`` while SQLite is behind, ``TooManyTopics`` when the new
        symbols would pass the hub's budget of ticker topics (``Hub.reserve``). The routes translate them.
Rule 3: ingest refuses rather than let unwritten tickers grow past
        ``MAX_UNPERSISTED``, so memory stays bounded and nothing accepted is
        lost. It also refuses while the oldest unwritten ticker is older than
        the flush interval plus ``MAX_WRITE_LAG_S``, so a crash loses about one
        window, not whatever a lagging writer had queued. The store pipeline
        reports each window it wrote with ``written()``.
Rule 4: while the database cannot be written (``database_failing()`` says
        why) and tickers wait for it, ingest refuses outright, for
        ``FAILING_RETRY_S``. With nothing waiting it takes the next batch,
        whose write tells whether the database has recovered.
Rule 5: a symbol seen for the first time (one the chart cache has no latest
        ticker of, and has room for: neither an earlier run's, warmed from
        SQLite, nor this run's) is announced once on ``SYMBOLS_TOPIC`` as a
        ``symbol_added`` event carrying its first ticker, published just
        before that symbol's prices, so a page that then subscribes from the
        announcement's id gets every one of them. It is announced while the
        topic exists (a stream holds it, or its ring holds announcements):
        with no one to tell, no id is spent. Its kind, ``symbols``, is that
        one topic.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from .charts import ChartCache
from .clock import Scheduler
from .errors import MonkestreamError
from .hub import Event, Hub, TopicLimit
from .ticker import Ticker, ticker_topic

MAX_UNPERSISTED = 500_000        # tickers accepted but not yet in SQLite
MAX_WRITE_LAG_S = 0.5            # beyond the flush interval, how far the writer may fall behind
BEHIND_RETRY_S = 1               # what a feeder is told to wait while SQLite catches up
TOPICS_RETRY_S = 60              # ... and when the hub holds too many topics
FAILING_RETRY_S = 5              # ... and while the database cannot be written
SYMBOLS_TOPIC = "symbols"        # where new symbols are announced (Rule 5); its kind has this one topic


class IngestRefused(MonkestreamError):
    """Tickers cannot be taken now; a feeder may try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyTopics(IngestRefused):
    """A new symbol would pass the hub's topic limit."""


class Ingest:
    """Publishes validated tickers on the hub and counts those SQLite does not hold yet."""

    def __init__(self, hub: Hub, charts: ChartCache, *, flush_interval: float,
                 scheduler: Scheduler | None = None,
                 database_failing: Callable[[], str | None] = lambda: None) -> None:
        self.hub = hub
        self.database_failing = database_failing   # why the database cannot be written, or None (Rule 4)
        self.charts = charts
        self.flush_interval = flush_interval
        self.scheduler: Scheduler = scheduler if scheduler is not None else hub.scheduler
        self.unpersisted = 0
        self._unwritten: deque[tuple[float, int]] = deque()  # (accepted at, last seq), oldest first

    def check_capacity(self, count: int = 0) -> None:
        """Raise IngestRefused when ``count`` more tickers cannot be taken now (Rules 3 and 4)."""
        unwritten = self._unwritten
        if unwritten and (failing := self.database_failing()) is not None:
            raise IngestRefused(f"the database cannot be written ({failing}); retry later", FAILING_RETRY_S)
        if (self.unpersisted + count > MAX_UNPERSISTED or unwritten
                and self.scheduler.now() - unwritten[0][0] > self.flush_interval + MAX_WRITE_LAG_S):
            raise IngestRefused("the database is behind; retry shortly", BEHIND_RETRY_S)

    def publish(self, tickers: list[Ticker], texts: list[str] | None = None) -> list[Event]:
        """Publish validated tickers, all or none (Rule 2); returns their events.

        ``texts``, when given, are the tickers' JSON encodings (``Ticker.to_json``).
        """
        self.check_capacity(len(tickers))
        now = self.scheduler.now()
        hub = self.hub
        topics = {symbol: ticker_topic(symbol) for symbol in {t.symbol for t in tickers}}
        added = self._first_seen(tickers) if SYMBOLS_TOPIC in hub.topics else []
        reserved = [*topics.values(), SYMBOLS_TOPIC] if added else list(topics.values())
        try:
            hub.reserve(reserved)  # all the new symbols fit, or none is taken
        except TopicLimit:
            raise TooManyTopics("too many symbols", TOPICS_RETRY_S) from None
        publish = hub.publish
        if texts is None:
            texts = [t.to_json() for t in tickers]
        try:
            for ticker in added:  # Rule 5: announced before their prices
                publish(SYMBOLS_TOPIC, "symbol_added", ticker, json_text=ticker.to_json())
            events = [publish(topics[t.symbol], "price_update", t, json_text=text)
                      for t, text in zip(tickers, texts)]
        finally:
            hub.release(reserved)
        for ticker in {t.symbol: t for t in tickers}.values():  # the last of each symbol
            self.charts.note_latest(ticker)
        self.unpersisted += len(tickers)
        if events:
            self._unwritten.append((now, events[-1].seq))
        return events

    def _first_seen(self, tickers: list[Ticker]) -> list[Ticker]:
        """The first ticker of each symbol the chart cache has never had, and has room for (Rule 5)."""
        latest = self.charts.latest
        room = self.charts.max_symbols - len(latest)
        first: dict[str, Ticker] = {}
        for ticker in tickers:
            if ticker.symbol not in latest and ticker.symbol not in first and len(first) < room:
                first[ticker.symbol] = ticker
        return list(first.values())

    def written(self, count: int, last_seq: int) -> None:
        """SQLite now holds ``count`` more tickers, and every one up to ``last_seq``."""
        self.unpersisted -= count
        unwritten = self._unwritten
        while unwritten and unwritten[0][1] <= last_seq:
            unwritten.popleft()
