"""The application: the parts of one server wired together, and their life cycle.

Theory of operation
-------------------
Rule 1: ``App`` builds and connects the parts; it handles no request. The
        routes live with their concepts (``tickers``, ``chat``, ``streams``,
        ``static``, ``metrics``), each registering on the one router; prices
        come in through ``ingest`` (its Rule 1), from HTTP and the demo feed.
Rule 2: one clock. The hub, the server, the ingest service, the pipelines
        and the chat's rate limiter all share the app's ``Scheduler``.
Rule 3: the store pipeline is ``subscription → buffer_time → SQLite``, and
        each window written is reported to ``Ingest.written``, which bounds
        what ingest accepts meanwhile (ingest Rule 3). A window the database
        refuses is kept and retried, never dropped (ingest refuses meanwhile:
        its Rule 4). The chart pipeline is
        ``subscription → group_by(symbol) → throttle_time``.
Rule 5: both pipelines run under a ``Supervisor``: a crash is logged with its
        traceback at once, counted, shown on /healthz, and the pipeline runs
        again after a backoff. The store pipeline keeps every batch it took
        from its subscription until it is written, so a run after a crash
        writes first what the crashed one held: nothing acknowledged is lost.
Rule 6: with ``--upstream`` the app is a relay (``relay``): its hub is fed
        by the upstream's events alone, it opens no database and takes no
        prices itself; writes, history and comments are the upstream's.
Rule 4: shutdown runs in order: stop accepting, end the streams, end the
        pipelines' subscriptions (buffer_time emits the last window), write
        it, record a clean end of the run, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from typing import Any, Callable, Coroutine

from . import charts as charts_mod
from . import logs
from .accesslog import open_access_log
from .auth import BearerToken
from .charts import ChartCache
from .chat import Chat
from .clock import AsyncioScheduler, Handle, Scheduler
from .config import Config
from .http11 import chunk
from .errors import Unavailable
from .hub import Event, Hub, Policy, Subscription
from .ingest import MAX_UNPERSISTED, SYMBOLS_TOPIC, Ingest
from .limits import fit_streams
from .metrics import Monitor
from .ops import buffer_time, pipe
from .ratelimit import RateLimiter
from .relay import Relay
from .replay import Replayer
from .routing import Router
from .server import Server
from .static import StaticFiles
from .store import Store
from .supervise import Supervisor
from .streams import StreamOpener, TopicStreams
from .ticker import MAX_BULK_TICKERS, ticker_topic, topic_symbol
from .tickers import TickerRoutes

log = logging.getLogger("monkestream")

PRUNE_INTERVAL_S = 600           # how often history past --history-days is deleted
TOPIC_SWEEP_S = 60               # at most this long between sweeps for idle topics
WRITE_RETRY_S = 1.0              # a window that failed to write is tried again after this
GC_YOUNG_OBJECTS = 20_000        # allocations between young collections (the default is 700)


def _is_ticker_topic(topic: str) -> bool:
    return topic_symbol(topic) is not None


class App:
    """The store, the hub, the charts, the pipelines and the server, wired together."""

    def __init__(self, config: Config, scheduler: Scheduler | None = None) -> None:
        self.config = config
        self.scheduler: Scheduler = scheduler if scheduler is not None else AsyncioScheduler()
        self.store = Store(config.db)
        self.hub = Hub(epoch=0, replay_events=config.replay_events, conflate=_is_ticker_topic,
                       wire_framing=chunk, scheduler=self.scheduler,
                       limits={"ticker": config.max_topics, "room": config.max_rooms, SYMBOLS_TOPIC: 1},
                       ring_bytes_max=config.replay_bytes)
        self.charts = ChartCache(max_symbols=config.max_topics)
        self.node: Any = None   # with --broker: the cluster's parts (cluster.Node)
        if config.broker:
            from .cluster import Node
            self.node = Node(config, self.hub, self.store, self.charts)
        node = self.node
        self.ingest = (Ingest if node is None else node.ingest)(self.hub, self.charts,
                             flush_interval=config.flush_interval, scheduler=self.scheduler,
                             database_failing=lambda: self.store.failing)
        self.supervisor = Supervisor(self.scheduler)
        self.router = Router()
        self.server = Server(config, self.hub, self.router, scheduler=self.scheduler)
        token = BearerToken(config.token)
        self.relay: Relay | None = None
        replayer: Any
        if config.upstream:  # Rule 6
            self.relay = Relay(self.hub, self.charts, url=config.upstream, token=config.token,
                               budget_bytes=config.stream_buffer, scheduler=self.scheduler)
            replayer = self.relay.replayer
            self.hub.follows = True
        else:
            replayer = (Replayer if node is None else node.replayer)(
                self.hub, self.store, budget_bytes=config.stream_buffer, stored_symbol=topic_symbol)
        open_stream = StreamOpener(self.hub, replayer)
        self.chat = (Chat if node is None else node.chat)(self.hub, self.store,
                         RateLimiter(config.comment_rate, config.comment_burst, scheduler=self.scheduler),
                         RateLimiter(config.join_rate, config.join_burst, scheduler=self.scheduler),
                         has_token=token.carried_by, open_stream=open_stream,
                         make_member=self.relay.presence.member if self.relay is not None else None)
        self.tickers = (TickerRoutes if node is None else node.tickers)(self.ingest, self.store, self.charts,
                                    authorize=token.require, open_stream=open_stream)
        monitor = Monitor(config=config, hub=self.hub, server=self.server, store=self.store, ingest=self.ingest,
                          tickers=self.tickers, chat=self.chat, replayer=replayer, has_token=token.carried_by,
                          supervisor=self.supervisor, relay=self.relay, broker=None if node is None else node.broker)
        for routes in (StaticFiles(), self.tickers, TopicStreams(open_stream, self.chat.membership, authorize=token.require,
                                                                  relay_buffer=config.relay_buffer),
                       self.chat, monitor):
            routes.register(self.router)
        if self.relay is not None:
            self.relay.forwarder.register(self.router)
        self._subs: list[Subscription] = []
        self._taken: deque[list[Event]] = deque()   # batches the store pipeline holds unwritten (Rule 5)
        self._retention: asyncio.Task[None] | None = None
        self._expiry: Handle | None = None

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, warm the charts, start the pipelines and listen."""
        if self.relay is not None:
            await self._start_relay()
            return
        self.hub.epoch = await self.store.open()
        await self._warm_charts()
        every_ticker = ticker_topic("*")
        store_sub = self.hub.subscribe(every_ticker, maxsize=MAX_UNPERSISTED + MAX_BULK_TICKERS, policy=Policy.CLOSE)
        chart_sub = self.hub.subscribe(every_ticker, maxsize=self.config.max_topics, policy=Policy.CONFLATE)
        self._subs = [store_sub, chart_sub]
        self.supervisor.start("persist", lambda: self._persist(store_sub))
        self.supervisor.start("charts", lambda: self._chart(chart_sub))
        if self.node is not None:  # after the pipelines subscribed: what the log holds reaches them
            await self.node.start()
        if self.config.history_days:
            self._retention = asyncio.create_task(self._retain(), name="retention")
        self._expire_topics()
        await self.server.start()

    async def _start_relay(self) -> None:
        """Rule 6: the chart pipeline on what the upstream sends, then listen."""
        assert self.relay is not None
        chart_sub = self.hub.subscribe(ticker_topic("*"), maxsize=self.config.max_topics, policy=Policy.CONFLATE)
        self._subs = [chart_sub]
        await self.relay.start()
        self.supervisor.start("charts", lambda: self._chart(chart_sub))
        self._expire_topics()
        await self.server.start()

    async def stop(self) -> None:
        """Stop without losing anything published before the call (Rule 4)."""
        await self.server.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.node is not None:
            await self.node.stop()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._retention is not None:
            self._retention.cancel()
            try:
                await self._retention
            except asyncio.CancelledError:
                pass
        for sub in self._subs:
            sub.close()
        await self.supervisor.stop()
        if self.relay is None:
            await self.store.close(self.hub.seq)
        if self.node is not None:
            await self.node.close()

    async def _warm_charts(self) -> None:
        now = int(time.time())
        for name, window in charts_mod.WINDOWS.items():
            seed = await self.store.chart_seed(now - window.span_s, window.step_s,
                                               window.points * self.config.max_topics)
            self.charts.warm(name, seed)
        for ticker in await self.store.latest(self.config.max_topics):
            self.charts.note_latest(ticker)
        log.debug("charts warmed from SQLite: %d symbols", len(self.charts.series))

    # -- pipelines ----------------------------------------------------------------

    async def _persist(self, sub: Subscription) -> None:
        """subscription → buffer_time(flush_interval) → one SQLite transaction per window (Rules 3 and 5)."""
        if self._taken:  # what a crashed run held: written first, as one window
            await self._write_window(list(self._taken))

        async def taken() -> Any:
            async for batch in sub.batches():
                self._taken.append(batch)
                yield batch
        windows: Any = pipe(taken(), buffer_time(self.config.flush_interval, emit_empty=False,
                                                 scheduler=self.scheduler))
        async with contextlib.aclosing(windows):  # on a crash too: no pump of this run outlives it
            async for window in windows:
                await self._write_window(window)

    async def _write_window(self, window: list[list[Event]]) -> None:
        """Write the oldest batches held, retried while the database refuses them (Rule 3)."""
        count = sum(len(batch) for batch in window)
        written = window[-1][-1].seq
        if self.node is not None:  # ids from the log: each row keeps its own, and the position is kept
            written = window[-1][-1].id  # type: ignore[assignment]
        while True:
            try:
                if self.node is not None:
                    await self.store.append_logged(((e.epoch, e.seq, e.data) for batch in window for e in batch),
                                                   count, window[-1][-1].id)
                    break
                # a generator: the writer thread, not the event loop, walks the window
                await self.store.append_tickers(((e.seq, e.data) for batch in window for e in batch),
                                                count, written)
                break
            except Unavailable:  # the store logged it, once; ingest refuses meanwhile
                await self.scheduler.sleep(WRITE_RETRY_S)
        for batch in window:
            held = self._taken.popleft()
            assert held is batch, "a window is the oldest batches held, in order"
        self.ingest.written(count, written)

    def _expire_topics(self) -> None:
        """Forget topics idle for --topic-idle, checked a few times per idle period (hub Rule 7)."""
        expired = self.hub.expire(self.config.topic_idle)
        if expired:
            log.debug("forgot %d idle topics", expired)
        self._expiry = self.scheduler.call_later(min(TOPIC_SWEEP_S, self.config.topic_idle / 4),
                                                 self._expire_topics)

    async def _retain(self) -> None:
        """Every PRUNE_INTERVAL_S, delete the history older than --history-days."""
        while True:
            try:
                deleted = await self.store.prune(int(time.time() - self.config.history_days * 86400))
            except Unavailable:  # the store logged it, once
                pass
            except Exception:  # noqa: BLE001 - a task root: logged, retried next time
                log.exception("pruning the history failed")
            else:
                if deleted:
                    log.info("deleted %d tickers older than %g days", deleted, self.config.history_days)
            await self.scheduler.sleep(PRUNE_INTERVAL_S)

    async def _chart(self, sub: Subscription) -> None:
        async def tickers() -> Any:
            async for event in sub:
                yield event.data
        await self.charts.run(tickers(), self.scheduler)


async def serve(config: Config) -> None:
    """Run the server until SIGTERM or SIGINT, then stop without losing anything."""
    import signal

    from .demo import DemoFeed

    loop = asyncio.get_running_loop()
    access_log = open_access_log(config.access_log, config.log_format)
    app = App(config)
    app.server.access_log = access_log
    if config.certfile:
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.certfile, config.keyfile)
        app.server.ssl_context = context
    await app.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, logs.reopen, *([] if access_log is None else [access_log]))  # logrotate
    demo = None
    if not config.no_demo and not config.upstream:  # a relay takes no prices itself
        demo = DemoFeed(app.ingest.publish, app.scheduler, time.time)
        demo.start()
    scheme = "https" if config.certfile else "http"
    if app.relay is not None:
        log.info("monkestream relay listening on %s://%s:%d (loop: %s, upstream %s, at %s)",
                 scheme, config.host, app.server.port, _loop_name(loop), config.upstream, app.hub.last_id())
    else:
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
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if access_log is not None:
            access_log.close()
        log.info("stopped cleanly (last event id %s)", app.hub.last_id())


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(config: Config) -> None:
    """Run ``serve`` on uvloop when it is installed, else on the default asyncio loop.

    The loop runs outside the ``except ImportError`` that probes for uvloop, so no
    traceback of the server's carries that ImportError as its context.

    This process is the server's own, so it raises its open-file limit and caps
    --max-streams to what that allows (``limits`` Rule 1), and it tunes the
    garbage collector (embedders keep their own settings): every ticker waiting for its SQLite window
    is a live container, and at 100,000 tickers/s the default thresholds made the
    collector walk hundreds of thousands of them many times a second.
    """
    logs.setup(config.log_level, config.log_format, config.log_file)
    if config.workers > 1:  # this process only watches over the workers
        from .workers import supervise
        asyncio.run(supervise(config))
        return
    import gc
    gc.freeze()  # what the imports made lives as long as the process: never scan it again
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
    config = dataclasses.replace(config, max_streams=fit_streams(config.max_streams))
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop
    except ImportError:
        pass
    else:
        runner = uvloop.run
    try:
        runner(serve(config))
    except Unavailable as exc:  # the database cannot be opened (or closed cleanly): one line, not a traceback
        log.error("%s (%s); exiting", exc, config.db)
        raise SystemExit(1) from None
