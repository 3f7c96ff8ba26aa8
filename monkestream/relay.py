"""Relay mode: a monkestream whose events come from an upstream monkestream, served to its own clients.

Theory of operation
-------------------
Rule 1: the ``Follower`` holds one all-topics stream on the upstream
        (``GET /events?topic=*``, hub Rule 9) and republishes each event on
        the local hub with the upstream's id, name, data and keep flag. It
        publishes nothing else, so the relay's ids, order and rings are the
        upstream's. Before its first event it takes the upstream's position
        as the hub's origin: the relay holds every event after it.
Rule 2: the upstream going away ends the stream; the follower reconnects
        with jittered exponential backoff and its last id as
        ``Last-Event-ID``, so it continues with no gap. Meanwhile the relay's
        streams stay open (heartbeats go on) and its writes answer 503.
Rule 3: a ``reset`` from the upstream (it could not cover the gap) cuts the
        named topics (``Hub.cut``) once the relay stands at the upstream's
        position: their rings are emptied, resumes from before it are no
        longer covered, and their streams are closed to resume, so each
        client gets, through the relay, the ``reset`` the upstream gives it.
Rule 4: a resume is built from the relay's rings when they cover it. Else it
        is fetched from the upstream (which can use SQLite): the upstream's
        backlog up to its position, then the relay's ring from there, each
        event once and in id order. A client ahead of the relay (it came
        from a faster node) waits until the relay has caught up to its id.
Rule 5: writes and the reads the relay keeps no data for (history,
        comments) are forwarded to the upstream with their headers, the
        client's address in ``X-Forwarded-For`` (trusted upstream from
        relays only: by address, or by ``X-Relay-Token``) and the upstream's
        answer returned. An unreachable upstream is a 503 with Retry-After.
Rule 6: charts and symbols are the relay's own: warmed from the upstream
        (``GET /symbols`` and ``GET /charts``) at start, then fed by the
        followed tickers like an origin's.
Rule 7: chat presence is the upstream's (``upstream_presence``): a user with
        streams on the relay is made present there. The relay's hub numbers
        no event itself (``Hub.follows``): every event it carries, a join
        included, is the upstream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Callable, NamedTuple
from urllib.parse import quote

from .charts import WINDOWS, ChartCache
from .clock import Scheduler, within
from .hub import EVERY_TOPIC, Backlog, Hub, TopicLimit
from .replay import Replayer
from .routing import Exchange, HTTPError, Response, Router
from .sse import EventId, label_frame
from .ticker import InvalidTicker, Ticker, loads, parse_ticker, topic_symbol
from .upstream import Frame, Upstream, UpstreamError, split_frames
from .upstream_presence import UpstreamPresence

log = logging.getLogger("monkestream")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
WRITE_RETRY_S = 2            # what a writer is told to wait while the upstream is away
REACH_WAIT_S = 5.0           # how long a resume waits for the relay to reach its client's id
FETCH_TIMEOUT_S = 15.0       # for a resume fetched from the upstream, whole
FORWARDED = (("POST", "/tickers"), ("POST", "/ticker/{symbol}/price"), ("GET", "/ticker/{symbol}/history"),
             ("GET", "/room/{room}/comments"), ("POST", "/room/{room}/comments"),
             ("DELETE", "/room/{room}/comments/{comment_id}"))
RELAY_TOKEN_HEADER = "X-Relay-Token"
# what a forwarded request's client may not say itself: the relay says who it is
_NOT_FORWARDED = frozenset({"x-forwarded-for", "forwarded", "x-real-ip", "x-relay-token"})
_PASSED_BACK = frozenset({"retry-after", "www-authenticate", "cache-control", "vary"})


def token_headers(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}"), (RELAY_TOKEN_HEADER, token)] if token else []


class Follower:
    """Follows the upstream's all-topics stream into the local hub (Rules 1-3)."""

    def __init__(self, hub: Hub, upstream: Upstream, charts: ChartCache, *, token: str = "",
                 scheduler: Scheduler, presence: UpstreamPresence | None = None) -> None:
        self.hub = hub
        self.presence = presence
        self.upstream = upstream
        self.charts = charts
        self.token = token
        self.scheduler = scheduler
        self.started = False           # the hub's origin is set: it follows the upstream
        self.connected = False
        self.ready = asyncio.Event()   # set once the first stream reached its position
        self.connects = 0
        self.events = 0
        self.resets = 0
        self.refused = 0               # events over this relay's topic budgets
        self.last_error: str | None = None
        self.since = time.time()       # when ``connected`` last changed
        self._moved = asyncio.Event()
        self._cut: list[str] | None = None   # topics a reset named, cut at the position that follows

    async def run(self) -> None:
        """Follow the upstream for ever, reconnecting with backoff (Rule 2)."""
        delay = BACKOFF_MIN_S
        while True:
            try:
                await self._follow()
                error = "the upstream ended the stream"
            except (UpstreamError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                error = str(exc) or type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - a task root: logged, and followed again
                log.exception("error following the upstream")
                error = repr(exc)
            if self.connected:
                log.warning("upstream %s lost (%s); reconnecting", self.upstream.url, error)
                delay = BACKOFF_MIN_S
            elif error != self.last_error:
                log.warning("upstream %s unreachable (%s); retrying", self.upstream.url, error)
            self.last_error = error
            self._set_connected(False)
            await self.scheduler.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.since = time.time()

    async def _follow(self) -> None:
        headers = token_headers(self.token)
        if self.started:
            headers.append(("Last-Event-ID", str(self.hub.last_id())))
        self._cut = None
        body = await self.upstream.stream("/events?topic=*", headers)
        try:
            if body.status != 200:
                text = (await body.read_all(4096)).decode("utf-8", "replace")
                raise UpstreamError(f"status {body.status}: {text[:200]}")
            self.connects += 1
            self._set_connected(True)
            self.last_error = None
            buffer = b""
            async for data in body:
                frames, buffer = split_frames(buffer + data)
                for frame in frames:
                    self._apply(frame)
                if frames:
                    moved, self._moved = self._moved, asyncio.Event()
                    moved.set()
        finally:
            body.close()

    def _apply(self, frame: Frame) -> None:
        hub = self.hub
        if frame.data is None:  # an id-only frame: the upstream's position, at the end of its backlog
            position = EventId.parse(frame.id or "")
            if position is not None and not self.started:
                hub.epoch, hub.seq = position
                hub.origin = position
                self.started = True
            elif position is not None and position > hub.last_id():
                hub.epoch, hub.seq = position  # what lies between was reset, or live only: never replayed
            if self._cut is not None:  # Rule 3, now that the relay stands where the upstream does
                hub.cut(None if EVERY_TOPIC in self._cut else self._cut)
                self._cut = None
            self.ready.set()
            return
        if frame.topic is None:
            if frame.event == "reset":
                self._reset(json.loads(frame.data).get("topics", [EVERY_TOPIC]))
            return
        event_id = EventId.parse(frame.id or "")
        if event_id is None or not self.started or event_id <= hub.last_id():
            return
        data = None
        if frame.event in ("user_joined", "user_left") and self.presence is not None:
            self.presence.seen(frame.topic.removeprefix("room:"), frame.event, frame.data, event_id)
        elif frame.event == "price_update" and topic_symbol(frame.topic) is not None:
            data = _ticker(frame.data)
            if data is not None:
                self.charts.note_latest(data)
        try:
            hub.publish(frame.topic, frame.event or "message", data, json_text=frame.data,
                        event_id=event_id, keep=frame.keep)
        except TopicLimit:
            self.refused += 1
            return
        self.events += 1

    def _reset(self, topics: list[str]) -> None:
        """Rule 3: what the upstream no longer holds, this relay no longer claims to (at the position)."""
        self.resets += 1
        log.warning("upstream could not cover a gap for %s; their streams start over", ", ".join(topics))
        self._cut = [*(self._cut or []), *topics]

    async def reach(self, event_id: EventId, timeout: float = REACH_WAIT_S) -> bool:
        """Wait until the hub has published ``event_id`` (or more); False after ``timeout``."""
        deadline = self.scheduler.now() + timeout
        while self.hub.last_id() < event_id:
            left = deadline - self.scheduler.now()
            if left <= 0:
                return False
            try:
                await within(self.scheduler, left, self._moved.wait())
            except TimeoutError:
                return False
        return True


def _ticker(text: str) -> Ticker | None:
    try:
        return _ticker_of(loads(text.encode()))
    except InvalidTicker:
        return None


def _ticker_of(body: object) -> Ticker | None:
    """A ticker as the upstream sent it, with its own time."""
    try:
        return parse_ticker(body, None, now=int(body["createdAt"]))  # type: ignore[index]
    except (InvalidTicker, KeyError, TypeError, ValueError):
        return None


class _NoHistory:
    """The store of a relay's local replayer: it holds nothing, the upstream does."""

    def covers(self, after: EventId) -> bool:
        return False

    def ends_previous_run(self, after: EventId) -> bool:
        return False


class Fetched(NamedTuple):
    """A backlog fetched from the upstream: its frames (id None: a notice), and where it ended."""

    frames: list[tuple[EventId | None, bytes]]
    position: EventId | None      # None: cut before its end (the upstream sent it in parts)


class RelayReplayer:
    """Resumes from the relay's rings, or from the upstream beyond them (Rule 4)."""

    def __init__(self, hub: Hub, follower: Follower, upstream: Upstream, *, token: str,
                 budget_bytes: int) -> None:
        self.hub = hub
        self.follower = follower
        self.upstream = upstream
        self.token = token
        self.local = Replayer(hub, _NoHistory(), stored_symbol=lambda topic: None,  # type: ignore[arg-type]
                              budget_bytes=budget_bytes)
        self.fetched = 0
        self.partial = 0
        self.sqlite_reads = 0      # a relay reads none: its upstream does

    async def prepare(self, topics: list[str], last_id: str, client: str = "") -> Callable[[], Backlog]:
        after = EventId.parse(last_id)
        if after is None:  # an id no monkestream gave: a reset, as the upstream would say
            return await self.local.prepare(topics, last_id)
        reached = await self.follower.reach(after)
        if reached and self._covered(topics, after):
            return await self.local.prepare(topics, last_id)
        fetched = await self._fetch(topics, last_id, client)
        return lambda: self._merge(topics, after, fetched)

    def _covered(self, topics: list[str], after: EventId) -> bool:
        hub = self.hub
        if topics == [EVERY_TOPIC]:
            got = hub.replay_all(after)
            return got is not None and not got[1]
        return all(hub.replay(topic, after) is not None for topic in topics)

    async def _fetch(self, topics: list[str], last_id: str, client: str) -> Fetched:
        """The upstream's backlog for this resume, read up to its position (or its end)."""
        self.fetched += 1
        frames: list[tuple[EventId | None, bytes]] = []
        try:
            return await within(self.upstream.scheduler, FETCH_TIMEOUT_S,
                                self._read_backlog(topics, last_id, client, frames))
        except (UpstreamError, OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.debug("a resume from the upstream failed: %s", exc)
        return Fetched(frames, None)  # what came before the failure: the client resumes for the rest

    async def _read_backlog(self, topics: list[str], last_id: str, client: str,
                            frames: list[tuple[EventId | None, bytes]]) -> Fetched:
        target = "/events?" + "&".join("topic=" + quote(t, safe=":*") for t in topics)
        named = [("X-Forwarded-For", client)] if client else []  # the upstream's per-client cap is the client's
        body = await self.upstream.stream(target, [("Last-Event-ID", last_id), *named, *token_headers(self.token)])
        try:
            if body.status != 200:
                return Fetched([], None)
            buffer = b""
            async for data in body:
                got, buffer = split_frames(buffer + data)
                for frame in got:
                    if frame.data is None:  # the upstream's position: the backlog is whole
                        return Fetched(frames, EventId.parse(frame.id or ""))
                    frames.append((EventId.parse(frame.id) if frame.id else None, frame.raw))
        finally:
            body.close()
        return Fetched(frames, None)

    def _merge(self, topics: list[str], after: EventId, fetched: Fetched) -> Backlog:
        hub = self.hub
        here = hub.last_id()
        notices = [frame for event_id, frame in fetched.frames if event_id is None]
        if after > here:  # the client is ahead of this relay: it comes back once the relay caught up
            self.partial += 1
            return Backlog(notices, complete=bool(notices) and fetched.position is not None)
        frames = notices + [frame for event_id, frame in fetched.frames if event_id is not None and event_id <= here]
        position = fetched.position
        if position is None:
            self.partial += 1
            return Backlog(frames, complete=False)
        if position < here:  # the relay's ring from the upstream's position on
            every = topics == [EVERY_TOPIC]
            tail = None
            if every:
                got = hub.replay_all(position)
                tail = [(e.id, label_frame(e.topic, True, e.frame)) for e in got[0]] if got and not got[1] else None
            else:
                parts = [hub.replay(topic, position) for topic in topics]
                if all(part is not None for part in parts):
                    tail = sorted((e.id, e.frame) for part in parts for e in part or ())
            if tail is None:
                self.partial += 1
                return Backlog(frames, complete=False)
            frames += [frame for _id, frame in tail]
        return Backlog(frames)


class Forwarder:
    """The routes a relay answers through its upstream (Rule 5)."""

    def __init__(self, upstream: Upstream, *, token: str) -> None:
        self.upstream = upstream
        self.token = token
        self.forwarded = 0
        self.failed = 0

    def register(self, router: Router) -> None:
        for method, pattern in FORWARDED:
            router.add(method, pattern, self.forward, router.description(method, pattern) + " (by the upstream)")

    async def forward(self, ex: Exchange) -> Response:
        request = ex.request
        headers = [(k, v) for k, v in request.headers if k not in _NOT_FORWARDED]
        headers += [("X-Forwarded-For", ex.client), *([(RELAY_TOKEN_HEADER, self.token)] if self.token else [])]
        target = request.target if request.target.startswith("/") else request.path + (
            "?" + request.query if request.query else "")
        try:
            answer = await self.upstream.request(request.method, target, headers, request.body)
        except UpstreamError as exc:
            self.failed += 1
            log.debug("forwarding %s %s failed: %s", request.method, request.path, exc)
            raise HTTPError(503, "the upstream is unreachable; retry shortly",
                            [("Retry-After", str(WRITE_RETRY_S))]) from None
        self.forwarded += 1
        return Response(answer.status, answer.body, answer.header("content-type") or "application/json",
                        [(k.title(), v) for k, v in answer.headers if k in _PASSED_BACK])


async def warm_charts(upstream: Upstream, charts: ChartCache, token: str) -> int:
    """Rule 6: the upstream's symbols and chart points into ``charts``; how many symbols."""
    answer = await upstream.request("GET", "/symbols", token_headers(token))
    if answer.status != 200:
        raise UpstreamError(f"GET /symbols: status {answer.status}")
    latest = {}
    for item in loads(answer.body)["symbols"]:
        ticker = _ticker_of(item)
        if ticker is not None:
            latest[ticker.symbol] = ticker
            charts.note_latest(ticker)
    for window in WINDOWS:
        answer = await upstream.request("GET", f"/charts?window={window}", token_headers(token))
        if answer.status != 200:
            raise UpstreamError(f"GET /charts: status {answer.status}")
        for symbol, points in json.loads(answer.body, parse_float=str, parse_int=str)["charts"].items():
            currency = latest[symbol].currency if symbol in latest else "USD"
            charts.warm(window, [Ticker(symbol, str(p["price"]), currency, int(p["t"])) for p in points])
    return len(latest)


class Relay:
    """A relay's parts, as the app holds them: the upstream, the follower, the replayer, the forwarder."""

    def __init__(self, hub: Hub, charts: ChartCache, *, url: str, token: str, budget_bytes: int,
                 scheduler: Scheduler) -> None:
        self.upstream = Upstream(url, scheduler=scheduler)
        self.charts = charts
        self.token = token
        self.presence = UpstreamPresence(self.upstream, token_headers(token))
        self.follower = Follower(hub, self.upstream, charts, token=token, scheduler=scheduler,
                                 presence=self.presence)
        self.replayer = RelayReplayer(hub, self.follower, self.upstream, token=token, budget_bytes=budget_bytes)
        self.forwarder = Forwarder(self.upstream, token=token)
        self.scheduler = scheduler
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Warm the charts and follow the upstream; returns once the relay holds its position."""
        said = False
        while True:
            try:
                symbols = await warm_charts(self.upstream, self.charts, self.token)
                break
            except (UpstreamError, ValueError, KeyError, TypeError) as exc:
                if not said:
                    log.warning("waiting for the upstream %s: %s", self.upstream.url, exc)
                    said = True
                await self.scheduler.sleep(BACKOFF_MAX_S * random.uniform(0.1, 0.3))
        log.info("charts warmed from the upstream: %d symbols", symbols)
        self._task = asyncio.create_task(self.follower.run(), name="relay-follower")
        await self.follower.ready.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.presence.close()
        self.upstream.close()

    def health(self) -> dict[str, object]:
        follower = self.follower
        return {"state": "connected" if follower.connected else "reconnecting",
                "since": round(follower.since, 3), "lastError": follower.last_error,
                "events": follower.events, "connects": follower.connects, "resets": follower.resets}
