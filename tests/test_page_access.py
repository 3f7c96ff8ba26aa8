"""The page for everyone, in Chromium: an axe-core audit, polite price announcements, the keyboard.

axe-core comes from npm (``bash .ci/run`` installs it under ``.ci/npm``; or set
MONKESTREAM_AXE to an ``axe.min.js``). Without it the audit fails, saying how to install it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from helpers import ROOT, request
from test_browser import Page, browser, publish, server, url, wait  # noqa: F401 - fixtures
from test_page_prices import set_viewport, settle

AXE = Path(os.environ.get("MONKESTREAM_AXE", ROOT / ".ci/npm/node_modules/axe-core/axe.min.js"))


def audit(page: Page) -> list[dict]:
    """Run axe-core in the page; the serious and critical violations."""
    if not AXE.is_file():
        pytest.fail(f"the audit needs axe-core at {AXE}: npm install --prefix .ci/npm axe-core", pytrace=False)
    page.driver.execute_script(AXE.read_text())
    result = page.driver.execute_async_script("""
        const done = arguments[0];
        axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations), e => done(String(e)));
    """)
    assert isinstance(result, list), result
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
            for v in result if v["impact"] in ("serious", "critical")]


def test_no_serious_accessibility_violations(server, browser):
    for symbol, price in (("DOGE", "0.0731"), ("BTC", "64250.5"), ("LONG", "1234567890123456789.123456789")):
        publish(server.port, symbol, price)
    request(server.port, "POST", "/room/lobby/comments", {"user": "keeper", "text": "gm"})
    page = browser(url(server))
    wait(lambda: len(page.qs(".card .chart[data-has-points]")) == 3, what="the charts")
    publish(server.port, "DOGE", "0.0701")   # a move: the down colours are on screen too
    wait(lambda: page.attr('.card[data-symbol="DOGE"]', "data-move") == "down", what="the move")
    assert audit(page) == []
    page.join("auditor")
    wait(lambda: page.members() == ["auditor"], what="joined")
    page.q("#comment-text").send_keys("hello", Keys.ENTER)
    wait(lambda: page.qs("#comments .delete"), what="the comment")
    svg = page.q('.card[data-symbol="BTC"] svg')
    ActionChains(page.driver).move_to_element(svg).perform()   # with the crosshair's readout shown
    wait(lambda: not page.q('.card[data-symbol="BTC"] .readout').get_attribute("hidden") is not None
         or page.q('.card[data-symbol="BTC"] .readout').is_displayed(), what="the readout")
    assert audit(page) == []
    set_viewport(page, 390, 844)
    settle(page)
    assert audit(page) == []
    # up and down are said in arrows and words, not in colour alone
    change = page.q('.card[data-symbol="DOGE"] .change')
    assert change.text.startswith("▼") and "down" in change.get_attribute("aria-label")
    assert page.errors() == []


def test_price_moves_are_announced_politely_and_not_per_tick(server, browser):
    publish(server.port, "DOGE", "0.0731")
    publish(server.port, "BTC", "64250.5")
    page = browser(url(server))
    wait(lambda: page.state() == "live", what="the stream")
    assert page.attr("#price-announcer", "aria-live") == "polite"
    # no price element is a live region of its own
    assert page.driver.execute_script(
        "return [...document.querySelectorAll('[aria-live]')].map(e => e.id).sort()") == ["comments", "price-announcer"]
    page.driver.execute_script("""
        window.said = [];
        new MutationObserver(() => said.push(document.getElementById('price-announcer').textContent))
          .observe(document.getElementById('price-announcer'), {childList: true, characterData: true, subtree: true});
    """)
    started = time.monotonic()
    for i in range(30):     # 60 ticks in about 3 s
        publish(server.port, "DOGE", f"0.07{32 + i}")
        publish(server.port, "BTC", f"{64000 - i}")
        time.sleep(0.1)
    wait(lambda: page.attr('.card[data-symbol="DOGE"]', "data-updates") == "30", what="every tick")
    said = wait(lambda: page.driver.execute_script("return said"), what="an announcement")
    time.sleep(max(0.0, 4.5 - (time.monotonic() - started)))
    said = page.driver.execute_script("return said")
    assert len(said) == 1, said          # one summary, not 60 announcements
    assert "DOGE" in said[0] and "BTC" in said[0]
    assert "up" in said[0] and "down" in said[0]


def test_everything_works_from_the_keyboard(server, browser):
    publish(server.port, "KEY", "1.5")
    request(server.port, "POST", "/room/lobby/comments", {"user": "keeper", "text": "gm"})
    page = browser(url(server))
    wait(lambda: page.attr('.card[data-symbol="KEY"] .chart', "data-state") == "ready", what="the chart")
    reached = []
    for _ in range(20):
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
        reached.append(page.driver.execute_script(
            "const e = document.activeElement;"
            "return e.tagName === 'svg' ? 'svg' : e.id || e.dataset.window || e.dataset.meme || e.tagName"))
    # the skip link, the chart, its windows, then the chat's controls, in reading order
    assert reached[:6] == ["A", "svg", "5m", "1h", "1d", "name"], reached
    assert "comments" in reached         # the comment list scrolls from the keyboard too
    # the chart from the keyboard: a readout, then another window
    page.driver.execute_script("document.querySelector('.card svg').focus()")
    ActionChains(page.driver).send_keys(Keys.ARROW_LEFT).perform()
    wait(lambda: page.q('.card[data-symbol="KEY"] .readout').is_displayed(), what="the keyboard readout")
    ActionChains(page.driver).send_keys(Keys.TAB, Keys.TAB, Keys.ENTER).perform()
    wait(lambda: page.attr('.card[data-symbol="KEY"] svg', "data-window") == "1h", what="the 1h chart")
    # join and post without a mouse
    page.driver.execute_script("document.getElementById('name').focus()")
    ActionChains(page.driver).send_keys("keys", Keys.ENTER).perform()
    wait(lambda: page.members() == ["keys"], what="joined")
    ActionChains(page.driver).send_keys("typed, not clicked", Keys.ENTER).perform()
    wait(lambda: list(page.comments().values()) == ["gm", "typed, not clicked"], what="the comment")
    assert page.errors() == []
