"""The chat rooms: presence, comments, their events on ``room:NAME`` topics, and their routes.

Theory of operation
-------------------
Rule 1: presence counts streams per user and room. ``user_joined`` is
        published when a user's first stream is attached, ``user_left`` when
        their last one closes, so several tabs of one user are one member.
Rule 2: a new stream's backlog ends with a ``members`` event listing everyone
        present (itself included, after its own ``user_joined`` when it is the
        user's first), so two users see each other however they arrived.
Rule 3: comments are written to SQLite before their ``comment_posted`` event
        is published; a deletion is written before ``comment_deleted``.
Rule 4: the poster gets a deletion key; only its hash is stored. Deleting
        needs that key, in the ``X-Delete-Key`` header (never the URL, which
        proxies and browsers log), or the publish token.
Rule 5: posting, and joining rooms, are rate-limited per client address; a
        refused request's ``Retry-After`` is the seconds until its bucket
        takes what it asked, rounded up, and at least 1.
Rule 6: a stream with ``?user=`` costs one join per room (all of the join
        burst at most), taken before its response starts, so a refused join
        publishes no presence event.
Rule 7: ``Chat`` is handed all it uses (the hub, the store, the limiters, a
        token check, a stream opener, and on a relay what makes its users
        present upstream); it knows nothing of the app around it.
Rule 8: presence events (``user_joined``, ``user_left``) are live only: not
        kept in the room's replay ring (a stream opened with ``?user=``
        starts with a fresh ``members`` list), so joining and leaving cannot fill memory,
        and a room of presence alone is forgotten with its last stream. A
        comment's room must fit the hub's room budget before the comment is
        written (503 otherwise), so nothing stored goes unpublished.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from typing import Any, Callable

from . import params
from .auth import CHALLENGE
from .http11 import Request
from .hub import Hub, TopicLimit
from .jsontext import dumps
from .ratelimit import RateLimiter
from .routing import EventStream, Exchange, HTTPError, Response, Router, json_response
from .sse import encode_event
from .store import Store

ROOM_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
USER_RE = re.compile(r"[A-Za-z0-9._-]{1,24}")
MAX_TEXT_CHARS = 500
COMMENTS_DEFAULT_LIMIT = 50
COMMENTS_MAX_LIMIT = 500
MAX_COMMENT_ID = 2**63 - 1       # SQLite's largest integer
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone "\\ud800" in JSON: no UTF-8 can store it


def room_topic(room: str) -> str:
    return "room:" + room


def parse_room(text: str) -> str:
    if not ROOM_RE.fullmatch(text):
        raise HTTPError(400, "room: must be 1-32 characters of A-Z a-z 0-9 . _ -")
    return text


def parse_user(text: Any) -> str:
    if not isinstance(text, str) or not USER_RE.fullmatch(text):
        raise HTTPError(422, "user: must be 1-24 characters of A-Z a-z 0-9 . _ -")
    return text


def parse_text(text: Any) -> str:
    if not isinstance(text, str):
        raise HTTPError(422, "text: must be a string")
    text = text.strip()
    if not text:
        raise HTTPError(422, "text: must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise HTTPError(422, f"text: must be at most {MAX_TEXT_CHARS} characters")
    if _CONTROL.search(text):
        raise HTTPError(422, "text: must not contain control characters")
    if _SURROGATE.search(text):
        raise HTTPError(422, "text: must not contain unpaired surrogates")
    return text


def _retry_after(limiter: RateLimiter, client: str, cost: float = 1.0) -> tuple[str, str]:
    return ("Retry-After", str(max(1, math.ceil(limiter.retry_after(client, cost)))))


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Presence:
    """Who is in which room, counted in open streams."""

    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, int]] = {}

    def join(self, room: str, user: str) -> bool:
        """Count one more stream; True when it is the user's first in the room."""
        members = self.rooms.setdefault(room, {})
        members[user] = members.get(user, 0) + 1
        return members[user] == 1

    def leave(self, room: str, user: str) -> bool:
        """Count one stream less; True when it was the user's last in the room."""
        members = self.rooms.get(room)
        if not members or user not in members:
            return False
        members[user] -= 1
        if members[user]:
            return False
        del members[user]
        if not members:
            del self.rooms[room]
        return True

    def members(self, room: str) -> list[str]:
        return sorted(self.rooms.get(room, ()))


class Membership:
    """A stream's user in its rooms: joins as the stream is attached, leaves as it ends (Rules 1, 2)."""

    def __init__(self, hub: Hub, presence: Presence, rooms: list[str], user: str) -> None:
        self.hub = hub
        self.presence = presence
        self.rooms = rooms
        self.user = user
        self.joined = False

    async def ready(self) -> None:
        """Nothing to await: presence is kept here."""

    def attached(self) -> list[bytes]:
        """Join each room: the ``user_joined`` events this publishes, then a ``members`` event per room."""
        hub, presence, user = self.hub, self.presence, self.user
        frames = []
        for room in self.rooms:  # the stream is not attached yet: it gets these after its backlog
            if presence.join(room, user):
                frames.append(hub.publish(room_topic(room), "user_joined", {"room": room, "user": user},
                                          keep=False).frame)
        self.joined = True
        for room in self.rooms:
            frames.append(encode_event("members", dumps({"room": room, "users": presence.members(room)})))
        return frames

    def closed(self) -> None:
        if self.joined:
            for room in self.rooms:
                if self.presence.leave(room, self.user):
                    self.hub.publish(room_topic(room), "user_left", {"room": room, "user": self.user}, keep=False)


class Chat:
    """The chat rooms and their routes, on the hub and the store they are given.

    ``has_token`` tells whether a request carries the publish token (it may
    delete any comment); ``open_stream`` opens an event stream for a request,
    with a ``Membership`` present while it lasts.
    """

    def __init__(self, hub: Hub, store: Store, limiter: RateLimiter, joins: RateLimiter, *,
                 has_token: Callable[[Request], bool],
                 open_stream: Callable[[Exchange, list[str], Any], EventStream],
                 make_member: Callable[[list[str], str, str], Any] | None = None) -> None:
        self.hub = hub
        self.store = store
        self.limiter = limiter
        self.joins = joins
        self.has_token = has_token
        self.open_stream = open_stream
        self.presence = Presence()
        # who a stream makes present in its rooms (rooms, user, client): here, or a relay's upstream
        self.make_member = make_member or (lambda rooms, user, client: Membership(hub, self.presence, rooms, user))
        self.comments_posted = 0
        self.comments_deleted = 0
        self.comments_refused = 0
        self.joins_refused = 0

    def register(self, router: Router) -> None:
        add = router.add
        add("GET", "/room/{room}/event", self.room_events,
            "the SSE stream of a chat room; ?user=NAME joins its presence")
        add("GET", "/room/{room}/comments", self.get_comments,
            f"recent comments, oldest first: ?limit= up to {COMMENTS_MAX_LIMIT} ({COMMENTS_DEFAULT_LIMIT})")
        add("POST", "/room/{room}/comments", self.post_comment,
            'post {"user","text"} -> 201 with the comment and its deleteKey')
        add("DELETE", "/room/{room}/comments/{comment_id}", self.delete_comment,
            "delete a comment, with X-Delete-Key: KEY or the publish token -> 204")

    # -- presence -------------------------------------------------------------

    def membership(self, topics: list[str], user: str | None, client: str) -> Any:
        """What a stream on ``topics`` makes ``user`` present in; None without a user or a room.

        HTTPError 429 when ``client`` has joined too many rooms lately (Rule 6).
        """
        rooms = [t[len("room:"):] for t in topics if t.startswith("room:")]
        if user is None or not rooms:
            return None
        cost = min(len(rooms), self.joins.burst)
        if not self.joins.allow(client, cost):
            self.joins_refused += 1
            raise HTTPError(429, "too many room joins; slow down", [_retry_after(self.joins, client, cost)])
        return self.make_member(rooms, user, client)

    def room_events(self, ex: Exchange) -> EventStream:
        room = parse_room(ex.params["room"])
        user = params.one(ex.request.query_params(), "user")
        name = parse_user(user) if user is not None else None
        topics = [room_topic(room)]
        return self.open_stream(ex, topics, self.membership(topics, name, ex.client))

    # -- comments -------------------------------------------------------------

    async def get_comments(self, ex: Exchange) -> Response:
        room = parse_room(ex.params["room"])
        limit = params.int_param(ex.request.query_params(), "limit", COMMENTS_DEFAULT_LIMIT, 1, COMMENTS_MAX_LIMIT)
        comments = await self.store.comments(room, limit or COMMENTS_DEFAULT_LIMIT)
        return json_response({"room": room, "comments": [c.to_dict() for c in comments]})

    def comment_request(self, ex: Exchange) -> tuple[str, str, str]:
        """The room, user and text of a comment being posted; HTTPError 400/422 for bad ones."""
        room = parse_room(ex.params["room"])
        body = params.json_body(ex)
        if not isinstance(body, dict):
            raise HTTPError(400, "body: must be a JSON object with user and text")
        return room, parse_user(body.get("user")), parse_text(body.get("text"))

    async def post_comment(self, ex: Exchange) -> Response:
        room, user, text = self.comment_request(ex)
        if not self.limiter.allow(ex.client):
            self.comments_refused += 1
            raise HTTPError(429, "too many comments; slow down", [_retry_after(self.limiter, ex.client)])
        key = secrets.token_urlsafe(18)
        topic = room_topic(room)
        self._reserve(topic)  # the room fits the hub's budget before anything is written (Rule 8)
        try:
            comment = await self.store.add_comment(room, user, text, int(time.time()), _key_hash(key))
            self.comments_posted += 1
            self.hub.publish(topic, "comment_posted", comment.to_dict())
        finally:
            self.hub.release([topic])
        return json_response({**comment.to_dict(), "deleteKey": key}, 201)

    def _reserve(self, topic: str) -> None:
        try:
            self.hub.reserve([topic])
        except TopicLimit as exc:
            raise params.http_error(exc) from None

    async def delete_comment(self, ex: Exchange) -> Response:
        room = parse_room(ex.params["room"])
        comment_id = params.integer(ex.params["comment_id"], "id", 0, MAX_COMMENT_ID)
        request = ex.request
        if "key" in request.query_params():
            raise HTTPError(400, "key: send the deletion key in the X-Delete-Key header, never in the URL")
        key = request.header("x-delete-key")
        if not self.has_token(request):
            stored = await self.store.comment_key(room, comment_id)
            if stored is None:
                raise HTTPError(404, "no such comment")
            if key is None:
                raise HTTPError(401, "the deletion key (X-Delete-Key) or the publish token is required", [CHALLENGE])
            if not hmac.compare_digest(_key_hash(key), stored):
                raise HTTPError(403, "the deletion key does not match")
        topic = room_topic(room)
        self._reserve(topic)
        try:
            if not await self.store.delete_comment(room, comment_id):
                raise HTTPError(404, "no such comment")
            self.comments_deleted += 1
            self.hub.publish(topic, "comment_deleted", {"id": comment_id, "room": room})
        finally:
            self.hub.release([topic])
        return Response(204)
