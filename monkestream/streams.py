"""Opening event streams: where a stream resumes, the topic limit, and ``GET /events``.

Theory of operation
-------------------
Rule 1: a stream resumes after the request's ``Last-Event-ID`` header, or
        its ``lastEventId`` query parameter on a first connection. With
        neither, it starts where the hub stands as its response head goes
        out, so whatever is published before it is attached is replayed to it.
Rule 2: opening a stream never takes the hub past a topic budget (503):
        its topics are reserved when the request is answered, in one step
        with the check, and held until the stream is attached or dropped.
Rule 3: a ``Member`` is someone a stream makes present (a chat user in its
        rooms). ``ready()`` is awaited before the backlog is read (a relay's
        user joins upstream there). ``attached()`` runs in the step that
        attaches the stream, and only when it is attached (its backlog was
        complete); the frames it returns follow the backlog. ``closed()``
        runs once the stream ends, whatever ended it.
Rule 4: ``GET /events?topic=*`` is the all-topics stream (hub Rule 9), a
        relay's: it needs the publish token when one is set, takes no other
        topic and no user, and may hold ``--relay-buffer`` bytes unsent.
"""

from __future__ import annotations

from typing import Callable, Protocol

from .chat import parse_room, parse_user, room_topic
from .hub import EVERY_TOPIC, Backlog, Hub, TopicLimit
from .http11 import Request
from .ingest import SYMBOLS_TOPIC
from .params import http_error, one
from .replay import Replayer
from .routing import EventStream, Exchange, HTTPError, Router
from .ticker import InvalidTicker, parse_symbol, ticker_topic

MAX_STREAM_TOPICS = 32
TOPIC_KINDS = ("ticker", "room", SYMBOLS_TOPIC)


class Member(Protocol):
    """Someone a stream makes present somewhere, told when it is attached and when it ends (Rule 3)."""

    async def ready(self) -> None:
        """Before the stream's backlog is read: whatever must be awaited (a relay's join upstream)."""

    def attached(self) -> list[bytes]:
        """The stream is being attached: the frames it gets after its backlog (this may publish)."""

    def closed(self) -> object:
        """The stream ended."""


class StreamOpener:
    """Builds the ``EventStream`` a handler returns, resuming it from the hub's rings and SQLite."""

    def __init__(self, hub: Hub, replayer: Replayer) -> None:
        self.hub = hub
        self.replayer = replayer

    def _position(self, ex: Exchange) -> str:
        """Rule 1: the request's Last-Event-ID (or lastEventId), else where the hub stands now."""
        last_id = ex.request.header("last-event-id")
        if last_id is None:
            last_id = one(ex.request.query_params(), "lastEventId")
        return last_id or str(self.hub.last_id())

    def every_topic(self, ex: Exchange, cap_bytes: int) -> EventStream:
        """The all-topics stream (Rule 4), resuming like any other; it reserves no topic."""
        position = self._position(ex)
        replayer = self.replayer

        async def prepare() -> Callable[[], Backlog]:
            return await replayer.prepare([EVERY_TOPIC], position, ex.client)
        return EventStream([EVERY_TOPIC], prepare, cap_bytes=cap_bytes)

    def __call__(self, ex: Exchange, topics: list[str], member: Member | None = None) -> EventStream:
        """An event stream on ``topics`` for this request (Rules 1 and 2), with ``member`` present while it lasts."""
        position = self._position(ex)
        hub = self.hub
        try:
            hub.reserve(topics)  # Rule 2: the check and the creation in one step
        except TopicLimit as exc:
            raise http_error(exc) from None
        replayer = self.replayer
        held = True

        def release(forget: bool) -> None:
            nonlocal held
            if held:
                held = False
                hub.release(topics, forget=forget)

        async def prepare() -> Callable[[], Backlog]:
            if member is not None:
                await member.ready()
            build = await replayer.prepare(topics, position, ex.client)

            def start() -> Backlog:
                release(forget=False)  # attached in this step: the stream holds its topics now
                backlog = build()
                if not backlog.complete or member is None:
                    return backlog  # a partial one is closed at once: never attached, never joined
                return Backlog([*backlog.frames, *member.attached()])
            return start

        def closed() -> None:
            release(forget=True)  # dropped before it was attached
            if member is not None:
                member.closed()

        return EventStream(topics, prepare, closed)


class TopicStreams:
    """``GET /events``: several topics, symbols and rooms, on one stream."""

    def __init__(self, open_stream: StreamOpener,
                 membership: Callable[[list[str], str | None, str], Member | None], *,
                 authorize: Callable[[Request], None], relay_buffer: int) -> None:
        self.open_stream = open_stream
        self.membership = membership   # who a stream on these topics makes present, for this user and client
        self.authorize = authorize     # raises HTTPError 401 unless the request carries the publish token
        self.relay_buffer = relay_buffer

    def register(self, router: Router) -> None:
        router.add("GET", "/events", self.events,
                   f"several topics on one stream: ?topic=ticker:DOGE&topic=room:lobby&topic={SYMBOLS_TOPIC}"
                   f" (up to {MAX_STREAM_TOPICS});"
                   " &user=NAME joins the rooms' presence; ?topic=* alone: every topic, for relays (token)")

    def events(self, ex: Exchange) -> EventStream:
        query = ex.request.query_params()
        topics = list(dict.fromkeys(query.get("topic", [])))
        if not topics:
            raise HTTPError(400, "topic: give at least one, e.g. ?topic=ticker:DOGE")
        if len(topics) > MAX_STREAM_TOPICS:
            raise HTTPError(400, f"topic: at most {MAX_STREAM_TOPICS} per stream")
        if EVERY_TOPIC in topics:  # Rule 4
            if len(topics) > 1 or "user" in query:
                raise HTTPError(400, "topic: * is every topic; it takes no other topic and no user")
            self.authorize(ex.request)
            return self.open_stream.every_topic(ex, self.relay_buffer)
        checked = [_check_topic(t) for t in topics]
        user = one(query, "user")
        member = self.membership(checked, parse_user(user) if user is not None else None, ex.client)
        return self.open_stream(ex, checked, member)


def _check_topic(topic: str) -> str:
    kind, _, name = topic.partition(":")
    if kind == "ticker":
        try:
            return ticker_topic(parse_symbol(name))
        except InvalidTicker:
            raise HTTPError(400, f"topic: {topic!r} has an invalid symbol") from None
    if kind == "room":
        return room_topic(parse_room(name))
    if topic == SYMBOLS_TOPIC:  # new symbols as they are first seen (ingest Rule 5)
        return topic
    raise HTTPError(400, f"topic: {topic!r} must be {SYMBOLS_TOPIC} or start with ticker: or room:")
