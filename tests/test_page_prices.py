"""The price cards in Chromium: every digit on screen at any width, charts with scales and a crosshair.

Uses the browser and server fixtures of ``test_browser``; like those tests, these fail
(never skip) when Chromium or Selenium is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.interaction import POINTER_TOUCH
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.keys import Keys

from helpers import ServerProcess
from monkestream.store import Store
from monkestream.ticker import Ticker
from test_browser import Page, browser, chart_points, publish, running, server, url, wait  # noqa: F401 - fixtures

# The extremes the API takes: 1e-8, under a hundred million with cents, and 40 significant digits.
PRICES = {
    "TINY": "0.00000001",
    "BIG": "99999999.99",
    "LONG": "1234567890123456789012345678.901234567891",
    "SMALL": "0.1234567890123456789012345678901234567891",
    "DOGE": "0.0731",
}
WIDTHS = (320, 390, 600, 768, 1024, 1280, 1920)

# Every way a price's text could be cut off, measured on the rendered page.
CLIPPED = """
const problems = [];
const vw = document.documentElement.clientWidth;
if (document.documentElement.scrollWidth > vw) problems.push(`the page scrolls sideways at ${vw}px`);
for (const card of document.querySelectorAll(".card")) {
  const box = card.getBoundingClientRect();
  if (box.right > vw + 0.5) problems.push(`${card.dataset.symbol}: card past the window`);
  for (const el of card.querySelectorAll(".price, .range span, .change, .card-head *")) {
    const name = `${card.dataset.symbol} ${el.className || el.dataset.role}`;
    const style = getComputedStyle(el);
    if (style.textOverflow === "ellipsis") problems.push(`${name}: ellipsis`);
    if (el.scrollWidth > el.clientWidth + 1) problems.push(`${name}: scrollWidth ${el.scrollWidth} > ${el.clientWidth}`);
    if (el.scrollHeight > el.clientHeight + 1) problems.push(`${name}: scrollHeight ${el.scrollHeight} > ${el.clientHeight}`);
    const range = document.createRange();
    range.selectNodeContents(el);
    for (const r of range.getClientRects()) {
      if (r.left < box.left - 0.5 || r.right > box.right + 0.5) problems.push(`${name}: text outside its card`);
      if (r.right > vw + 0.5 || r.left < -0.5) problems.push(`${name}: text outside the window`);
    }
    // what is drawn is all there is: no ancestor inside the card clips the text's box
    const own = el.getBoundingClientRect();
    for (let up = el.parentElement; up && up !== card.parentElement; up = up.parentElement) {
      const clip = getComputedStyle(up).overflow !== "visible";
      const r = up.getBoundingClientRect();
      if (clip && (own.left < r.left - 0.5 || own.right > r.right + 0.5 || own.bottom > r.bottom + 0.5)) {
        problems.push(`${name}: clipped by ${up.className}`);
      }
    }
  }
}
return problems;
"""


def set_viewport(page: Page, width: int, height: int = 900) -> None:
    page.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})


def settle(page: Page) -> None:
    """Wait for two animation frames: the page renders in them."""
    page.driver.execute_async_script(
        "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done()))")


def grouped(price: str) -> str:
    whole, _, frac = price.partition(".")
    return f"{int(whole):,}" + (f".{frac}" if frac else "")


def test_prices_are_never_cut_off_at_any_width(server, browser):
    for symbol, price in PRICES.items():
        publish(server.port, symbol, price)
    page = browser(url(server))
    wait(lambda: len(page.qs(".card[data-price]")) == len(PRICES), what="every card with its price")
    for width in WIDTHS:
        set_viewport(page, width)
        settle(page)
        assert page.driver.execute_script(CLIPPED) == [], f"at {width}px"
        for symbol, price in PRICES.items():
            shown = page.card(symbol).find_element("css selector", ".price")
            # every digit, grouped by thousands; the rendered text, not only the DOM's
            assert shown.get_attribute("textContent") == grouped(price), (width, symbol)
            assert shown.text.replace("\n", "") == grouped(price), (width, symbol)
        sizes = page.driver.execute_script(
            "return [...document.querySelectorAll('.card .price')].map(e => parseFloat(getComputedStyle(e).fontSize))")
        assert min(sizes) >= 16, f"at {width}px the type shrank below 1rem: {sizes}"
    # long prices get smaller type than short ones, short ones keep the big type
    font = {s: page.driver.execute_script(
        "return parseFloat(getComputedStyle(arguments[0]).fontSize)", page.card(s).find_element("css selector", ".price"))
        for s in ("DOGE", "LONG")}
    assert font["LONG"] < font["DOGE"] and font["DOGE"] >= 24
    assert page.errors() == []


def axis(page: Page, symbol: str) -> dict[str, Any]:
    """What the chart of ``symbol`` draws: its scales, the last price's tag and the line."""
    return page.driver.execute_script("""
        const svg = document.querySelector(`.card[data-symbol="${arguments[0]}"] svg`);
        const texts = (sel) => [...svg.querySelectorAll(sel + ' text')].map(t => {
          const b = t.getBBox();
          return {text: t.textContent, t: Number(t.dataset.t), x: b.x, y: b.y, w: b.width, h: b.height};
        });
        const tag = svg.querySelector('.last-text');
        const line = svg.querySelector('.line').getAttribute('d');
        const dot = svg.querySelector('.dot').getAttribute('d');
        return {x: texts('.x-axis'), y: texts('.y-axis'), width: svg.clientWidth,
                last: svg.querySelector('.last-price').hasAttribute('hidden') ? null : tag.textContent,
                lastY: Number(svg.querySelector('.last-line').getAttribute('y1')),
                dotY: Number(dot.slice(1).split(',')[1].split('l')[0]), line};
    """, symbol)


def overlapping(labels: list[dict[str, Any]]) -> bool:
    ordered = sorted(labels, key=lambda item: item["x"])
    return any(a["x"] + a["w"] > b["x"] for a, b in zip(ordered, ordered[1:]))


def chart_of(page: Page, symbol: str, window: str) -> dict[str, Any]:
    card = f'.card[data-symbol="{symbol}"]'
    page.q(f'{card} .windows button[data-window="{window}"]').click()
    wait(lambda: page.attr(f"{card} svg", "data-window") == window, what=f"the {window} chart")
    settle(page)
    return axis(page, symbol)


def seed(db: Path, rows: list[Ticker]) -> None:
    """Write ``rows`` to a new database as an earlier run's history, so a server starts with them."""
    async def write() -> None:
        store = Store(str(db))
        await store.open()
        await store.append_tickers(((i + 1, t) for i, t in enumerate(rows)), len(rows), len(rows))
        await store.close(len(rows))
    asyncio.run(write())


@contextlib.contextmanager
def seeded(tmp_path: Path, rows: list[Ticker]) -> Iterator[ServerProcess]:
    seed(tmp_path / "seeded.db", rows)
    with running(ServerProcess(tmp_path / "seeded.db", "--no-demo")) as srv:
        yield srv


def a_day(symbol: str, now: int, price: Callable[[int], str]) -> list[Ticker]:
    """A day of prices: one every 10 minutes, every minute in the last hour, every 5 s in the last 5."""
    times = sorted({*range(now - 86000, now - 3600, 600), *range(now - 3600, now - 300, 60), *range(now - 300, now + 1, 5)})
    return [Ticker(symbol, price(i), "USD", t) for i, t in enumerate(times)]


def test_charts_have_a_price_scale_a_time_axis_and_the_last_price(tmp_path, browser):
    now = int(time.time())
    rows = a_day("AXE", now, lambda i: f"{100 + (i * 7) % 13}.{i % 4 * 25}")
    with seeded(tmp_path, rows) as srv:
        page = browser(url(srv))
        card = '.card[data-symbol="AXE"]'
        wait(lambda: page.attr(f"{card} .chart", "data-state") == "ready", what="the chart")
        # the 1d chart is full from the first second: loaded with the page, from the chart
        # cache's 30-minute points and the day's history in between
        state = page.driver.execute_script(f"""
            document.querySelector('{card} .windows button[data-window="1d"]').click();
            return document.querySelector('{card} .chart').dataset.state""")
        assert state == "ready"
        wait(lambda: page.attr(f"{card} svg", "data-window") == "1d", what="the 1d chart")
        assert int(page.attr(f"{card} svg", "data-points")) >= 140 > 2 * chart_points(srv.port, "AXE", "1d")
        last = rows[-1].price
        allowed = {"5m": {60, 120}, "1h": {600, 900, 1200, 1800}, "1d": {7200, 10800, 14400, 21600}}
        for width in (390, 1280):
            set_viewport(page, width)
            for window, steps in allowed.items():
                chart = chart_of(page, "AXE", window)
                times = [label["t"] for label in chart["x"]]
                assert len(times) >= 2, (width, window, chart["x"])
                gaps = {b - a for a, b in zip(times, times[1:])}
                assert len(gaps) == 1 and gaps <= steps, (width, window, times)
                assert all(len(label["text"]) == 5 and label["text"][2] == ":" for label in chart["x"]), chart["x"]
                assert not overlapping(chart["x"]), (width, window, chart["x"])
                assert all(0 <= lb["x"] and lb["x"] + lb["w"] <= chart["width"] + 0.5 for lb in chart["x"])
                # the price scale: at least two round values, higher ones drawn higher
                top_down = sorted(chart["y"], key=lambda label: label["y"])
                values = [float(label["text"].replace(",", "")) for label in top_down]
                assert len(values) >= 2, (window, chart["y"])
                assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
                assert all(label["x"] + label["w"] <= chart["width"] + 0.5 for label in chart["y"])
                # the last price is on the scale, level with the line's end
                assert chart["last"] == last, (window, chart["last"], last)
                assert abs(chart["lastY"] - chart["dotY"]) < 1.5
        assert page.errors() == []


def readout(page: Page, card: str) -> dict[str, Any] | None:
    return page.driver.execute_script("""
        const r = document.querySelector(arguments[0] + ' .readout');
        if (r.hidden) return null;
        const box = r.getBoundingClientRect(), chart = r.parentElement.getBoundingClientRect();
        return {t: Number(r.dataset.t), price: r.dataset.price, text: r.innerText,
                inside: box.left >= chart.left && box.right <= chart.right && box.top >= chart.top};
    """, card)


def test_the_crosshair_reads_time_and_price_under_the_pointer_on_touch_and_from_the_keyboard(tmp_path, browser):
    now = int(time.time())
    rows = [Ticker("XH", str(10 + i), "USD", now - 20 * 3600 + i * 3600) for i in range(21)]
    with seeded(tmp_path, rows) as srv:
        page = browser(url(srv))
        card = '.card[data-symbol="XH"]'
        wait(lambda: page.attr(f"{card} .chart", "data-state") == "ready", what="the chart")
        chart_of(page, "XH", "1d")
        crosshair(page, card, {r.created_at: r.price for r in rows})


def crosshair(page: Page, card: str, points: dict[int, str]) -> None:
    svg = page.q(f"{card} svg")
    width = svg.size["width"]

    seen = []
    for fraction in (0.1, 0.5, 0.8):   # offsets are from the centre
        ActionChains(page.driver).move_to_element_with_offset(svg, int(width * (fraction - 0.5)), 0).perform()
        shown = wait(lambda: (r := readout(page, card)) and r["t"] not in seen and r, what="the readout")
        assert points[shown["t"]] == shown["price"] and shown["inside"]
        hhmm = time.strftime("%H:%M", time.localtime(shown["t"]))
        assert hhmm in shown["text"] and shown["price"] in shown["text"]
        assert page.attr(f"{card} .cross", "hidden") is None
        seen.append(shown["t"])
    assert seen == sorted(seen) and len(set(seen)) == 3     # it follows the pointer
    ActionChains(page.driver).move_to_element(page.q("h1")).perform()
    wait(lambda: readout(page, card) is None, what="the readout to go with the pointer")

    # a finger: the readout shows where it touches, and stays a moment after it lifts
    finger = ActionBuilder(page.driver, mouse=PointerInput(POINTER_TOUCH, "finger"))
    finger.pointer_action.move_to(svg, int(width * -0.3), 0).pointer_down().pause(0.1).pointer_up()
    finger.perform()
    touched = wait(lambda: readout(page, card), what="the readout on touch")
    assert points[touched["t"]] == touched["price"] and touched["t"] < seen[1]

    # the keyboard: the chart takes focus, arrows walk the points, Escape hides it
    page.driver.execute_script("arguments[0].focus()", svg)
    keys = ActionChains(page.driver)
    keys.send_keys(Keys.END).perform()
    wait(lambda: (readout(page, card) or {}).get("t") == max(points), what="the keyboard readout at the end")
    ActionChains(page.driver).send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT).perform()
    wait(lambda: (readout(page, card) or {}).get("t") == sorted(points)[-3], what="two points back")
    assert points[sorted(points)[-3]] in page.q(f"{card} [data-role=cursor]").get_attribute("textContent")
    ActionChains(page.driver).send_keys(Keys.HOME).perform()
    wait(lambda: (readout(page, card) or {}).get("t") == min(points), what="the first point")
    ActionChains(page.driver).send_keys(Keys.ESCAPE).perform()
    wait(lambda: readout(page, card) is None, what="Escape to hide it")
    assert page.errors() == []
