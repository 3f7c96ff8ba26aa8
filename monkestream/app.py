"""The application: the routes, and the pipelines that tie the hub to SQLite and the charts.

Theory of operation
-------------------
Rule 1: every price, from HTTP or from the demo feed, enters through
        ``ingest()``: validated, published on ``ticker:SYMBOL`` and nothing
        else. The store and the chart cache are subscribers like any other.
Rule 2: the store pipeline is ``subscription → buffer_time → SQLite``; the
        chart pipeline is ``subscription → group_by(symbol) → throttle_time``.
        Ingest refuses (503) rather than let unwritten tickers grow past
        ``MAX_UNPERSISTED``, so memory stays bounded and nothing accepted is lost.
        It also refuses while the oldest unwritten ticker is older than the
        flush interval plus ``MAX_WRITE_LAG_S``, so a crash loses about one
        window, not whatever a lagging writer had queued.
Rule 3: shutdown runs in order: stop accepting, end the streams, end the
        pipelines' subscriptions (buffer_time emits the last window), write
        it, record a clean end of the run, close the database.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import re
import time
from typing import Any, Callable

from . import charts as charts_mod
from .charts import ChartCache
from .chat import Chat, parse_room, parse_user, room_topic
from .config import Config
from .hub import Event, Hub, Policy, Subscription
from .http11 import chunk
from .ops import buffer_time, pipe
from .replay import Replayer
from .server import EventStream, Exchange, HTTPError, Response, Router, Server, json_response
from .static import StaticFiles
from .store import Store
from .ticker import MAX_BULK_TICKERS, InvalidTicker, Ticker, loads, parse_symbol, parse_ticker

log = logging.getLogger("monkestream")

MAX_UNPERSISTED = 500_000        # tickers accepted but not yet in SQLite
PRUNE_INTERVAL_S = 600           # how often history past --history-days is deleted
MAX_WRITE_LAG_S = 0.5            # beyond the flush interval, how far the writer may fall behind
WRITE_RETRY_S = 1.0              # a window that failed to write is tried again after this
HISTORY_DEFAULT_LIMIT = 500
GC_YOUNG_OBJECTS = 20_000        # allocations between young collections (the default is 700)
MAX_STREAM_TOPICS = 32
TOPIC_KINDS = ("ticker", "room")
_INTEGER = re.compile(r"-?[0-9]{1,19}")  # ASCII only; one optional sign


def ticker_topic(symbol: str) -> str:
    return "ticker:" + symbol


class App:
    """The hub, the store, the charts and the HTTP routes, with their life cycle."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.db)
        self.hub = Hub(epoch=0, replay_events=config.replay_events,
                       conflate=lambda topic: topic.startswith("ticker:"), wire_framing=chunk)
        self.charts = ChartCache(max_symbols=config.max_topics)
        self.replayer = Replayer(self.hub, self.store, budget_bytes=config.stream_buffer,
                                 stored_symbol=lambda topic: topic.removeprefix("ticker:") if topic.startswith("ticker:") else None)
        self.router = Router()
        self.server = Server(config, self.hub, self.router)
        self.started_at = time.time()
        self.unpersisted = 0
        self._unwritten: collections.deque[tuple[float, int]] = collections.deque()  # (accepted at, last seq)
        self.ingested = 0
        self.ingest_by_status: dict[int, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Subscription] = []
        self._retention: asyncio.Task[None] | None = None
        self._token = config.token.encode()
        self._routes()
        self.chat = Chat(self)

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, warm the charts, start the pipelines and listen."""
        self.hub.epoch = await self.store.open()
        await self._warm_charts()
        store_sub = self.hub.subscribe("ticker:*", maxsize=MAX_UNPERSISTED + MAX_BULK_TICKERS,
                                       policy=Policy.CLOSE)
        chart_sub = self.hub.subscribe("ticker:*", maxsize=self.config.max_topics, policy=Policy.CONFLATE)
        self._subs = [store_sub, chart_sub]
        self._tasks = [asyncio.create_task(self._persist(store_sub), name="persist"),
                       asyncio.create_task(self._chart(chart_sub), name="charts")]
        if self.config.history_days:
            self._retention = asyncio.create_task(self._retain(), name="retention")
        await self.server.start()

    async def stop(self) -> None:
        """Stop without losing anything published before the call."""
        await self.server.stop()
        if self._retention is not None:
            self._retention.cancel()
            try:
                await self._retention
            except asyncio.CancelledError:
                pass
        for sub in self._subs:
            sub.close()
        for task in self._tasks:
            try:
                await task
            except Exception:  # noqa: BLE001 - a task root: logged at shutdown
                log.exception("pipeline %s failed", task.get_name())
        await self.store.close(self.hub.seq)

    async def _warm_charts(self) -> None:
        now = int(time.time())
        for name, window in charts_mod.WINDOWS.items():
            seed = await self.store.chart_seed(now - window.span_s, window.step_s,
                                               window.points * self.config.max_topics)
            self.charts.warm(name, seed)
        for ticker in await self.store.latest(self.config.max_topics):
            self.charts.note_latest(ticker)
        log.debug("charts warmed from SQLite: %d symbols", len(self.charts.series))

    async def _persist(self, sub: Subscription) -> None:
        """subscription → buffer_time(flush_interval) → one SQLite transaction per window."""
        windows = pipe(sub.batches(), buffer_time(self.config.flush_interval, emit_empty=False))
        async for window in windows:
            count = sum(len(batch) for batch in window)
            written = window[-1][-1].seq
            while True:
                try:
                    # a generator: the writer thread, not the event loop, walks the window
                    await self.store.append_tickers(((e.seq, e.data) for batch in window for e in batch),
                                                    count, written)
                    break
                except Exception:  # noqa: BLE001 - kept and retried: ingest refuses meanwhile (Rule 2)
                    self.server.errors += 1
                    log.exception("writing %d tickers to SQLite failed; retrying in %g s", count, WRITE_RETRY_S)
                    await asyncio.sleep(WRITE_RETRY_S)
            self.unpersisted -= count
            unwritten = self._unwritten
            while unwritten and unwritten[0][1] <= written:
                unwritten.popleft()

    async def _retain(self) -> None:
        """Every PRUNE_INTERVAL_S, delete the history older than --history-days."""
        while True:
            try:
                deleted = await self.store.prune(int(time.time() - self.config.history_days * 86400))
            except Exception:  # noqa: BLE001 - a task root: logged, retried next time
                log.exception("pruning the history failed")
            else:
                if deleted:
                    log.info("deleted %d tickers older than %g days", deleted, self.config.history_days)
            await asyncio.sleep(PRUNE_INTERVAL_S)

    async def _chart(self, sub: Subscription) -> None:
        async def tickers() -> Any:
            async for event in sub:
                yield event.data
        await self.charts.run(tickers())

    # -- ingest ---------------------------------------------------------------------

    def check_capacity(self, count: int = 0) -> None:
        """HTTPError 503 when ``count`` more tickers cannot be taken now (Rule 2)."""
        unwritten = self._unwritten
        if (self.unpersisted + count > MAX_UNPERSISTED or unwritten
                and time.monotonic() - unwritten[0][0] > self.config.flush_interval + MAX_WRITE_LAG_S):
            raise HTTPError(503, "the database is behind; retry shortly", [("Retry-After", "1")])

    def ingest(self, tickers: list[Ticker], texts: list[str] | None = None) -> list[Event]:
        """Publish validated tickers, all or none; HTTPError when they cannot be taken now.

        ``texts``, when given, are the tickers' JSON encodings (``Ticker.to_json``).
        """
        self.check_capacity(len(tickers))
        now = time.monotonic()
        hub = self.hub
        topics = {symbol: ticker_topic(symbol) for symbol in {t.symbol for t in tickers}}
        new_topics = sum(1 for topic in topics.values() if topic not in hub.topics)
        if new_topics and len(hub.topics) + new_topics > self.config.max_topics:
            raise HTTPError(503, "too many symbols", [("Retry-After", "60")])
        publish = hub.publish
        if texts is None:
            texts = [t.to_json() for t in tickers]
        events = [publish(topics[t.symbol], "price_update", t, json_text=text) for t, text in zip(tickers, texts)]
        for ticker in {t.symbol: t for t in tickers}.values():  # the last of each symbol
            self.charts.note_latest(ticker)
        self.unpersisted += len(tickers)
        self.ingested += len(tickers)
        if events:
            self._unwritten.append((now, events[-1].seq))
        return events

    def has_token(self, request: Any) -> bool:
        """Whether the request carries the publish token (compared in constant time)."""
        if not self._token:
            return False
        scheme, _, credentials = (request.header("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)

    def _authorize(self, ex: Exchange) -> None:
        if self._token and not self.has_token(ex.request):
            raise HTTPError(401, "a valid bearer token is required",
                            [("WWW-Authenticate", 'Bearer realm="monkestream"')])

    def _count_ingest(self, status: int) -> None:
        self.ingest_by_status[status] = self.ingest_by_status.get(status, 0) + 1

    def post_price(self, ex: Exchange) -> Response:
        return self._counted(self._post_price, ex)

    def post_tickers(self, ex: Exchange) -> Response:
        return self._counted(self._post_tickers, ex)

    def _counted(self, handler: Callable[[Exchange], Response], ex: Exchange) -> Response:
        """Run an ingest handler, counting its answer by status for /metrics."""
        try:
            response = handler(ex)
        except HTTPError as exc:
            self._count_ingest(exc.status)
            raise
        self._count_ingest(response.status)
        return response

    def _post_price(self, ex: Exchange) -> Response:
        self._authorize(ex)
        try:
            symbol = parse_symbol(ex.params["symbol"])
            ticker = parse_ticker(loads(ex.request.body), symbol)
        except InvalidTicker as exc:
            raise HTTPError(exc.status, str(exc)) from None
        self.ingest([ticker])
        return Response(201, ticker.to_json().encode())

    def _post_tickers(self, ex: Exchange) -> Response:
        self._authorize(ex)
        self.check_capacity()  # before the parsing, which costs more than the rest
        try:
            body = loads(ex.request.body)
            if not isinstance(body, list):
                raise InvalidTicker("body", "must be a JSON array of tickers", 400)
            if len(body) > MAX_BULK_TICKERS:
                raise InvalidTicker("body", f"holds more than {MAX_BULK_TICKERS} tickers", 413)
            tickers = []
            now = time.time()
            for i, item in enumerate(body):
                try:
                    tickers.append(parse_ticker(item, now=now))
                except InvalidTicker as exc:
                    raise InvalidTicker(f"[{i}].{exc.field}", str(exc).split(": ", 1)[1], exc.status) from None
        except InvalidTicker as exc:
            raise HTTPError(exc.status, str(exc)) from None
        texts = [t.to_json() for t in tickers]
        self.ingest(tickers, texts)
        return Response(201, ("[" + ",".join(texts) + "]").encode())

    # -- reading ----------------------------------------------------------------------

    async def get_history(self, ex: Exchange) -> Response:
        symbol = _symbol(ex)
        params = ex.request.query_params()
        since = _int_param(params, "since", None, 0, 2**40)
        until = _int_param(params, "until", None, 0, 2**40)
        limit = _int_param(params, "limit", HISTORY_DEFAULT_LIMIT, 1, 10000)
        rows = await self.store.history(symbol, since, until, limit or HISTORY_DEFAULT_LIMIT)
        return json_response({"symbol": symbol, "tickers": [t.to_dict() for t in rows]})

    def get_chart(self, ex: Exchange) -> Response:
        symbol = _symbol(ex)
        window = _one(ex.request.query_params(), "window")
        if window is None:
            window = "5m"
        if window not in charts_mod.WINDOWS:
            raise HTTPError(400, f"window: must be one of {', '.join(charts_mod.WINDOWS)}")
        points = self.charts.points(symbol, window, time.time())
        return json_response({"symbol": symbol, "window": window, "points": points})

    def get_symbols(self, ex: Exchange) -> Response:
        latest = sorted(self.charts.latest.values())
        return json_response({"symbols": [t.to_dict() for t in latest]})

    def get_healthz(self, ex: Exchange) -> Response:
        return json_response({
            "status": "ok" if self.server.accepting else "stopping",
            "uptime": round(time.time() - self.started_at, 3),
            "streams": len(self.server.streams),
            "topics": len(self.hub.topics),
            "lastEventId": str(self.hub.last_id()),
            "unpersisted": self.unpersisted,
            "config": self.config.summary(),
        })

    def get_metrics(self, ex: Exchange) -> Response:
        from .metrics import render
        return Response(200, render(self).encode(), "text/plain; version=0.0.4; charset=utf-8")

    def get_index(self, ex: Exchange) -> Response:
        return json_response({
            "name": "monkestream",
            "endpoints": [
                "GET /ticker/{symbol}/event", "POST /ticker/{symbol}/price", "POST /tickers",
                "GET /ticker/{symbol}/history", "GET /ticker/{symbol}/chart?window=5m|1h|1d",
                "GET /symbols", "GET /events?topic=ticker:SYMBOL", "GET /healthz",
            ],
        })

    # -- streams ------------------------------------------------------------------------

    def ticker_events(self, ex: Exchange) -> EventStream:
        return self.open_stream(ex, [ticker_topic(_symbol(ex))])

    def multiplexed_events(self, ex: Exchange) -> EventStream:
        params = ex.request.query_params()
        topics = list(dict.fromkeys(params.get("topic", [])))
        if not topics:
            raise HTTPError(400, "topic: give at least one, e.g. ?topic=ticker:DOGE")
        if len(topics) > MAX_STREAM_TOPICS:
            raise HTTPError(400, f"topic: at most {MAX_STREAM_TOPICS} per stream")
        checked = [self._check_topic(t) for t in topics]
        user = _one(params, "user")
        return self.chat.stream(checked, parse_user(user) if user is not None else None,
                                self.open_stream(ex, checked))

    def _check_topic(self, topic: str) -> str:
        kind, _, name = topic.partition(":")
        if kind == "ticker":
            try:
                return ticker_topic(parse_symbol(name))
            except InvalidTicker:
                raise HTTPError(400, f"topic: {topic!r} has an invalid symbol") from None
        if kind == "room":
            return room_topic(parse_room(name))
        raise HTTPError(400, f"topic: {topic!r} must start with one of {', '.join(k + ':' for k in TOPIC_KINDS)}")

    def open_stream(self, ex: Exchange, topics: list[str]) -> EventStream:
        """An event stream on ``topics``, resuming after the request's Last-Event-ID."""
        last_id = ex.request.header("last-event-id")
        if last_id is None:
            last_id = _one(ex.request.query_params(), "lastEventId")
        new = [t for t in topics if t not in self.hub.topics]
        if new and len(self.hub.topics) + len(new) > self.config.max_topics:
            raise HTTPError(503, "too many topics", [("Retry-After", "60")])
        # A new stream starts where the hub stands now, as the response head goes
        # out: whatever is published before it is attached is replayed to it.
        position = last_id or str(self.hub.last_id())
        return EventStream(topics, lambda: self.replayer.prepare(topics, position))

    # -- routes -------------------------------------------------------------------------

    def _routes(self) -> None:
        add = self.router.add
        files = StaticFiles()
        add("GET", "/", files.serve)
        add("GET", "/static/{name}", files.serve)
        add("GET", "/api", self.get_index)
        add("GET", "/healthz", self.get_healthz)
        add("GET", "/symbols", self.get_symbols)
        add("POST", "/tickers", self.post_tickers)
        add("POST", "/ticker/{symbol}/price", self.post_price)
        add("GET", "/ticker/{symbol}/event", self.ticker_events)
        add("GET", "/ticker/{symbol}/history", self.get_history)
        add("GET", "/ticker/{symbol}/chart", self.get_chart)
        add("GET", "/events", self.multiplexed_events)
        add("GET", "/metrics", self.get_metrics)


def _symbol(ex: Exchange) -> str:
    try:
        return parse_symbol(ex.params["symbol"])
    except InvalidTicker as exc:
        raise HTTPError(400, str(exc)) from None


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


def _int_param(params: dict[str, list[str]], name: str, default: int | None, low: int, high: int) -> int | None:
    text = _one(params, name)
    if text is None or text == "":
        return default
    if _INTEGER.fullmatch(text) is None:
        raise HTTPError(400, f"{name}: must be an integer")
    value = int(text)
    if not low <= value <= high:
        raise HTTPError(400, f"{name}: must be between {low} and {high}")
    return value


async def serve(config: Config) -> None:
    """Run the server until SIGTERM or SIGINT, then stop without losing anything."""
    import signal

    from .clock import AsyncioScheduler
    from .demo import DemoFeed

    loop = asyncio.get_running_loop()
    app = App(config)
    if config.certfile:
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.certfile, config.keyfile)
        app.server.ssl_context = context
    await app.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    demo = None
    if not config.no_demo:
        demo = DemoFeed(app.ingest, AsyncioScheduler(loop), time.time)
        demo.start()
    scheme = "https" if config.certfile else "http"
    log.info("monkestream listening on %s://%s:%d (loop: %s, epoch %d, db %s, demo %s)",
             scheme, config.host, app.server.port, _loop_name(loop), app.hub.epoch, config.db,
             "off" if demo is None else "on")
    log.info("settings: %s", " ".join(f"{k}={v}" for k, v in config.summary().items()))
    try:
        await stop.wait()
    finally:
        log.info("stopping: ending streams and flushing the last window")
        if demo is not None:
            demo.stop()
        await app.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("stopped cleanly (last event id %s)", app.hub.last_id())


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(config: Config) -> None:
    """Run ``serve`` on uvloop when it is installed, else on the default asyncio loop.

    This process is the server's own, so it also tunes the garbage collector for it
    (embedders keep their own settings): every ticker waiting for its SQLite window
    is a live container, and at 100,000 tickers/s the default thresholds made the
    collector walk hundreds of thousands of them many times a second.
    """
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    import gc
    gc.freeze()  # what the imports made lives as long as the process: never scan it again
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
