"""Take screenshots of the page: a demo server, headless Chromium, a little chat.

    python examples/screenshot.py [docs/screenshot.png] [--phone docs/screenshot-phone.png]

Needs Chromium, its driver (Debian: ``apt-get install chromium chromium-driver``)
and ``pip install selenium``. The server runs on a temporary database holding a
day of made-up history for the demo coins, with the demo feed on; the page is left
long enough for a few live prices to arrive, and the pointer rests on one chart so
that its crosshair readout shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from monkestream.demo import COINS  # noqa: E402
from monkestream.store import Store  # noqa: E402
from monkestream.ticker import Ticker  # noqa: E402
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
DEMO_WAIT_S = 12          # a couple of live ticks per coin on top of the history
HISTORY_STEP_S = 60       # one made-up price a minute over the last day
POINTED = "ADA"           # the card whose chart shows the crosshair (the first one)
COMMENTS = [("moonboi", "DOGE to the moon, obviously"), ("satoshi_fan", "HODL. Zoom out."),
            ("moonboi", "apes together strong")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_history(db: Path, rng: random.Random) -> None:
    """A day of random-walk prices per demo coin, ending at its demo price, as an earlier run's."""
    now = int(time.time())
    rows = []
    for symbol, price in COINS.items():
        value = float(price)
        decimals = len(price.partition(".")[2])
        walk = []
        for t in range(now - HISTORY_STEP_S, now - 86400, -HISTORY_STEP_S):
            value *= 1 + rng.gauss(0, 0.0015)
            walk.append(Ticker(symbol, f"{value:.{decimals}f}", "USD", t))
        rows += reversed(walk)

    async def write() -> None:
        store = Store(str(db))
        await store.open()
        await store.append_tickers(((i + 1, t) for i, t in enumerate(rows)), len(rows), len(rows))
        await store.close(len(rows))
    asyncio.run(write())


def start_server(db: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "monkestream", "--port", str(port), "--db", str(db),
                             "--log-level", "warning"], cwd=ROOT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the server did not start")


def browser(width: int, height: int, profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # --window-size sizes the window; the page must get exactly this viewport.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})
    return driver


def post(port: int, user: str, text: str) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/room/lobby/comments", method="POST",
                                     data=json.dumps({"user": user, "text": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()


def shoot(port: int, path: Path, width: int, height: int, user: str, full_page: bool = False) -> None:
    with tempfile.TemporaryDirectory() as profile:
        driver = browser(width, height, profile)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            WebDriverWait(driver, 15).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".chart[data-has-points]")) >= 6)
            driver.find_element(By.ID, "name").send_keys(user)
            driver.find_element(By.ID, "join").click()
            WebDriverWait(driver, 5).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, f'#members li[data-user="{user}"]'))
            box = driver.find_element(By.ID, "comment-text")
            box.send_keys("monke sees green candles, monke happy")
            driver.find_element(By.ID, "post").click()
            WebDriverWait(driver, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#comments .mine"))
            driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
            if full_page:
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
                time.sleep(0.3)
            # the 1h chart of one coin, the pointer resting on it a third of the way along
            card = f'.card[data-symbol="{POINTED}"]'
            driver.find_element(By.CSS_SELECTOR, f'{card} .windows button[data-window="1h"]').click()
            chart = driver.find_element(By.CSS_SELECTOR, f"{card} svg")
            ActionChains(driver).move_to_element_with_offset(chart, -chart.size["width"] // 6, 0).perform()
            WebDriverWait(driver, 5).until(lambda d: d.find_element(By.CSS_SELECTOR, f"{card} .readout").is_displayed())
            time.sleep(1.2)      # let the price flashes fade
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
        finally:
            driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="docs/screenshot.png", help="desktop screenshot (PNG)")
    parser.add_argument("--phone", default="", help="also a phone-width (390x844) screenshot to this path")
    parser.add_argument("--phone-full", action="store_true", help="make the phone screenshot the whole page")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seed_history(Path(tmp) / "demo.db", random.Random(13))
        proc, port = start_server(Path(tmp) / "demo.db")
        try:
            for user, text in COMMENTS:
                post(port, user, text)
            time.sleep(DEMO_WAIT_S)
            shoot(port, Path(args.path), 1440, 900, "diamond_hands")
            print(f"wrote {args.path}")
            if args.phone:
                shoot(port, Path(args.phone), 390, 844, "paper_hands", full_page=args.phone_full)
                print(f"wrote {args.phone}")
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
