"""A relay's chat presence: its users made present on the upstream, so every node sees one room.

A relay publishes nothing itself (relay Rule 1), so a stream opened on a relay
with ``?user=`` cannot announce its user locally. The user is made present
where presence is kept, upstream, and the ``user_joined`` and ``user_left``
events come back through the follower like every other event.

Theory of operation
-------------------
Rule 1: while a user has streams on a relay in a room, the relay holds one
        stream of its own on the upstream for that room and user
        (``/room/ROOM/event?user=USER``, naming the first client in
        X-Forwarded-For, so the upstream's join limit is that client's). The
        user's first stream opens it before its backlog is built; the last
        one to close closes it, and the upstream publishes ``user_left``.
Rule 2: a held stream that the upstream ends (a restart) is opened again with
        backoff while the user still has streams here.
Rule 3: the ``members`` event a stream gets after its backlog lists the room
        as the relay knows it: the list the upstream gave when the room's
        first held stream opened, kept current by the ``user_joined`` and
        ``user_left`` events the follower brings after that list's position.
Rule 4: when the upstream cannot be reached, a stream still opens, without
        presence: its ``members`` list is what the relay knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any
from urllib.parse import quote

from .clock import within
from .jsontext import dumps
from .sse import EventId, encode_event
from .upstream import Upstream, UpstreamError, split_frames

log = logging.getLogger("monkestream")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
JOIN_TIMEOUT_S = 10.0


class Held:
    """One stream held on the upstream for a room and a user (Rules 1 and 2)."""

    def __init__(self, presence: UpstreamPresence, room: str, user: str, client: str) -> None:
        self.presence = presence
        self.room = room
        self.user = user
        self.client = client
        self.count = 0                       # this relay's streams of the user in the room
        self.joined = asyncio.Event()        # set once the upstream answered (or failed to)
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        delay = BACKOFF_MIN_S
        while self.count > 0:
            try:
                await self._hold()
                delay = BACKOFF_MIN_S
            except (UpstreamError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                log.debug("presence of %s in %s upstream: %s", self.user, self.room, exc)
            self.joined.set()  # Rule 4: nobody waits for an upstream that does not answer
            await self.presence.upstream.scheduler.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _hold(self) -> None:
        presence = self.presence
        target = f"/room/{quote(self.room)}/event?user={quote(self.user)}"
        body = await presence.upstream.stream(target, [("X-Forwarded-For", self.client), *presence.headers])
        try:
            if body.status != 200:
                raise UpstreamError(f"status {body.status}")
            buffer = b""
            async for data in body:
                frames, buffer = split_frames(buffer + data)
                for frame in frames:
                    if frame.event == "members" and frame.data is not None:
                        presence.listed(self.room, json.loads(frame.data).get("users", []))
                    elif frame.id is not None and frame.data is None:  # the position: joined upstream
                        position = EventId.parse(frame.id)
                        if position is not None:
                            presence.known_at[self.room] = max(position, presence.known_at.get(self.room, position))
                        self.joined.set()
        finally:
            body.close()


class RelayMember:
    """A stream's user in its rooms, on a relay: present upstream while the stream lasts (Rules 1, 3, 4)."""

    def __init__(self, presence: UpstreamPresence, rooms: list[str], user: str, client: str) -> None:
        self.presence = presence
        self.rooms = rooms
        self.user = user
        self.client = client
        self.held: list[Held] = []

    async def ready(self) -> None:
        self.held = [self.presence.hold(room, self.user, self.client) for room in self.rooms]
        with contextlib.suppress(TimeoutError):
            await within(self.presence.upstream.scheduler, JOIN_TIMEOUT_S,
                         asyncio.gather(*(h.joined.wait() for h in self.held)))

    def attached(self) -> list[bytes]:
        return [encode_event("members", dumps({"room": room, "users": self.presence.members(room)}))
                for room in self.rooms]

    def closed(self) -> None:
        for held in self.held:
            self.presence.release(held)
        self.held = []


class UpstreamPresence:
    """The relay's users present upstream, and the members of their rooms as the relay knows them."""

    def __init__(self, upstream: Upstream, headers: list[tuple[str, str]]) -> None:
        self.upstream = upstream
        self.headers = headers               # the relay's credentials upstream
        self.held: dict[tuple[str, str], Held] = {}
        self.rooms: dict[str, set[str]] = {}  # room -> users present, for rooms with a held stream
        self.known_at: dict[str, EventId] = {}  # room -> the position its list was given at

    def member(self, rooms: list[str], user: str, client: str) -> RelayMember:
        return RelayMember(self, rooms, user, client)

    def hold(self, room: str, user: str, client: str) -> Held:
        held = self.held.get((room, user))
        if held is None:
            held = self.held[(room, user)] = Held(self, room, user, client)
        held.count += 1
        if held.task is None:
            held.task = asyncio.create_task(held.run(), name=f"presence {room} {user}")
        return held

    def release(self, held: Held) -> None:
        held.count -= 1
        if held.count > 0:
            return
        del self.held[(held.room, held.user)]
        if held.task is not None:
            held.task.cancel()   # its stream closes: the upstream says user_left
        if not any(room == held.room for room, _user in self.held):
            self.rooms.pop(held.room, None)
            self.known_at.pop(held.room, None)

    def listed(self, room: str, users: list[Any]) -> None:
        self.rooms[room] = {u for u in users if isinstance(u, str)}

    def members(self, room: str) -> list[str]:
        return sorted(self.rooms.get(room, ()))

    def seen(self, room: str, name: str, data: str, event_id: EventId) -> None:
        """A presence event the follower brought (Rule 3): applied after the room's list's position."""
        users = self.rooms.get(room)
        if users is None or event_id <= self.known_at.get(room, EventId(0, 0)):
            return
        user = json.loads(data).get("user")
        if name == "user_joined":
            users.add(user)
        else:
            users.discard(user)

    def close(self) -> None:
        for held in self.held.values():
            if held.task is not None:
                held.task.cancel()
        self.held.clear()
