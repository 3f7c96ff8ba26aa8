"""The demo feed: a few coins on random walks, so a fresh server has prices to stream.

Each coin publishes on its own jittered ~5 s interval through ``Ingest.publish``,
the same entry point as HTTP ingest. It runs on timer callbacks: no task.
A tick that ingest refuses (``IngestRefused``: the database is behind or
failing) is skipped. Any other error is a bug: it is logged with its traceback
when the feed starts failing, counted in ``failures``, and the feed goes on.
"""

from __future__ import annotations

import logging
import random
from decimal import Decimal
from typing import Callable

from .clock import Scheduler
from .ingest import IngestRefused
from .ticker import Ticker, parse_ticker

log = logging.getLogger("monkestream")

COINS = {"DOGE": "0.0731", "BTC": "64250.00", "ETH": "3120.50", "SOL": "142.37", "ADA": "0.4512", "XRP": "0.5234"}
INTERVAL_S = 5.0
JITTER = 0.3         # each interval is INTERVAL_S × (1 ± JITTER)
STEP = 0.004         # the random walk's relative step (standard deviation)


class DemoFeed:
    """Random-walk prices for ``COINS``, published until ``stop()``."""

    def __init__(self, publish: Callable[[list[Ticker]], object], scheduler: Scheduler,
                 now: Callable[[], float], rng: random.Random | None = None) -> None:
        self._publish = publish
        self._scheduler = scheduler
        self._now = now
        self._rng = rng or random.Random()
        self.prices = {symbol: Decimal(price) for symbol, price in COINS.items()}
        self._handles: dict[str, object] = {}
        self.running = False
        self.failures = 0        # ticks that failed with anything but IngestRefused
        self._failing = False    # since the last tick that worked: log a failure once

    def start(self) -> None:
        self.running = True
        for symbol in self.prices:
            self._tick(symbol, first=True)

    def stop(self) -> None:
        self.running = False
        for handle in self._handles.values():
            handle.cancel()  # type: ignore[attr-defined]
        self._handles.clear()

    def next_price(self, symbol: str) -> Decimal:
        price = self.prices[symbol]
        factor = Decimal(str(round(1 + self._rng.gauss(0, STEP), 6)))
        exponent = price.as_tuple().exponent
        new = (price * factor).quantize(Decimal(1).scaleb(exponent if isinstance(exponent, int) else -4))
        if new <= 0:
            new = price
        self.prices[symbol] = new
        return new

    def _tick(self, symbol: str, first: bool = False) -> None:
        if not self.running:
            return
        if not first:
            try:
                self._publish([parse_ticker({"price": format(self.next_price(symbol), "f"), "currency": "USD"},
                                            symbol, self._now())])
            except IngestRefused:
                pass
            except Exception:  # noqa: BLE001 - a timer root: logged once per run of failures, counted
                self.failures += 1
                if not self._failing:
                    log.exception("the demo feed failed to publish %s (until a tick succeeds, failures are "
                                  "counted, not logged)", symbol)
                self._failing = True
            else:
                self._failing = False
        delay = (self._rng.uniform(0.05, 1.0) if first else
                 INTERVAL_S * self._rng.uniform(1 - JITTER, 1 + JITTER))
        self._handles[symbol] = self._scheduler.call_later(delay, lambda: self._tick(symbol))
