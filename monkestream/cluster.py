"""A node of a cluster: the parts of the server that go through the broker's log (``--broker``).

Theory of operation
-------------------
Rule 1: writes go to the log, reads come from it. Ingest, comments and
        deletions are appended to the log (broker Rule 2) and answered once
        Redis took them; the node's ``Applier`` then does, for every entry
        read, what a single process does on a write: a comment is written
        to SQLite before it is published, a deletion deleted first, prices
        are published and so reach the store and chart pipelines. So every
        node holds the same history and comments, under the same ids. Ingest
        refuses (503) while this node has not applied what it appended
        ``LOG_BEHIND_MAX_S`` ago, so feeders cannot run the log past the nodes.
Rule 2: resume anywhere. A stream resuming after id A is owed every event of
        its topics after A: from the hub's rings while they reach back to A,
        else from the log (XRANGE) while it holds A, else for a ticker topic
        from SQLite while this node's SQLite holds the log continuously from
        A, then the ring; else a ``reset``. An id ahead of this node's reader
        (its events were read by another node first) is waited for briefly.
Rule 3: chat is cluster-wide. A comment's id comes from one Redis counter
        (raised past the largest id the posting node holds, should Redis
        have come back empty);
        the comment rate is counted per client in Redis, in windows of
        ``burst / rate`` seconds. Presence is a sorted set per room of
        ``user|node`` entries that expire ``PRESENCE_TTL_S`` after their
        last renewal: each node renews its own, and any node removes expired
        ones. ``user_joined`` and ``user_left`` go through the log when a
        user's first entry in a room appears and its last one goes, so a
        user with tabs on two nodes is one member, and the members of a dead
        node leave within ``PRESENCE_TTL_S`` plus a sweep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from typing import Any, Callable

from . import params
from .broker import Broker, Entry, packed_fields, parse_id
from .charts import ChartCache
from .chat import Chat, Membership, _key_hash, parse_room, room_topic
from .config import Config
from .errors import Unavailable
from .hub import Backlog, Event, Hub, TopicLimit
from .ingest import BEHIND_RETRY_S, MAX_UNPERSISTED, SYMBOLS_TOPIC, TOPICS_RETRY_S, Ingest, IngestRefused, TooManyTopics
from .jsontext import dumps
from .replay import Replayer, Stored
from .routing import Exchange, HTTPError, Response, json_response
from .sse import EventId, encode_event
from .store import Comment, Store
from .ticker import InvalidTicker, Ticker, _new_ticker, parse_ticker, parse_tickers, ticker_topic
from .tickers import TickerRoutes, array

log = logging.getLogger("monkestream")

PRESENCE_TTL_S = 20.0         # an entry not renewed for this long is gone (its node died)
PRESENCE_RENEW_S = 5.0        # how often a node renews its own entries
PRESENCE_SWEEP_S = 2.0        # how often a node looks for expired entries
APPLIED_WAIT_S = 3.0          # how long a write waits to be applied here, or a resume for its id
PRESENCE_LEAVE_WAIT_S = 2.0   # a stopping node waits this long for its users' leaves to reach Redis
LOG_BEHIND_MAX_S = 2.0        # ingest refuses while this node has not applied what it appended this long ago
LOG_SCAN_MAX = 100_000        # log entries one resume reads at most
WAIT_BACKPRESSURE_S = 0.05    # while SQLite is behind, the reader waits this long between checks
LIVE_ONLY = frozenset({"user_joined", "user_left"})

# The next comment id: never one this node has seen, even from a Redis that came back empty (Rule 3)
NEXT_ID_SCRIPT = ("local id = redis.call('INCR', KEYS[1]) "
                  "if id <= tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) id = redis.call('INCR', KEYS[1]) end "
                  "return id")
# Presence scripts (Rule 3), atomic in Redis. KEYS[1]: the room's set; ARGV: entry, expiry, now, "user|".
_OTHERS = """
local others = 0
for _, e in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')) do
  if e ~= ARGV[1] and string.sub(e, 1, #ARGV[4]) == ARGV[4] then others = others + 1 end
end
"""
JOIN_SCRIPT = _OTHERS + "redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) return others"
LEAVE_SCRIPT = _OTHERS + "redis.call('ZREM', KEYS[1], ARGV[1]) return others"
# an expired entry removed: 1 when this call removed it and it was the user's last
EXPIRE_SCRIPT = ("local score = redis.call('ZSCORE', KEYS[1], ARGV[1]) "
                 "if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end "
                 "redis.call('ZREM', KEYS[1], ARGV[1]) "
                 "for _, e in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')) do "
                 "if string.sub(e, 1, #ARGV[3]) == ARGV[3] then return 0 end end return 1")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Applier:
    """Publishes what the log holds on this node's hub, writing comments to SQLite first (Rule 1)."""

    def __init__(self, hub: Hub, store: Store, charts: ChartCache, ingest: LogIngest,
                 presence: ClusterPresence) -> None:
        self.hub = hub
        self.store = store
        self.charts = charts
        self.ingest = ingest
        self.presence = presence
        self.applied = EventId(0, 0)
        self.dropped = 0                 # entries a full topic budget kept off the hub
        self.malformed = 0               # entries no node wrote
        self.max_comment_id = 0          # the largest comment id this node holds
        self._waiters: list[tuple[EventId, asyncio.Future[bool]]] = []

    async def apply(self, entries: list[Entry]) -> None:
        ingest = self.ingest
        while ingest.unpersisted and ingest.unpersisted + len(entries) > MAX_UNPERSISTED:
            await self.hub.scheduler.sleep(WAIT_BACKPRESSURE_S)  # SQLite is behind: the log waits, memory does not grow
        hub, charts = self.hub, self.charts
        publish = hub.publish
        prices: list[Event] = []
        note_latest = charts.note_latest
        for event_id, flat in entries:
            if len(flat) == 8 and flat[3] == b"price_update" and flat[6] == b"p" and flat[0] == b"t":
                try:  # a price, as packed_fields laid it out: t, n, d, p
                    symbol, price, currency, created = flat[7].decode().split("\t")
                    ticker = _new_ticker((symbol, price, currency, int(created)))
                    prices.append(publish(flat[1].decode(), "price_update", ticker, json_text=flat[5].decode(),
                                          event_id=event_id))
                    note_latest(ticker)
                    continue
                except (TopicLimit, ValueError, UnicodeDecodeError):
                    pass  # counted below, where every entry is read by its field names
            pairs = iter(flat)
            fields = dict(zip(pairs, pairs))
            try:
                name = fields[b"n"].decode()
                topic = fields[b"t"].decode()
                text = fields[b"d"].decode()
                if name == "price_update":
                    symbol, price, currency, created = fields[b"p"].decode().split("\t")
                    ticker = _new_ticker((symbol, price, currency, int(created)))
                    prices.append(publish(topic, name, ticker, json_text=text, event_id=event_id))
                    note_latest(ticker)
                elif name == "symbol_added":
                    symbol, price, currency, created = fields[b"p"].decode().split("\t")
                    if symbol not in charts.latest and topic in hub.topics:
                        publish(topic, name, Ticker(symbol, price, currency, int(created)), json_text=text,
                                event_id=event_id)
                elif name == "comment_posted":
                    data = json.loads(text)
                    comment = Comment(data["id"], data["room"], data["user"], data["text"], data["createdAt"])
                    await self._stored(self.store.put_comment(comment, fields[b"k"].decode()))
                    self.max_comment_id = max(self.max_comment_id, comment.id)
                    publish(topic, name, data, json_text=text, event_id=event_id)
                elif name == "comment_deleted":
                    data = json.loads(text)
                    if await self._stored(self.store.delete_comment(data["room"], data["id"])):
                        publish(topic, name, data, json_text=text, event_id=event_id)
                elif name in LIVE_ONLY:
                    data = json.loads(text)
                    self.presence.seen(name, data["room"], data["user"])
                    if topic in hub.topics:
                        publish(topic, name, data, json_text=text, event_id=event_id, keep=False)
            except TopicLimit:
                self.dropped += 1
            except (KeyError, ValueError, UnicodeDecodeError) as exc:  # not written by a node: skipped, said once
                if not self.malformed:
                    log.error("broker: log entry %s is not one of ours (%r); skipped", event_id, exc)
                self.malformed += 1
            self.applied = event_id
        if entries:
            self.applied = entries[-1][0]
        if prices:
            ingest.logged(prices)
        self._wake()

    async def _stored(self, write: Any) -> Any:
        """A SQLite write, retried while the disk refuses it: what the log holds is never skipped."""
        while True:
            try:
                return await write
            except Unavailable:
                await self.hub.scheduler.sleep(1.0)

    def _wake(self) -> None:
        applied = self.applied
        keep = []
        for event_id, future in self._waiters:
            if event_id <= applied:
                if not future.done():
                    future.set_result(True)
            elif not future.done():  # a waiter cancelled meanwhile is dropped
                keep.append((event_id, future))
        self._waiters = keep

    async def wait(self, event_id: EventId, timeout: float = APPLIED_WAIT_S) -> bool:
        """Wait until this node has applied ``event_id``; False after ``timeout``."""
        if event_id <= self.applied:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((event_id, future))
        timer = self.hub.scheduler.call_later(timeout, lambda: future.done() or future.set_result(False))
        try:
            applied = await future
        finally:
            timer.cancel()
        if not applied:  # an id this node may never read (from the future, or another log): forget it
            self._waiters = [(i, f) for i, f in self._waiters if f is not future]
        return applied


def _ticker_entry(topic: str, name: str, ticker: Ticker, text: str) -> bytes:
    return packed_fields(topic, name, text, f"{ticker.symbol}\t{ticker.price}\t{ticker.currency}\t{ticker.created_at}")


class LogIngest(Ingest):
    """Ingest through the log: tickers are appended, all or none, and published when read back."""

    def __init__(self, broker: Broker, hub: Hub, charts: ChartCache, **kwargs: Any) -> None:
        super().__init__(hub, charts, **kwargs)
        self.broker = broker
        self.applied: Callable[[], EventId] = lambda: EventId(0, 0)   # the last entry this node applied
        self._tasks: set[asyncio.Task[None]] = set()

    def check_capacity(self, count: int = 0) -> None:
        """Ingest's limits, and one more: this node applies what it appends (Rule 1).

        While its reader is more than LOG_BEHIND_MAX_S behind the node's own last
        append, it refuses, so a feeder cannot push the log past what the nodes
        apply, until retention trims what they have not read.
        """
        super().check_capacity(count)
        behind_ms = self.broker.last_appended.epoch - self.applied().epoch
        if behind_ms > LOG_BEHIND_MAX_S * 1000:
            raise IngestRefused(f"this node is {behind_ms / 1000:.1f} s behind the log; retry shortly",
                                BEHIND_RETRY_S)

    async def append(self, tickers: list[Ticker], texts: list[str]) -> None:
        """Append validated tickers to the log in one pipeline (all or none); Unavailable while Redis is down."""
        self.check_capacity(len(tickers))
        hub = self.hub
        topics = {symbol: ticker_topic(symbol) for symbol in {t.symbol for t in tickers}}
        new = [name for name in topics.values() if name not in hub.topics]
        try:  # the new symbols fit this node's budget of topics, or none is taken
            hub.reserve(new)
        except TopicLimit:
            raise TooManyTopics("too many symbols", TOPICS_RETRY_S) from None
        hub.release(new)
        entries = [_ticker_entry(SYMBOLS_TOPIC, "symbol_added", t, t.to_json()) for t in self._first_seen(tickers)]
        entries += [_ticker_entry(topics[t.symbol], "price_update", t, text) for t, text in zip(tickers, texts)]
        await self.broker.append(entries)

    def publish(self, tickers: list[Ticker], texts: list[str] | None = None) -> list[Event]:
        """For the demo feed: the tickers are appended in the background; a refusal is only logged."""
        task = asyncio.get_running_loop().create_task(self._append_quietly(tickers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return []

    async def _append_quietly(self, tickers: list[Ticker]) -> None:
        try:
            await self.append(tickers, [t.to_json() for t in tickers])
        except (Unavailable, IngestRefused) as exc:
            log.debug("demo prices not appended: %s", exc)

    def logged(self, events: list[Event]) -> None:
        """Prices read from the log were published here: SQLite owes them (ingest Rule 3)."""
        self.unpersisted += len(events)
        self._unwritten.append((self.scheduler.now(), events[-1].id))  # type: ignore[arg-type]


class LogTickerRoutes(TickerRoutes):
    """The price routes, answering 201 only once the log holds the prices."""

    ingest: LogIngest

    async def post_price(self, ex: Exchange) -> Response:  # type: ignore[override]
        return await self._appending(self._append_price, ex)

    async def post_tickers(self, ex: Exchange) -> Response:  # type: ignore[override]
        return await self._appending(self._append_tickers, ex)

    async def _appending(self, handler: Callable[[Exchange], Any], ex: Exchange) -> Response:
        try:
            response = await handler(ex)
        except (InvalidTicker, TooManyTopics) as exc:
            error: Exception = params.http_error(exc)
        except HTTPError as exc:
            error = exc
        except Unavailable as exc:
            self._count(503)
            raise exc from None
        except Exception as exc:  # IngestRefused
            if not hasattr(exc, "retry_after"):
                raise
            error = params.http_error(exc)  # type: ignore[arg-type]
        else:
            self._count(response.status)
            return response
        self._count(getattr(error, "status", 500))
        raise error from None

    async def _append_price(self, ex: Exchange) -> Response:
        self.authorize(ex.request)
        symbol = params.symbol(ex)
        ticker = parse_ticker(params.json_body(ex), symbol)
        text = ticker.to_json()
        await self.ingest.append([ticker], [text])
        return Response(201, text.encode())

    async def _append_tickers(self, ex: Exchange) -> Response:
        self.authorize(ex.request)
        self.ingest.check_capacity()
        tickers = parse_tickers(params.json_body(ex))
        texts = [t.to_json() for t in tickers]
        await self.ingest.append(tickers, texts)
        return Response(201, array(texts).encode())


class Held(Stored):
    """A topic's events read from the log or SQLite, complete up to ``upto``."""

    __slots__ = ("upto",)

    def __init__(self, rows: list[tuple[EventId, bytes]], complete: bool, upto: EventId) -> None:
        super().__init__(rows, complete)
        self.upto = upto


class LogReplayer(Replayer):
    """Rule 2: rings, then the log, then SQLite, then ``reset``."""

    def __init__(self, broker: Broker, applier: Applier, hub: Hub, store: Store, **kwargs: Any) -> None:
        super().__init__(hub, store, **kwargs)
        self.broker = broker
        self.applier = applier
        self.log_reads = 0

    async def prepare(self, topics: list[str], last_id: str, client: str = "") -> Callable[[], Backlog]:
        after = EventId.parse(last_id)
        if after is None:
            return lambda: self._build(topics, last_id, None, {})
        hub = self.hub
        if after > hub.last_id():  # read by another node first: this one will read it soon
            await self.applier.wait(after)
        end = hub.last_id()
        stored: dict[str, Stored | None] = {}
        missing = [t for t in topics if hub.replay(t, after) is None]
        if missing and after <= end:
            stored.update(await self._from_log(missing, after, end))
            rest = [t for t in missing if stored.get(t) is None and self._stored_symbol(t) is not None]
            if rest and after >= self.broker.since and after.epoch >= self.store.pruned_before * 1000:
                stored.update(await self._from_sqlite(rest, after))
        return lambda: self._build(topics, last_id, after, stored)

    async def _from_log(self, topics: list[str], after: EventId, end: EventId) -> dict[str, Stored | None]:
        broker = self.broker
        try:
            if not await broker.holds(after):
                return {}
            rows: dict[str, list[tuple[EventId, bytes]]] = {t: [] for t in topics}
            position, scanned, size, complete = after, 0, 0, True
            self.log_reads += 1
            while position < end:
                chunk = await broker.range(position, end)
                if not chunk:
                    break
                for event_id, fields in chunk:
                    topic = fields.get(b"t", b"").decode()
                    name = fields.get(b"n", b"").decode()
                    if topic in rows and name not in LIVE_ONLY:
                        frame = encode_event(name, fields[b"d"].decode(), f"{event_id.epoch}-{event_id.seq}")
                        rows[topic].append((event_id, frame))
                        size += len(frame)
                position = chunk[-1][0]
                scanned += len(chunk)
                if scanned >= LOG_SCAN_MAX or size > self.budget_bytes:
                    complete = False
                    break
        except Unavailable:
            return {}
        except Exception:  # noqa: BLE001 - Redis down: the other sources, or a reset
            return {}
        if not complete and not any(rows.values()):
            return {}  # no progress to give: the other sources, or a reset
        return {t: Held(r, complete, position if complete else (r[-1][0] if r else after)) for t, r in rows.items()}

    async def _from_sqlite(self, topics: list[str], after: EventId) -> dict[str, Stored | None]:
        """The replayer's own SQLite read, each part complete up to what SQLite held when it began."""
        upto = self.store.log_applied
        got = await self._read(topics, after)
        return {t: None if part is None else Held(part.rows, part.complete, upto) for t, part in got.items()}

    def _topic(self, topic: str, after: EventId, stored: Stored | None) -> list[tuple[EventId, bytes]] | None:
        hub = self.hub
        events = hub.replay(topic, after)
        if events is not None:
            return [(e.id, e.frame) for e in events]
        if not isinstance(stored, Held):
            return None
        if not stored.complete:
            return stored.rows
        mark = max([stored.upto, after, *(i for i, _f in stored.rows[-1:])])
        tail = hub.replay(topic, mark)
        if tail is None:
            return None
        return stored.rows + [(e.id, e.frame) for e in tail]


class ClusterPresence:
    """Who is in which room across the cluster (Rule 3): this node's streams, Redis's entries, and a cache."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.scheduler = broker.hub.scheduler
        self.local: dict[str, dict[str, int]] = {}       # room -> user -> this node's streams
        self.members: dict[str, set[str]] = {}           # room -> users present anywhere, as last known
        self._tasks: set[asyncio.Task[None]] = set()
        self.rooms_key = broker.prefix + "presence:rooms"

    def key(self, room: str) -> str:
        return self.broker.prefix + "presence:" + room

    def entry(self, user: str) -> str:
        return f"{user}|{self.broker.node}"

    def seen(self, name: str, room: str, user: str) -> None:
        """A presence event read from the log."""
        if name == "user_joined":
            self.members.setdefault(room, set()).add(user)
        else:
            users = self.members.get(room)
            if users is not None:
                users.discard(user)

    def list(self, room: str, user: str) -> list[str]:
        return sorted(self.members.get(room, set()) | {user})

    def join(self, room: str, user: str) -> None:
        users = self.local.setdefault(room, {})
        users[user] = users.get(user, 0) + 1
        if users[user] == 1:
            self._spawn(self._joined(room, user))

    def leave(self, room: str, user: str) -> None:
        users = self.local.get(room)
        if not users or user not in users:
            return
        users[user] -= 1
        if users[user]:
            return
        del users[user]
        if not users:
            del self.local[room]
        self._spawn(self._left(room, user))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _change(self, script: str, room: str, user: str, expiry: float = 0) -> bool:
        """Run a presence script atomically; whether the user has no other live entry in the room."""
        others = await self.broker.writer.eval(script, 1, self.key(room), self.entry(user), int(expiry), _now_ms(),
                                               user + "|")
        return int(others) == 0

    async def _joined(self, room: str, user: str) -> None:
        try:
            await self.broker.writer.sadd(self.rooms_key, room)
            if await self._change(JOIN_SCRIPT, room, user, _now_ms() + PRESENCE_TTL_S * 1000):
                await self._tell("user_joined", room, user)
        except Exception as exc:  # noqa: BLE001 - renewed, or swept, later
            log.debug("presence join not recorded: %s", exc)

    async def _left(self, room: str, user: str) -> None:
        try:
            if user in self.local.get(room, {}):
                return  # back already
            if await self._change(LEAVE_SCRIPT, room, user):
                await self._tell("user_left", room, user)
        except Exception as exc:  # noqa: BLE001 - its entry expires instead
            log.debug("presence leave not recorded: %s", exc)

    async def _tell(self, name: str, room: str, user: str) -> None:
        await self.broker.append([{"t": room_topic(room), "n": name, "d": dumps({"room": room, "user": user})}])

    async def run(self) -> None:
        """Renew this node's entries, remove expired ones, refresh the cache; forever."""
        renewed = 0.0
        while True:
            try:
                if time.monotonic() - renewed >= PRESENCE_RENEW_S:
                    await self._renew()
                    renewed = time.monotonic()
                await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: next time
                log.debug("presence upkeep failed: %s", exc)
            await self.scheduler.sleep(PRESENCE_SWEEP_S)

    async def _renew(self) -> None:
        expiry = _now_ms() + PRESENCE_TTL_S * 1000
        writer = self.broker.writer
        for room, users in list(self.local.items()):
            await writer.sadd(self.rooms_key, room)
            await writer.zadd(self.key(room), {self.entry(u): expiry for u in users})

    async def _sweep(self) -> None:
        writer = self.broker.writer
        now = _now_ms()
        for raw in await writer.smembers(self.rooms_key):
            room = raw.decode()
            key = self.key(room)
            for expired in await writer.zrangebyscore(key, "-inf", now):
                user = expired.rpartition(b"|")[0].decode()
                gone = await writer.eval(EXPIRE_SCRIPT, 1, key, expired, now, user + "|")
                if int(gone):  # only the node that removed it tells, and only if it was the user's last
                    await self._tell("user_left", room, user)
            live = await writer.zrangebyscore(key, now, "+inf")
            users = {e.rpartition(b"|")[0].decode() for e in live}
            if users:
                self.members[room] = users
            else:
                self.members.pop(room, None)
                if not await writer.zcard(key):
                    await writer.srem(self.rooms_key, room)


class ClusterMembership(Membership):
    """A stream's user, present in its rooms across the cluster (Rule 3)."""

    def __init__(self, hub: Hub, presence: ClusterPresence, rooms: list[str], user: str) -> None:
        super().__init__(hub, None, rooms, user)  # type: ignore[arg-type]
        self.cluster = presence

    def attached(self) -> list[bytes]:
        for room in self.rooms:
            self.cluster.join(room, self.user)
        self.joined = True
        return [encode_event("members", dumps({"room": room, "users": self.cluster.list(room, self.user)}))
                for room in self.rooms]

    def closed(self) -> None:
        if self.joined:
            for room in self.rooms:
                self.cluster.leave(room, self.user)


class ClusterChat(Chat):
    """The chat routes, through the log (Rules 1 and 3)."""

    def __init__(self, broker: Broker, applier: Applier, presence: ClusterPresence, config: Config,
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broker = broker
        self.applier = applier
        self.cluster = presence
        self.window_s = max(1.0, config.comment_burst / config.comment_rate)
        self.burst = config.comment_burst

    def membership(self, topics: list[str], user: str | None, client: str) -> Membership | None:
        local = super().membership(topics, user, client)  # the join rate stays per node
        if local is None:
            return None
        return ClusterMembership(self.hub, self.cluster, local.rooms, local.user)

    async def _allow(self, client: str) -> None:
        """The comment rate, counted in Redis for every node (Rule 3); HTTPError 429 beyond it."""
        now = time.time()
        window = int(now // self.window_s)
        key = f"{self.broker.prefix}rate:comment:{client}:{window}"
        writer = self.broker.writer

        async def count() -> int:
            async with writer.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, int(self.window_s) + 1)
                got, _ = await pipe.execute()
            return int(got)
        if await self.broker.call(count) > self.burst:
            self.comments_refused += 1
            retry = max(1, math.ceil((window + 1) * self.window_s - now))
            raise HTTPError(429, "too many comments; slow down", [("Retry-After", str(retry))])

    async def post_comment(self, ex: Exchange) -> Response:
        room, user, text = self.comment_request(ex)
        topic = room_topic(room)
        self._reserve(topic)  # the room fits this node's budget (chat Rule 8)
        self.hub.release([topic])
        await self._allow(ex.client)
        key = secrets.token_urlsafe(18)
        comment_id = int(await self.broker.call(self.broker.writer.eval, NEXT_ID_SCRIPT, 1,
                                                self.broker.prefix + "comment_id", self.applier.max_comment_id))
        comment = Comment(comment_id, room, user, text, int(time.time()))
        [raw_id] = await self.broker.append([{"t": topic, "n": "comment_posted", "d": dumps(comment.to_dict()),
                                              "k": _key_hash(key)}])
        event_id = parse_id(raw_id)
        self.comments_posted += 1
        await self.applier.wait(event_id)  # so that this node's GET sees it at once
        return json_response({**comment.to_dict(), "deleteKey": key}, 201)

    async def delete_comment(self, ex: Exchange) -> Response:
        room = parse_room(ex.params["room"])
        comment_id = params.integer(ex.params["comment_id"], "id", 0, 2**63 - 1)
        request = ex.request
        if "key" in request.query_params():
            raise HTTPError(400, "key: send the deletion key in the X-Delete-Key header, never in the URL")
        key = request.header("x-delete-key")
        stored = await self.store.comment_key(room, comment_id)
        if stored is None:
            raise HTTPError(404, "no such comment")
        if not self.has_token(request):
            if key is None:
                from .auth import CHALLENGE
                raise HTTPError(401, "the deletion key (X-Delete-Key) or the publish token is required", [CHALLENGE])
            import hmac
            if not hmac.compare_digest(_key_hash(key), stored):
                raise HTTPError(403, "the deletion key does not match")
        [raw_id] = await self.broker.append([{"t": room_topic(room), "n": "comment_deleted",
                                              "d": dumps({"id": comment_id, "room": room})}])
        event_id = parse_id(raw_id)
        self.comments_deleted += 1
        await self.applier.wait(event_id)
        return Response(204)


class Node:
    """The broker and this node's parts that use it, built for ``App`` (which stays the wiring)."""

    def __init__(self, config: Config, hub: Hub, store: Store, charts: ChartCache) -> None:
        self.config = config
        self.hub = hub
        self.store = store
        self.broker = Broker(config.broker, config.broker_retention, hub)
        self.presence = ClusterPresence(self.broker)
        self.applier: Applier | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def ingest(self, hub: Hub, charts: ChartCache, **kwargs: Any) -> LogIngest:
        ingest = LogIngest(self.broker, hub, charts, **kwargs)
        applier = self.applier = Applier(hub, self.store, charts, ingest, self.presence)
        ingest.applied = lambda: applier.applied
        self.broker.apply = self.applier.apply
        return ingest

    def replayer(self, hub: Hub, store: Store, **kwargs: Any) -> LogReplayer:
        assert self.applier is not None, "the ingest is built first"
        return LogReplayer(self.broker, self.applier, hub, store, **kwargs)

    def chat(self, *args: Any, **kwargs: Any) -> ClusterChat:
        assert self.applier is not None, "the ingest is built first"
        return ClusterChat(self.broker, self.applier, self.presence, self.config, *args, **kwargs)

    tickers = LogTickerRoutes

    async def start(self) -> None:
        """Resume the log from where this node's SQLite left it, and keep reading it (broker Rule 3)."""
        broker, hub, store = self.broker, self.hub, self.store
        state = await store.log_state()
        broker.marker = state.get("marker")
        broker.position = _parse(state.get("applied"))
        broker.since = _parse(state.get("since"))
        store.log_applied = broker.position
        hub.epoch, hub.seq = broker.position
        hub.origin = broker.position
        assert self.applier is not None
        self.applier.applied = broker.position
        self.applier.max_comment_id = await store.max_comment_id()

        async def remember() -> None:
            await store.set_log_state(marker=broker.marker or "", since=_fmt(broker.since))
        broker.on_change = remember
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(broker.run(), name="broker"),
                       loop.create_task(self.presence.run(), name="presence")]

    async def stop(self) -> None:
        """After the streams ended: their users leave (briefly waited for), then the reading stops."""
        leaving = list(self.presence._tasks)
        if leaving:
            await asyncio.wait(leaving, timeout=PRESENCE_LEAVE_WAIT_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - ended either way
                pass

    async def close(self) -> None:
        await self.broker.close()


def _parse(text: str | None) -> EventId:
    return EventId.parse(text) if text and EventId.parse(text) is not None else EventId(0, 0)  # type: ignore[return-value]


def _fmt(event_id: EventId) -> str:
    return f"{event_id.epoch}-{event_id.seq}"


__all__ = ["Node"]
