"""Ingest: the one way prices come in, published on the hub within what SQLite can keep up with.

Theory of operation
-------------------
Rule 1: every price, from HTTP or from the demo feed, enters through
        ``Ingest.publish``: validated already (``ticker.parse_ticker``),
        published on ``ticker:SYMBOL`` and nothing else. The store and the
        chart cache are subscribers like any other.
Rule 2: all or none. ``publish`` checks every limit before it publishes the
        first ticker, and refuses with a domain error, never an HTTP one:
        ``IngestRefused`` while SQLite is behind, ``TooManyTopics`` when a new
        symbol would pass the hub's topic limit. The routes translate them.
Rule 3: ingest refuses rather than let unwritten tickers grow past
        ``MAX_UNPERSISTED``, so memory stays bounded and nothing accepted is
        lost. It also refuses while the oldest unwritten ticker is older than
        the flush interval plus ``MAX_WRITE_LAG_S``, so a crash loses about one
        window, not whatever a lagging writer had queued. The store pipeline
        reports each window it wrote with ``written()``.
"""

from __future__ import annotations

from collections import deque

from .charts import ChartCache
from .clock import Scheduler
from .errors import MonkestreamError
from .hub import Event, Hub
from .ticker import Ticker, ticker_topic

MAX_UNPERSISTED = 500_000        # tickers accepted but not yet in SQLite
MAX_WRITE_LAG_S = 0.5            # beyond the flush interval, how far the writer may fall behind
BEHIND_RETRY_S = 1               # what a feeder is told to wait while SQLite catches up
TOPICS_RETRY_S = 60              # ... and when the hub holds too many topics


class IngestRefused(MonkestreamError):
    """Tickers cannot be taken now; a feeder may try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyTopics(IngestRefused):
    """A new symbol would pass the hub's topic limit."""


class Ingest:
    """Publishes validated tickers on the hub and counts those SQLite does not hold yet."""

    def __init__(self, hub: Hub, charts: ChartCache, *, max_topics: int, flush_interval: float,
                 scheduler: Scheduler | None = None) -> None:
        self.hub = hub
        self.charts = charts
        self.max_topics = max_topics
        self.flush_interval = flush_interval
        self.scheduler: Scheduler = scheduler if scheduler is not None else hub.scheduler
        self.unpersisted = 0
        self._unwritten: deque[tuple[float, int]] = deque()  # (accepted at, last seq), oldest first

    def check_capacity(self, count: int = 0) -> None:
        """Raise IngestRefused when ``count`` more tickers cannot be taken now (Rule 3)."""
        unwritten = self._unwritten
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
        new_topics = sum(1 for topic in topics.values() if topic not in hub.topics)
        if new_topics and len(hub.topics) + new_topics > self.max_topics:
            raise TooManyTopics("too many symbols", TOPICS_RETRY_S)
        publish = hub.publish
        if texts is None:
            texts = [t.to_json() for t in tickers]
        events = [publish(topics[t.symbol], "price_update", t, json_text=text) for t, text in zip(tickers, texts)]
        for ticker in {t.symbol: t for t in tickers}.values():  # the last of each symbol
            self.charts.note_latest(ticker)
        self.unpersisted += len(tickers)
        if events:
            self._unwritten.append((now, events[-1].seq))
        return events

    def written(self, count: int, last_seq: int) -> None:
        """SQLite now holds ``count`` more tickers, and every one up to ``last_seq``."""
        self.unpersisted -= count
        unwritten = self._unwritten
        while unwritten and unwritten[0][1] <= last_seq:
            unwritten.popleft()
