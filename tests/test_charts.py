"""The chart cache: sampling per window, bounds, and the group_by + throttle_time pipeline on virtual time."""

from __future__ import annotations

import asyncio

from monkestream.charts import WINDOWS, ChartCache
from monkestream.clock import VirtualScheduler
from monkestream.store import Store
from monkestream.ticker import Ticker


def tick(symbol: str, t: int, price: str = "1") -> Ticker:
    return Ticker(symbol, price, "USD", t)


def test_charts_rule_1_each_window_keeps_its_own_spacing():
    cache = ChartCache()
    for t in (0, 5, 10, 59, 60, 65, 1799, 1800):
        cache.add_point(tick("A", t))
    times = {name: [t for t, _ in cache.series["A"][name]] for name in WINDOWS}
    assert times["5m"] == [0, 5, 10, 59, 60, 65, 1799, 1800]
    assert times["1h"] == [0, 60, 1799]
    assert times["1d"] == [0, 1800]


def test_charts_rule_2_series_and_symbols_are_bounded():
    cache = ChartCache(max_symbols=2)
    for t in range(0, 10_000, 5):
        cache.add_point(tick("A", t))
    assert len(cache.series["A"]["5m"]) == WINDOWS["5m"].points
    cache.add_point(tick("B", 0))
    cache.add_point(tick("C", 0))
    assert sorted(cache.series) == ["A", "B"]


def test_points_are_limited_to_the_window_span():
    cache = ChartCache()
    cache.add_point(tick("A", 1000, "2.5"))
    assert [p["t"] for p in cache.points("A", "5m", now=1200)] == [1000]
    assert cache.points("A", "5m", now=1400) == []
    assert str(cache.points("A", "1h", now=1200)[0]["price"]) == "2.5"


def test_charts_rule_1_the_pipeline_takes_the_first_price_of_each_symbol_per_five_seconds():
    async def main():
        scheduler = VirtualScheduler()
        queue: asyncio.Queue[Ticker | None] = asyncio.Queue()

        async def source():
            while (item := await queue.get()) is not None:
                yield item

        cache = ChartCache()
        runner = asyncio.create_task(cache.run(source(), scheduler=scheduler))
        for second, symbol, price in [(0, "A", "1"), (1, "A", "2"), (1, "B", "7"), (4, "A", "3"),
                                      (6, "A", "4"), (7, "B", "8"), (12, "A", "5")]:
            await scheduler.advance(second - scheduler.now())
            queue.put_nowait(tick(symbol, second, price))
            await scheduler.advance(0)
        queue.put_nowait(None)
        await asyncio.wait_for(runner, 1)
        assert [p for _, p in cache.series["A"]["5m"]] == ["1", "4", "5"]
        assert [p for _, p in cache.series["B"]["5m"]] == ["7", "8"]
        assert scheduler.pending == 0
    asyncio.run(main())


def test_charts_rule_3_a_chart_warmed_from_sqlite_has_one_point_per_step_aligned_bucket(tmp_path):
    ticks = [tick("A", t, str(t)) for t in (50, 70, 110, 125)]
    live = ChartCache()
    for ticker in ticks:
        live.add_point(ticker)

    async def seed() -> list[Ticker]:
        store = Store(str(tmp_path / "warm.db"))
        await store.open()
        await store.append_tickers(list(enumerate(ticks, 1)), len(ticks), len(ticks))
        rows = await store.chart_seed(0, WINDOWS["1h"].step_s, 100)
        await store.close(len(ticks))
        return rows

    warmed = ChartCache()
    warmed.warm("1h", asyncio.run(seed()))
    assert [t for t, _ in live.series["A"]["1h"]] == [50, 110]         # a step after the last point
    assert [t for t, _ in warmed.series["A"]["1h"]] == [50, 70, 125]   # the first of each minute
