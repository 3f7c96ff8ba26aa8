"""The page in a real browser: headless Chromium, driven by Selenium, against the real server.

Chromium and its driver come from Debian (``apt-get install chromium chromium-driver``)
and Selenium from pip. When one is missing these tests fail, saying what to install:
the page is the product, so it is never silently left untested.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from helpers import ServerProcess, SSEClient, healthz, request

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # reported by the fixture, as a failure
    webdriver = None

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,900")
WAIT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - an element may be replaced while we look at it
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def publish(port: int, symbol: str, *prices: str) -> list[dict[str, Any]]:
    status, _, body = request(port, "POST", "/tickers", [{"symbol": symbol, "price": p} for p in prices])
    assert status == 201, body
    return json.loads(body)


class Page:
    """One browser on the page, with the queries the tests need."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url
        driver.get(url)

    def q(self, css: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def qs(self, css: str) -> list[Any]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def card(self, symbol: str) -> Any:
        return self.q(f'.card[data-symbol="{symbol}"]')

    def attr(self, css: str, name: str) -> str | None:
        found = self.qs(css)
        return found[0].get_attribute(name) if found else None

    def state(self) -> str | None:
        return self.attr("#conn-state", "data-state")

    def members(self) -> list[str]:
        return [li.get_attribute("data-user") for li in self.qs("#members li")]

    def comments(self) -> dict[str, str]:
        return {li.get_attribute("data-comment-id"): li.find_element(By.CSS_SELECTOR, ".text").text
                for li in self.qs("#comments li")}

    def join(self, name: str) -> None:
        field = self.q("#name")
        field.clear()
        field.send_keys(name)
        self.q("#join").click()

    def errors(self, network_too: bool = True) -> list[dict[str, Any]]:
        """SEVERE browser log entries: script errors and console.error (and failed loads)."""
        return [e for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE" and (network_too or e.get("source") != "network")]


@pytest.fixture
def browser(tmp_path: Path):
    """A factory of pages in fresh headless Chromium instances, all closed afterwards."""
    if webdriver is None:
        pytest.fail("the browser tests need Selenium: pip install 'selenium>=4'", pytrace=False)
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"the browser tests need headless Chromium; missing {', '.join(missing)}: "
                    "apt-get install -y chromium chromium-driver", pytrace=False)
    drivers: list[Any] = []

    def open_page(url: str) -> Page:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        drivers.append(driver)
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        return Page(driver, url)

    yield open_page
    for driver in drivers:
        driver.quit()


@contextlib.contextmanager
def running(srv: ServerProcess) -> Iterator[ServerProcess]:
    """Run a server process, then stop it and close its output pipe."""
    try:
        yield srv.start()
    finally:
        if srv.proc is not None:
            if srv.proc.poll() is None:
                srv.stop()
            if srv.proc.stdout is not None:
                srv.proc.stdout.close()


@pytest.fixture
def server(tmp_path: Path):
    # a fixed port, so that a restart keeps the page's origin
    with running(ServerProcess(tmp_path / "b.db", "--no-demo", "--retry-ms", "500",
                               "--port", str(free_port()))) as srv:
        yield srv


def url(srv: ServerProcess) -> str:
    return f"http://127.0.0.1:{srv.port}/"


def chart_points(port: int, symbol: str, window: str) -> int:
    status, _, body = request(port, "GET", f"/ticker/{symbol}/chart?window={window}")
    assert status == 200
    return len(json.loads(body)["points"])


def test_the_page_loads_live_with_no_console_errors(server, browser):
    publish(server.port, "DOGE", "0.0731")
    publish(server.port, "BTC", "64250.50")
    page = browser(url(server))
    wait(lambda: page.state() == "live", what="the stream to go live")
    wait(lambda: len(page.qs(".card .chart[data-state=ready]")) == 2, what="both charts")
    assert [c.get_attribute("data-symbol") for c in page.qs(".card")] == ["BTC", "DOGE"]
    assert page.card("BTC").find_element(By.CSS_SELECTOR, ".price").text == "64,250.5"
    assert page.card("DOGE").get_attribute("data-price") == "0.0731"
    assert page.driver.title.startswith("monkestream")
    # every control is a real, labelled button or field
    for css in ("#join", "#leave", "#post", ".card .windows button"):
        assert all(el.tag_name == "button" for el in page.qs(css))
    assert page.q("label[for=name]") and page.q("label[for=comment-text]")
    assert page.errors() == []


def test_a_published_price_appears_and_adds_a_point(server, browser):
    (first,) = publish(server.port, "DOGE", "0.0731")
    wait(lambda: chart_points(server.port, "DOGE", "5m") == 1, what="the server's first chart point")
    page = browser(url(server))
    wait(lambda: page.state() == "live", what="the stream to go live")
    svg = '.card[data-symbol="DOGE"] svg'
    wait(lambda: page.attr(svg, "data-points") == "1", what="the loaded chart")
    page.join("watcher")
    wait(lambda: page.members() == ["watcher"], what="the page to join the room")
    room = SSEClient(server.port, "/events?topic=room:lobby")

    publish(server.port, "NEWC", "5")      # a symbol the page has not seen: announced on the stream
    # the 5-minute chart takes one point per 5 s: publish once that spacing has passed
    wait(lambda: int(time.time()) >= first["createdAt"] + 5, timeout=7, what="the chart's spacing")
    publish(server.port, "DOGE", "0.0812")
    card = '.card[data-symbol="DOGE"]'
    wait(lambda: page.attr(card, "data-price") == "0.0812", what="the new price on its card")
    assert page.card("DOGE").find_element(By.CSS_SELECTOR, ".price").text == "0.0812"
    assert page.attr(card, "data-updates") == "1"
    assert page.attr(card, "data-move") == "up" and page.attr(card, "data-trend") == "up"
    wait(lambda: page.attr(svg, "data-points") == "2", what="a second chart point")
    assert page.card("DOGE").find_element(By.CSS_SELECTOR, "[data-role=updated]").text != ""

    publish(server.port, "DOGE", "0.0799")   # within 5 s: a new price, not a new point
    wait(lambda: page.attr(card, "data-updates") == "2", what="the second update")
    assert page.attr(card, "data-move") == "down" and page.attr(svg, "data-points") == "2"

    wait(lambda: page.qs('.card[data-symbol="NEWC"]'), timeout=3, what="the new symbol's card")
    wait(lambda: page.attr('.card[data-symbol="NEWC"] svg', "data-points") == "1", what="its chart")
    publish(server.port, "NEWC", "6")      # the stream now carries its topic too
    wait(lambda: page.attr('.card[data-symbol="NEWC"]', "data-price") == "6", what="its streamed price")
    # both prices came by the stream: the new one resumed from the announcement, before the first
    assert page.attr('.card[data-symbol="NEWC"]', "data-updates") == "2"
    # the stream was replaced for the new topic, the new one open before the old one closed
    room.pump(0.3)
    assert [e.type for e in room.events if e.type.startswith("user_")] == []
    room.close()
    assert page.errors() == []


def test_switching_the_chart_window(server, browser):
    publish(server.port, "WIN", "10")
    wait(lambda: chart_points(server.port, "WIN", "1d") == 1, what="the server's chart")
    page = browser(url(server))
    card = '.card[data-symbol="WIN"]'
    wait(lambda: page.attr(f"{card} .chart", "data-state") == "ready", what="the chart")
    for window, press in (("1h", "click"), ("1d", "space"), ("5m", "enter")):
        button = page.q(f'{card} .windows button[data-window="{window}"]')
        if press == "click":
            button.click()
        else:   # from the keyboard
            page.driver.execute_script("arguments[0].focus()", button)
            button.send_keys(Keys.SPACE if press == "space" else Keys.ENTER)
        wait(lambda: page.attr(f"{card} svg", "data-window") == window, what=f"the {window} chart")
        pressed = {b.get_attribute("data-window"): b.get_attribute("aria-pressed")
                   for b in page.qs(f"{card} .windows button")}
        assert pressed == {w: str(w == window).lower() for w in ("5m", "1h", "1d")}
        assert page.attr(card, "data-window") == window
        assert page.attr(f"{card} .chart", "data-state") == "ready"
        assert page.attr(f"{card} svg", "data-points") == str(chart_points(server.port, "WIN", window))
    assert page.errors() == []


def test_two_pages_chat_with_each_other(server, browser):
    alice = browser(url(server))
    bob = browser(url(server))
    for page in (alice, bob):
        wait(lambda: page.state() == "live", what="the stream to go live")
        assert page.q("#post").get_attribute("disabled") is not None

    alice.join("not a name!")
    wait(lambda: alice.q("#name-error").text != "", what="the name to be refused")
    assert alice.attr("#name", "aria-invalid") == "true" and not alice.q("#leave").is_displayed()

    alice.join("alice")
    wait(lambda: alice.members() == ["alice"], what="alice in the room")
    bob.join("bob")
    wait(lambda: bob.members() == ["alice", "bob"], what="bob to see alice")
    wait(lambda: alice.members() == ["alice", "bob"], what="alice to see bob")

    text = "hello <b>bob</b> & <img src=x onerror=alert(1)>"
    alice.q("#comment-text").send_keys(text, Keys.ENTER)
    seen = wait(lambda: bob.comments(), what="bob to see the comment")
    ((comment_id, shown),) = seen.items()
    assert shown == text
    assert bob.qs("#comments b") == [] and bob.qs("#comments img") == []
    assert bob.qs(f'#comments [data-delete="{comment_id}"]') == []
    wait(lambda: alice.qs(f'#comments [data-delete="{comment_id}"]'), what="alice's delete button")

    bob.q("#comment-text").send_keys("to the moon")
    bob.q("#post").click()
    wait(lambda: len(alice.comments()) == 2, what="alice to see bob's comment")

    alice.q(f'#comments [data-delete="{comment_id}"]').click()
    wait(lambda: comment_id not in bob.comments(), what="the deletion to reach bob")
    wait(lambda: comment_id not in alice.comments(), what="the deletion on alice's page")
    assert list(bob.comments().values()) == ["to the moon"]

    bob.q("#leave").click()
    wait(lambda: alice.members() == ["alice"], what="alice to see bob leave")
    assert bob.members() == [] and bob.q("#post").get_attribute("disabled") is not None
    assert alice.errors() == [] and bob.errors() == []


def test_the_page_survives_a_server_restart_without_missing_a_price(server, browser):
    port = server.port
    publish(port, "RST", "0.5")
    status, _, _ = request(port, "POST", "/room/lobby/comments", {"user": "keeper", "text": "still here"})
    assert status == 201
    page = browser(url(server))
    wait(lambda: page.state() == "live", what="the stream to go live")
    wait(lambda: page.comments(), what="the comments")
    card = '.card[data-symbol="RST"]'

    publish(port, "RST", "1", "2", "3")
    publish(port, "RST", "4", "5")
    wait(lambda: page.attr(card, "data-updates") == "5", what="the prices before the stop")

    assert server.stop() == 0
    wait(lambda: page.state() == "reconnecting", what="the page to notice")
    time.sleep(0.7)                          # down time: nothing is published
    # A new ServerProcess: the old one's log already holds a "listening" line.
    with running(ServerProcess(server.db, *server.args)) as again:   # same port, same database
        assert again.port == port
        publish(port, "RST", "6", "7")       # most likely before the page is back
        wait(lambda: page.state() in ("resumed", "live"), what="the page to resume")
        assert int(page.attr("#conn-state", "data-reconnects")) >= 1
        publish(port, "RST", "8", "9", "10")
        wait(lambda: page.attr(card, "data-updates") == "10", what="every price after the restart")

    got = page.driver.execute_script("return window.monkestream.prices('RST')")
    assert [e["price"] for e in got] == [str(i) for i in range(1, 11)]
    assert page.attr(card, "data-price") == "10"
    ids = [tuple(map(int, e["id"].split("-"))) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == 10
    assert page.attr("#conn-state", "data-last-id") == got[-1]["id"]
    assert list(page.comments().values()) == ["still here"]
    # failed reconnection attempts are logged by the browser; nothing else may be
    assert page.errors(network_too=False) == []


@contextlib.contextmanager
def static_site(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on another port: a page of another origin than the server's."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}/"
    finally:
        site.shutdown()
        site.server_close()
        thread.join(5)


def test_a_plain_event_source_turned_away_by_a_full_server_comes_back_by_itself(tmp_path, browser):
    """Any page's EventSource, refused at --max-streams, keeps reconnecting and gets in once room frees."""
    with running(ServerProcess(tmp_path / "full.db", "--no-demo", "--max-streams", "1",
                               "--full-retry-ms", "300")) as srv:
        held = SSEClient(srv.port, "/ticker/FULL/event")
        assert held.status == 200
        site = tmp_path / "site"
        site.mkdir()
        (site / "index.html").write_text(
            "<!doctype html><title>a plain page</title>\n"
            f'<script>window.source = new EventSource("http://127.0.0.1:{srv.port}/ticker/FULL/event");</script>\n')
        with static_site(site) as origin:
            page = browser(origin + "index.html")
            run = page.driver.execute_script
            run("window.states = []; window.got = [];"
                "source.addEventListener('price_update', e => got.push(e.data));"
                "setInterval(() => states.push(source.readyState), 20);")
            time.sleep(2.5)                  # turned away all along, told to come back in 300-900 ms each time
            states = run("return states")
            assert states and EventSourceState.CLOSED not in states, states
            turned_away = wait(lambda: turned_away_count(srv.port), what="the page to be turned away")
            assert turned_away >= 2, "the page did not come back after being turned away"
            held.close()
            wait(lambda: healthz(srv.port)["streams"] == 1, what="the page to get in once room freed")
            publish(srv.port, "FULL", "1.25")
            wait(lambda: run("return got.length") == 1, what="the price on the page")
            assert json.loads(run("return got[0]"))["price"] == 1.25
            assert run("return source.readyState") == EventSourceState.OPEN
            assert EventSourceState.CLOSED not in run("return states")


class EventSourceState:
    """EventSource.readyState (WHATWG HTML §9.2.2)."""

    CONNECTING, OPEN, CLOSED = 0, 1, 2


def turned_away_count(port: int) -> int:
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200
    found = [line for line in body.decode().splitlines()
             if line.startswith('monkestream_streams_turned_away_total{answer="retry"}')]
    return int(float(found[0].split()[-1])) if found else 0
