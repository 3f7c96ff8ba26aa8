"""The broker: several nodes made one service by one Redis Stream, the log of every event.

Theory of operation
-------------------
Rule 1: one log. Every accepted event is appended to one Redis Stream
        (XADD), and a node publishes on its hub only what it reads back
        (XREAD), under the entry's id. Redis ids are ``MS-SEQ``, the form of
        the hub's ``EPOCH-SEQ`` ids, so every node delivers the same events
        in the same order under the same ids, and ``Last-Event-ID`` means
        the same on every node.
Rule 2: a write is answered only after Redis took it: a batch of entries is
        one MULTI/EXEC pipeline, all or none (the writes asked for while one
        is in flight share the next). While Redis cannot be reached,
        writes raise ``Unavailable`` (503 with Retry-After) and the reader
        reconnects with jittered backoff, from the last id it read.
Rule 3: a lost log is noticed, never a silent gap. The log has a run
        marker (a random token under its own key). A node that finds the
        marker changed, its last id no longer in the log (trimmed past it),
        or the log's last id behind its own, counts one gap, logs it once,
        shows it on /healthz, moves its hub's origin past every id it has
        issued (streams from before resume with ``reset``), closes its open
        streams so they do, and reads the log from its start.
Rule 4: Redis trims the log as it appends (``MAXLEN ~`` or ``MINID ~``, by
        ``--broker-retention``): its memory is bounded, by events or by age.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import secrets
import time
from typing import Any, Awaitable, Callable

from .errors import ConfigError, Unavailable
from .hub import CloseReason, Hub
from .sse import EventId

log = logging.getLogger("monkestream")

KEY_PREFIX = "monkestream:"      # every key the service uses starts with this
READ_COUNT = 5000                # entries per XREAD
READ_BLOCK_MS = 1000             # how long one XREAD waits for new entries
RANGE_COUNT = 1000               # entries per XRANGE of a resume
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
RETRY_AFTER_S = 2                # what a writer is told while Redis cannot be reached
WRITE_TIMEOUT_S = 5.0
FLOOR_NAME = "_floor"            # an entry that only raises the log's ids past a lost log's (Rule 3)
RETENTION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PACKAGE_HINT = "pip install 'monkestream[redis]'"

Entry = tuple[EventId, list[bytes]]          # an entry read: its id, its fields and values in a row
Ranged = tuple[EventId, dict[bytes, bytes]]   # an entry of a range read: its fields by name
Fields = dict[str, str] | bytes   # an entry to append: its fields, or packed_fields()


def packed_fields(topic: str, name: str, data: str, extra: str) -> bytes:
    """The fields t, n, d, p of an entry, already in the Redis protocol (a bulk's prices are packed once)."""
    t, n, d, p = topic.encode(), name.encode(), data.encode(), extra.encode()
    return (b"$1\r\nt\r\n$%d\r\n%s\r\n$1\r\nn\r\n$%d\r\n%s\r\n$1\r\nd\r\n$%d\r\n%s\r\n$1\r\np\r\n$%d\r\n%s\r\n"
            % (len(t), t, len(n), n, len(d), d, len(p), p))


def parse_retention(text: str) -> tuple[int, float]:
    """``--broker-retention``: ``N`` events, or an age ``Ns``/``Nm``/``Nh``/``Nd``; (events, seconds), one of them 0."""
    m = RETENTION_RE.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"--broker-retention: {text!r} is neither a count of events nor an age like 24h")
    number, unit = m.groups()
    if not unit:
        if "." in number or int(number) < 1:
            raise ConfigError("--broker-retention: a count of events is a whole number, at least 1")
        return int(number), 0.0
    seconds = float(number) * UNITS_S[unit]
    if seconds < 1:
        raise ConfigError("--broker-retention: an age is at least 1s")
    return 0, seconds


def check_url(url: str) -> None:
    if not re.fullmatch(r"rediss?://[^\s/]+(/\d+)?/?", url):
        raise ConfigError("--broker: must look like redis://[user:password@]host:port/db (or rediss://)")


def hide_password(url: str) -> str:
    """The URL as it may be logged: a password replaced by ``***``."""
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", url)


_new_id: Callable[[tuple[int, int]], EventId] = functools.partial(tuple.__new__, EventId)  # type: ignore[assignment]


def _rows(reply: Any) -> list[Any]:
    """The entries of one stream's XREAD reply, as Redis sent them (RESP2 or RESP3): [id, [field, value, ...]]."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


def parse_id(raw: bytes | str) -> EventId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return EventId(int(ms), int(seq or 0))


def _fmt(event_id: EventId) -> str:
    return f"{event_id.epoch}-{event_id.seq}"


def import_redis() -> Any:
    """The ``redis`` package's asyncio client; ConfigError (one line) naming the extra when it is missing."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        raise ConfigError(f"--broker needs the redis package: {PACKAGE_HINT}") from None
    return aioredis


def _field_id(info: dict[Any, Any], name: str) -> EventId:
    raw = info.get(name, info.get(name.encode()))
    if isinstance(raw, (list, tuple)):  # first-entry: (id, fields)
        raw = raw[0] if raw else None
    return parse_id(raw) if raw else EventId(0, 0)


def _holds(info: dict[Any, Any], after: EventId) -> bool:
    """Whether a stream (XINFO STREAM) still holds every entry after ``after``.

    Trimming removes the oldest entries: when any was removed, only an id from
    the first entry on is known to miss none (an older one may have lost some).
    """
    added = int(info.get("entries-added", info.get(b"entries-added", 0)) or 0)
    length = int(info.get("length", info.get(b"length", 0)) or 0)
    if after < _field_id(info, "max-deleted-entry-id"):
        return False
    if added <= length:
        return True
    return after >= _first_held(info)


def _first_held(info: dict[Any, Any]) -> EventId:
    """The id from which a stream holds every entry: its first, once any was trimmed (else 0-0)."""
    added = int(info.get("entries-added", info.get(b"entries-added", 0)) or 0)
    length = int(info.get("length", info.get(b"length", 0)) or 0)
    if added <= length:
        return EventId(0, 0)
    first = _field_id(info, "recorded-first-entry-id")
    return first if first != EventId(0, 0) else _field_id(info, "first-entry")


class Broker:
    """The log in Redis: appends, range reads, the run marker, and the reader feeding this node.

    ``apply`` takes each batch of entries read, in log order; the node
    publishes them on its hub.
    """

    def __init__(self, url: str, retention: str, hub: Hub, *, prefix: str = KEY_PREFIX) -> None:
        aioredis = import_redis()
        self.url = url
        self.hub = hub
        self.prefix = prefix
        self.key = prefix + "log"
        self.marker_key = prefix + "run"
        self.max_events, self.max_age_s = parse_retention(retention)
        common = dict(socket_connect_timeout=2, health_check_interval=0)
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as LostConnection
        # a pooled connection Redis closed when it restarted is opened again once, not refused
        self.writer = aioredis.from_url(url, socket_timeout=WRITE_TIMEOUT_S, retry=Retry(NoBackoff(), 1),
                                        retry_on_error=[LostConnection], **common)
        self.reader_client = aioredis.from_url(url, socket_timeout=READ_BLOCK_MS / 1000 + 5, **common)
        self.reader_client.set_response_callback("XREAD", lambda reply, **options: reply)  # parsed by _rows
        self.node = secrets.token_hex(4)
        self.apply: Callable[[list[Entry]], Awaitable[None]] | None = None
        self.position = EventId(0, 0)     # the last entry read
        self.since = EventId(0, 0)        # this node holds the log continuously from here (after a gap: from it)
        self.marker: str | None = None    # the run marker of the log this node reads
        self.connected = False
        self.failing: str | None = None   # why Redis cannot be reached, while it cannot
        self.reconnects = 0
        self.gaps = 0
        self.last_gap: str | None = None
        self.appended = 0
        self.last_appended = EventId(0, 0)   # the newest entry this node appended
        self.read = 0
        self.write_refusals = 0
        self.skipped = 0                  # entries at or below the hub's last id (after a lost log)
        self.lag_s = 0.0                  # age of the last entry read when it was read
        self._queued: list[tuple[list[Fields], asyncio.Future[list[bytes]]]] = []
        self._appender: asyncio.Task[None] | None = None
        self.on_change: Callable[[], Awaitable[None]] | None = None   # persists marker and since

    # -- writing (Rule 2) -------------------------------------------------------

    def _trim(self) -> dict[str, Any]:
        """XADD's trimming arguments (Rule 4)."""
        if self.max_events:
            return {"maxlen": self.max_events, "approximate": True}
        return {"minid": str(int((time.time() - self.max_age_s) * 1000)), "approximate": True}

    async def append(self, entries: list[Fields]) -> list[bytes]:
        """Append entries, all or none; their ids as Redis gave them (``parse_id``). Unavailable while Redis cannot take them.

        An entry is a dict of fields, or fields already in the protocol (``packed_fields``).

        The appends asked for while one pipeline is in flight go together in the
        next: one MULTI/EXEC, one round trip, and the readers get them in one
        read, so a busy node publishes them in one flush.
        """
        if not entries:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bytes]] = loop.create_future()
        self._queued.append((entries, future))
        if self._appender is None or self._appender.done():
            self._appender = loop.create_task(self._append_queued(), name="broker-append")
        return await future

    async def _append_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            count = sum(len(group) for group, _future in batch)
            try:
                raw = await self._multi_exec(self._packed(batch), count)
            except Exception as exc:  # noqa: BLE001 - any failure of Redis is a refusal, never a lost ack
                for _group, future in batch:
                    if not future.done():
                        future.set_exception(self._refused(exc))
                try:  # the idle connections may be as dead as this one: the next append opens a fresh one
                    await self.writer.connection_pool.disconnect(inuse_connections=False)
                except Exception:  # noqa: BLE001
                    pass
                continue
            self.appended += len(raw)
            if raw:
                self.last_appended = parse_id(raw[-1])
            start = 0
            for group, future in batch:
                if not future.done():
                    future.set_result(raw[start:start + len(group)])
                start += len(group)

    def _packed(self, batch: list[tuple[list[Fields], Any]]) -> bytes:
        """MULTI, one XADD per entry, EXEC, in the Redis protocol: packed here, in one pass, for bulk's sake."""
        trim = self._trim()
        if "maxlen" in trim:
            head_args = [b"XADD", self.key.encode(), b"MAXLEN", b"~", str(trim["maxlen"]).encode(), b"*"]
        else:
            head_args = [b"XADD", self.key.encode(), b"MINID", b"~", trim["minid"].encode(), b"*"]
        head = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in head_args)
        parts = [b"*1\r\n$5\r\nMULTI\r\n"]
        add = parts.append
        for group, _future in batch:
            for fields in group:
                if type(fields) is bytes:  # packed_fields: four fields
                    add(b"*%d\r\n" % (len(head_args) + 8))
                    add(head)
                    add(fields)
                    continue
                add(b"*%d\r\n" % (len(head_args) + 2 * len(fields)))
                add(head)
                for name, value in fields.items():  # type: ignore[union-attr]
                    data = value.encode()
                    add(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name.encode(), len(data), data))
        add(b"*1\r\n$4\r\nEXEC\r\n")
        return b"".join(parts)

    async def _multi_exec(self, payload: bytes, count: int) -> list[bytes]:
        """Send a packed MULTI/EXEC of ``count`` commands on one pooled connection; EXEC's replies."""
        pool = self.writer.connection_pool
        conn = await pool.get_connection()
        task = asyncio.current_task()
        assert task is not None
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            task.cancel()
        timer = self.hub.scheduler.call_later(WRITE_TIMEOUT_S, expire)  # in this task: no extra loop turn
        try:
            return await self._exchange(conn, payload, count)
        except asyncio.CancelledError:
            await conn.disconnect()  # replies may be left unread on it
            if expired:
                task.uncancel()
                raise TimeoutError(f"Redis did not answer within {WRITE_TIMEOUT_S} s") from None
            raise
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            timer.cancel()
            await pool.release(conn)

    @staticmethod
    async def _exchange(conn: Any, payload: bytes, count: int) -> list[bytes]:
        await conn.send_packed_command(payload, check_health=False)
        # MULTI's OK and a QUEUED per command: read by the parser itself, without the per-reply
        # timer of read_response (the whole exchange has one, in _multi_exec)
        read = getattr(conn, "_parser", conn).read_response
        for _ in range(count + 1):
            reply = await read()
            if isinstance(reply, Exception):
                raise reply
        replies = await conn.read_response()
        if not isinstance(replies, list) or len(replies) != count:
            raise RuntimeError(f"EXEC answered {replies!r}")
        return replies

    def _refused(self, exc: BaseException) -> Unavailable:
        self.write_refusals += 1
        return Unavailable(f"the broker cannot take writes now ({type(exc).__name__}); retry later", RETRY_AFTER_S)

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """One command on the writer connection; Unavailable if Redis cannot answer."""
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise self._refused(exc) from None

    # -- reading (Rules 1 and 3) ------------------------------------------------

    async def range(self, after: EventId, end: EventId, count: int = RANGE_COUNT) -> list[Ranged]:
        """Entries after ``after`` up to ``end``, at most ``count`` (XRANGE)."""
        raw = await self.reader_client.xrange(self.key, "(" + _fmt(after), _fmt(end), count=count)
        return [(parse_id(i), fields) for i, fields in raw]

    async def holds(self, after: EventId) -> bool:
        """Whether the log still holds every entry after ``after`` (none was trimmed, nor lost)."""
        if after < self.since:
            return False
        return _holds(await self.reader_client.xinfo_stream(self.key), after)

    async def run(self) -> None:
        """Read the log forever, reconnecting with jittered backoff (Rule 2)."""
        backoff = BACKOFF_MIN_S
        while True:
            try:
                await self._check_marker()
                if self.failing is not None:
                    log.info("broker reachable again; reading the log from %s", _fmt(self.position))
                self.connected, self.failing = True, None
                backoff = BACKOFF_MIN_S
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down, restarting, unreachable
                self.connected = False
                if self.failing is None:
                    self.reconnects += 1
                    log.error("broker unreachable: %s (%s); reconnecting", exc, hide_password(self.url))
                self.failing = f"{type(exc).__name__}: {exc}"
                await self.hub.scheduler.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(BACKOFF_MAX_S, backoff * 2)

    def _xread(self, after: EventId) -> Awaitable[Any]:
        return self.reader_client.execute_command("XREAD", "COUNT", READ_COUNT, "BLOCK", READ_BLOCK_MS,
                                                  "STREAMS", self.key, _fmt(after))

    async def _read_forever(self) -> None:
        floor = FLOOR_NAME.encode()
        new_id = _new_id
        ahead: asyncio.Task[Any] | None = None   # the next read, asked for while a full one is applied
        try:
            while True:
                got = await (ahead if ahead is not None else self._xread(self.position))
                ahead = None
                rows = _rows(got)
                if not rows:
                    self.lag_s = 0.0
                    await self._check_marker()  # a Redis restarted in between answers too: is it the same log?
                    continue
                self.read += len(rows)
                last = parse_id(rows[-1][0])
                if len(rows) == READ_COUNT:  # more is waiting (a bulk, a catch-up): Redis sends it meanwhile
                    ahead = asyncio.get_running_loop().create_task(self._xread(last))  # type: ignore[arg-type]
                hub_last = self.hub.last_id()
                entries: list[Entry] = []
                for raw_id, flat in rows:
                    ms, _, seq = raw_id.partition(b"-")
                    event_id = new_id((int(ms), int(seq)))
                    if event_id <= hub_last:
                        self.skipped += 1
                        continue
                    if not (len(flat) == 2 and flat[1] == floor):
                        entries.append((event_id, flat))
                self.lag_s = max(0.0, time.time() - last.epoch / 1000)
                if entries and self.apply is not None:
                    await self.apply(entries)
                self.position = last
        finally:
            if ahead is not None:
                ahead.cancel()

    async def _check_marker(self) -> None:
        """Rule 3: the same log as before, still holding our position, or a counted gap."""
        client = self.reader_client
        token = secrets.token_hex(8)
        if await client.set(self.marker_key, token, nx=True):
            current = token
        else:
            raw = await client.get(self.marker_key)
            current = raw.decode() if raw is not None else token
        if self.marker is None:  # a node new to this log
            self.marker = current
            if self.position > EventId(0, 0) and not await self._holds_position():
                await self._gap(f"the log no longer holds {_fmt(self.position)} (trimmed past it)")
            else:
                if self.position == EventId(0, 0) and await client.exists(self.key):
                    # a new node holds the log from its first entry on: what was trimmed before is not its
                    first = _first_held(await client.xinfo_stream(self.key))
                    self.since = max(self.since, first)
                    if self.hub.origin is None or self.hub.origin < first:
                        self.hub.origin = first
                if self.on_change is not None:
                    await self.on_change()
            return
        if current != self.marker:
            self.marker = current
            await self._gap("the log was lost (its run marker changed: Redis restarted empty or was flushed)")
        elif not await self._holds_position():
            await self._gap(f"the log no longer holds {_fmt(self.position)} (trimmed past it, or went back)")

    async def _holds_position(self) -> bool:
        client = self.reader_client
        if not await client.exists(self.key):
            return self.position == EventId(0, 0)
        info = await client.xinfo_stream(self.key)
        return _holds(info, self.position) and self.position <= _field_id(info, "last-generated-id")

    async def _gap(self, why: str) -> None:
        self.gaps += 1
        self.last_gap = why
        log.error("broker: %s; streams from before get reset", why)
        hub = self.hub
        top = max(hub.last_id(), self.position)
        floor = EventId(top.epoch, top.seq + 1)
        try:  # the new log's ids start past every id this node issued
            await self.reader_client.xadd(self.key, {"n": FLOOR_NAME}, id=_fmt(floor))
        except Exception:  # noqa: BLE001 - another node raised it further already
            pass
        hub.epoch, hub.seq = top
        hub.origin = floor
        self.since = floor
        self.position = EventId(0, 0)
        if self.on_change is not None:
            await self.on_change()
        hub.close_all_streams(CloseReason.CATCH_UP)

    # -- state ------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "url": hide_password(self.url),
            "state": "connected" if self.connected else f"reconnecting: {self.failing}" if self.failing else "connecting",
            "node": self.node,
            "position": _fmt(self.position),
            "lagSeconds": round(self.lag_s, 3),
            "gaps": self.gaps,
            **({"lastGap": self.last_gap} if self.last_gap else {}),
        }

    def metrics(self) -> list[tuple[str, str, str, float]]:
        """(name, kind, help, value) for /metrics."""
        return [
            ("monkestream_broker_connected", "gauge", "1 while the log in Redis is being read.", int(self.connected)),
            ("monkestream_broker_lag_seconds", "gauge", "Age of the last log entry read, when it was read.", self.lag_s),
            ("monkestream_broker_gaps_total", "counter", "Times the log no longer held this node's position.", self.gaps),
            ("monkestream_broker_reconnects_total", "counter", "Times Redis became unreachable.", self.reconnects),
            ("monkestream_broker_appended_total", "counter", "Entries this node appended to the log.", self.appended),
            ("monkestream_broker_read_total", "counter", "Log entries this node read.", self.read),
            ("monkestream_broker_write_refusals_total", "counter", "Writes refused while Redis could not take them.",
             self.write_refusals),
            ("monkestream_broker_skipped_total", "counter", "Log entries not after this node's last id.", self.skipped),
        ]

    async def close(self) -> None:
        for client in (self.writer, self.reader_client):
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - closing a connection to a dead Redis
                pass
