"""Embed the hub in any asyncio program: publish never awaits; subscribers iterate.

    python examples/embed.py
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monkestream import Hub  # noqa: E402
from monkestream.ops import filter, map, pipe  # noqa: E402


async def main() -> None:
    hub = Hub()
    prices = hub.subscribe("ticker:DOGE", "ticker:BTC")
    cheap = pipe(prices, map(lambda event: event.data), filter(lambda ticker: ticker["price"] < 1000))

    async def consume() -> list[dict]:
        got = []
        async for ticker in cheap:
            got.append(ticker)
            if len(got) == 3:
                break
        return got

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)  # let the consumer start waiting
    for symbol, price in [("DOGE", 0.07), ("BTC", 64000), ("DOGE", 0.08), ("ETH", 3000), ("DOGE", 0.09)]:
        event = hub.publish(f"ticker:{symbol}", "price_update", {"symbol": symbol, "price": price})
        print(f"published {symbol} {price} as {event.id}")
    got = await consumer
    prices.close()
    print(f"received {len(got)} prices: {[t['price'] for t in got]}")
    assert hub.is_idle()


if __name__ == "__main__":
    asyncio.run(main())
