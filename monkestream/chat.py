"""The chat room: presence, comments and their events, on ``room:NAME`` topics.

Theory of operation
-------------------
Rule 1: presence counts streams per user and room. ``user_joined`` is
        published when a user's first stream opens, ``user_left`` when their
        last one closes, so several tabs of one user are one member.
Rule 2: a new stream starts with a ``members`` event listing everyone present
        (itself included), so two users see each other however they arrived.
Rule 3: comments are written to SQLite before their ``comment_posted`` event
        is published; a deletion is written before ``comment_deleted``.
Rule 4: the poster gets a deletion key; only its hash is stored. Deleting
        needs that key or the publish token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

from .jsontext import dumps
from .ratelimit import RateLimiter
from .hub import Backlog
from .server import EventStream, Exchange, HTTPError, Response, json_response
from .sse import encode_event
from .ticker import InvalidTicker, loads

if TYPE_CHECKING:
    from .app import App

ROOM_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")
USER_RE = re.compile(r"[A-Za-z0-9._-]{1,24}")
MAX_TEXT_CHARS = 500
COMMENTS_DEFAULT_LIMIT = 50
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


class Chat:
    """The chat routes, on top of the app's hub and store."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.hub = app.hub
        self.presence = Presence()
        self.limiter = RateLimiter(app.config.comment_rate, app.config.comment_burst)
        self.comments_posted = 0
        self.comments_deleted = 0
        add = app.router.add
        add("GET", "/room/{room}/event", self.room_events)
        add("GET", "/room/{room}/comments", self.get_comments)
        add("POST", "/room/{room}/comments", self.post_comment)
        add("DELETE", "/room/{room}/comments/{comment_id}", self.delete_comment)

    # -- presence -------------------------------------------------------------

    def stream(self, topics: list[str], user: str | None, base: EventStream) -> EventStream:
        """Wrap a stream so that its room topics count ``user`` as present."""
        rooms = [t[len("room:"):] for t in topics if t.startswith("room:")]
        if user is None or not rooms:
            return base
        inner = base.prepare
        hub = self.hub
        joined = False

        async def prepare() -> Callable[[], Backlog]:
            build = await inner() if inner is not None else None

            def start() -> Backlog:
                nonlocal joined
                backlog = build() if build is not None else Backlog([])
                if not backlog.complete:
                    return backlog  # closed at once: it never joins
                frames = list(backlog.frames)
                for room in rooms:  # the newest events: after the backlog, before the position
                    if self.presence.join(room, user):
                        frames.append(hub.publish(room_topic(room), "user_joined", {"room": room, "user": user}).frame)
                joined = True
                for room in rooms:
                    frames.append(encode_event("members", dumps({"room": room, "users": self.presence.members(room)})))
                return Backlog(frames)
            return start

        def on_close() -> None:
            if base.on_close is not None:
                base.on_close()
            if joined:
                for room in rooms:
                    if self.presence.leave(room, user):
                        hub.publish(room_topic(room), "user_left", {"room": room, "user": user})

        return EventStream(topics, prepare, on_close)

    def room_events(self, ex: Exchange) -> EventStream:
        room = parse_room(ex.params["room"])
        user = ex.request.query_params().get("user")
        name = parse_user(user[-1]) if user else None
        topics = [room_topic(room)]
        return self.stream(topics, name, self.app.open_stream(ex, topics))

    # -- comments -------------------------------------------------------------

    async def get_comments(self, ex: Exchange) -> Response:
        room = parse_room(ex.params["room"])
        params = ex.request.query_params()
        text = (params.get("limit") or [str(COMMENTS_DEFAULT_LIMIT)])[-1]
        if not (text.isascii() and text.isdigit()) or len(text) > 3 or not 1 <= int(text) <= 500:
            raise HTTPError(400, "limit: must be an integer from 1 to 500")
        comments = await self.app.store.comments(room, int(text))
        return json_response({"room": room, "comments": [c.to_dict() for c in comments]})

    async def post_comment(self, ex: Exchange) -> Response:
        room = parse_room(ex.params["room"])
        try:
            body = loads(ex.request.body)
        except InvalidTicker as exc:
            raise HTTPError(400, str(exc)) from None
        if not isinstance(body, dict):
            raise HTTPError(400, "body: must be a JSON object with user and text")
        user = parse_user(body.get("user"))
        text = parse_text(body.get("text"))
        if not self.limiter.allow(ex.client):
            raise HTTPError(429, "too many comments; slow down", [("Retry-After", "1")])
        key = secrets.token_urlsafe(18)
        comment = await self.app.store.add_comment(room, user, text, int(time.time()), _key_hash(key))
        self.comments_posted += 1
        self.app.hub.publish(room_topic(room), "comment_posted", comment.to_dict())
        return json_response({**comment.to_dict(), "deleteKey": key}, 201)

    async def delete_comment(self, ex: Exchange) -> Response:
        room = parse_room(ex.params["room"])
        raw_id = ex.params["comment_id"]
        if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 18:
            raise HTTPError(400, "id: must be a positive integer")
        comment_id = int(raw_id)
        request = ex.request
        key = request.header("x-delete-key") or (request.query_params().get("key") or [None])[-1]
        if not self.app.has_token(request):
            stored = await self.app.store.comment_key(room, comment_id)
            if stored is None:
                raise HTTPError(404, "no such comment")
            if key is None:
                raise HTTPError(401, "the deletion key (X-Delete-Key) or the publish token is required",
                                [("WWW-Authenticate", 'Bearer realm="monkestream"')])
            if not hmac.compare_digest(_key_hash(key), stored):
                raise HTTPError(403, "the deletion key does not match")
        if not await self.app.store.delete_comment(room, comment_id):
            raise HTTPError(404, "no such comment")
        self.comments_deleted += 1
        self.app.hub.publish(room_topic(room), "comment_deleted", {"id": comment_id, "room": room})
        return Response(204)
