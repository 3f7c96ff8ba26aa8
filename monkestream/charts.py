"""The chart cache: per symbol, bounded point series for the 5-minute, 1-hour and 1-day charts.

Theory of operation
-------------------
Rule 1: points come from ``group_by(symbol)`` then ``throttle_time`` (leading
        edge, as in the original design): the first price of each symbol in a
        5-second window becomes a point of the 5-minute chart. The coarser
        charts take a point when their own interval has passed since their
        last point, judged by the tickers' own timestamps.
Rule 2: every series is a deque with a fixed length: memory per symbol is
        bounded (60 + 60 + 48 points), and so is the number of symbols.
Rule 3: on start-up the cache is warmed from SQLite, one point per window
        step (the first price of each step-aligned bucket, ``store.chart_seed``),
        so a restart does not blank the charts. The spacing is the live
        chart's; the prices chosen may differ from the live ones by up to a step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from decimal import Decimal
from typing import Any, AsyncIterable, NamedTuple

from .clock import Scheduler
from .ops import group_by, pipe, throttle_time
from .ticker import Ticker


class Window(NamedTuple):
    name: str
    span_s: int
    step_s: int

    @property
    def points(self) -> int:
        return self.span_s // self.step_s


WINDOWS = {
    "5m": Window("5m", 300, 5),
    "1h": Window("1h", 3600, 60),
    "1d": Window("1d", 86400, 1800),
}
FINEST = WINDOWS["5m"]
MAX_SYMBOLS = 10000


class ChartCache:
    """Point series per symbol and window, plus the latest ticker of each symbol."""

    def __init__(self, max_symbols: int = MAX_SYMBOLS) -> None:
        self.max_symbols = max_symbols
        self.series: dict[str, dict[str, deque[tuple[int, str]]]] = {}
        self.latest: dict[str, Ticker] = {}

    def note_latest(self, ticker: Ticker) -> None:
        """Remember the newest price of a symbol (every ticker, not only chart points)."""
        if ticker.symbol in self.latest or len(self.latest) < self.max_symbols:
            self.latest[ticker.symbol] = ticker

    def _series_of(self, symbol: str) -> dict[str, deque[tuple[int, str]]] | None:
        """The series of a symbol, created on first use; None past ``max_symbols``."""
        by_window = self.series.get(symbol)
        if by_window is None and len(self.series) < self.max_symbols:
            by_window = self.series[symbol] = {name: deque(maxlen=w.points) for name, w in WINDOWS.items()}
        return by_window

    def add_point(self, ticker: Ticker) -> None:
        """Add a 5-minute-chart point, and a coarser point where its interval has passed."""
        by_window = self._series_of(ticker.symbol)
        if by_window is None:
            return
        point = (ticker.created_at, ticker.price)
        for name, window in WINDOWS.items():
            points = by_window[name]
            if name == FINEST.name or not points or ticker.created_at - points[-1][0] >= window.step_s:
                points.append(point)

    def points(self, symbol: str, window: str, now: float) -> list[dict[str, Any]]:
        """The points of one chart inside its span, oldest first."""
        w = WINDOWS[window]
        series = self.series.get(symbol, {}).get(window, ())
        oldest = now - w.span_s
        return [{"t": t, "price": Decimal(p)} for t, p in series if t >= oldest]

    def warm(self, window: str, tickers: list[Ticker]) -> None:
        """Seed one window's series from stored tickers (already one per bucket)."""
        for ticker in tickers:
            by_window = self._series_of(ticker.symbol)
            if by_window is not None:
                by_window[window].append((ticker.created_at, ticker.price))

    async def run(self, tickers: AsyncIterable[Ticker], scheduler: Scheduler | None = None) -> None:
        """Feed the cache from a ticker stream until it ends: group_by(symbol) + throttle_time.

        On an error too, the grouping is closed before this returns, so no pump
        of this run goes on reading ``tickers`` (a supervisor may run it again).
        """
        groups: Any = pipe(tickers, group_by(lambda t: t.symbol))
        async with contextlib.aclosing(groups), asyncio.TaskGroup() as tasks:
            async for group in groups:
                tasks.create_task(self._follow(group, scheduler))

    async def _follow(self, group: AsyncIterable[Ticker], scheduler: Scheduler | None) -> None:
        async for ticker in pipe(group, throttle_time(FINEST.step_s, leading=True, scheduler=scheduler)):
            self.add_point(ticker)
