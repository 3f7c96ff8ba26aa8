"""The chat rooms: the members list a stream starts with, comments stored before they are told, deletion keys,
and a ``Chat`` that is handed all it uses."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import monkestream.chat
from helpers import AppThread, SSEClient, request
from monkestream.chat import Chat, Membership
from monkestream.clock import VirtualScheduler
from monkestream.http11 import Request
from monkestream.hub import Hub
from monkestream.ratelimit import RateLimiter
from monkestream.routing import Exchange
from monkestream.store import Comment


def members_list(client: SSEClient) -> list[str]:
    (members,) = client.wait_for(1, name="members")
    return json.loads(members.data)["users"]


def test_chat_rule_2_a_stream_starts_with_everyone_present_itself_included_however_it_arrived(tmp_path):
    with AppThread(tmp_path / "members.db") as s:
        with SSEClient(s.port, "/room/lobby/event?user=ann") as ann:
            assert members_list(ann) == ["ann"]
            with SSEClient(s.port, "/events?topic=ticker:DOGE&topic=room:lobby&user=bob") as bob:
                assert members_list(bob) == ["ann", "bob"]
                last = ann.wait_for(2, name="user_joined")[-1].last_event_id  # ann sees bob come
                with SSEClient(s.port, "/room/lobby/event?user=cy", {"Last-Event-ID": last}) as cy:  # resuming
                    assert members_list(cy) == ["ann", "bob", "cy"]
                    before_members = [e.type for e in cy.events[: [e.type for e in cy.events].index("members")]]
                    assert set(before_members) <= {"user_joined"}  # nothing live comes before the list
                assert [json.loads(e.data)["user"] for e in ann.wait_for(3, name="user_joined")] == ["ann", "bob", "cy"]


def test_chat_rule_3_a_comment_and_a_deletion_are_written_before_they_are_published(tmp_path):
    steps: list[tuple[str, int]] = []
    with AppThread(tmp_path / "order.db") as s:
        store, hub = s.app.store, s.app.hub
        add, delete, publish = store.add_comment, store.delete_comment, hub.publish

        async def adding(*args: Any) -> Comment:
            comment = await add(*args)
            steps.append(("stored", comment.id))
            return comment

        async def deleting(room: str, comment_id: int) -> bool:
            done = await delete(room, comment_id)
            steps.append(("deleted from SQLite", comment_id))
            return done

        def publishing(topic: str, name: str, data: Any, **kwargs: Any):
            if name.startswith("comment_"):
                steps.append((name, data["id"]))
            return publish(topic, name, data, **kwargs)

        def wrap() -> None:
            store.add_comment, store.delete_comment, hub.publish = adding, deleting, publishing
        s.call(wrap)
        with SSEClient(s.port, "/room/r/event") as watcher:
            status, _, body = request(s.port, "POST", "/room/r/comments", {"user": "ann", "text": "hi"})
            posted = json.loads(body)
            assert status == 201
            assert request(s.port, "DELETE", f"/room/r/comments/{posted['id']}",
                           headers={"X-Delete-Key": posted["deleteKey"]})[0] == 204
            assert [e.type for e in watcher.wait_for(2)] == ["comment_posted", "comment_deleted"]
    n = posted["id"]
    assert steps == [("stored", n), ("comment_posted", n), ("deleted from SQLite", n), ("comment_deleted", n)]


def test_chat_rule_4_only_the_keys_hash_is_stored_and_deleting_needs_the_key_or_the_token(tmp_path):
    db = tmp_path / "keys.db"
    with AppThread(db, token="s3cret") as s:
        def post(text: str) -> dict[str, Any]:
            status, _, body = request(s.port, "POST", "/room/r/comments", {"user": "ann", "text": text})
            assert status == 201
            return json.loads(body)

        first, second, kept = post("one"), post("two"), post("kept")
        path = f"/room/r/comments/{first['id']}"
        assert request(s.port, "DELETE", path)[0] == 401
        assert request(s.port, "DELETE", path, headers={"X-Delete-Key": second["deleteKey"]})[0] == 403
        assert request(s.port, "DELETE", f"{path}?key={first['deleteKey']}")[0] == 400  # never in a URL
        assert request(s.port, "DELETE", path, headers={"X-Delete-Key": first["deleteKey"]})[0] == 204
        assert request(s.port, "DELETE", f"/room/r/comments/{second['id']}",
                       headers={"Authorization": "Bearer s3cret"})[0] == 204
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT id, delete_key FROM comments").fetchall() == [
            (kept["id"], hashlib.sha256(kept["deleteKey"].encode()).hexdigest())]
    finally:
        conn.close()
    on_disk = b"".join(path.read_bytes() for path in tmp_path.glob("keys.db*"))
    assert all(c["deleteKey"].encode() not in on_disk for c in (first, second, kept))


class FakeStore:
    """What ``Chat`` asks of a store, and nothing else."""

    def __init__(self) -> None:
        self.comments: list[Comment] = []

    async def add_comment(self, room: str, user: str, text: str, created_at: int, delete_key: str) -> Comment:
        comment = Comment(len(self.comments) + 1, room, user, text, created_at)
        self.comments.append(comment)
        return comment


def test_chat_rule_7_chat_is_handed_all_it_uses_and_knows_nothing_of_the_app():
    tree = ast.parse(Path(monkestream.chat.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"app", "server", "streams", "config", "tickers", "ingest", "metrics", "static"}

    async def main() -> None:
        scheduler = VirtualScheduler()
        hub, store, opened = Hub(epoch=1, scheduler=scheduler), FakeStore(), []
        given = {"hub": hub, "store": store, "limiter": RateLimiter(1.0, 5, scheduler=scheduler),
                 "joins": RateLimiter(1.0, 5, scheduler=scheduler), "has_token": lambda request: False,
                 "open_stream": lambda ex, topics, member: opened.append((topics, member)) or "the stream",
                 "make_member": None}
        chat = Chat(**{name: given[name] for name in list(inspect.signature(Chat).parameters)})
        get = Request("GET", "/room/lobby/event?user=ann", "/room/lobby/event", "user=ann", "1.1", [], b"", True)
        assert chat.room_events(Exchange(get, {"room": "lobby"}, "127.0.0.1")) == "the stream"
        ((topics, member),) = opened
        assert topics == ["room:lobby"] and isinstance(member, Membership) and member.user == "ann"
        # on a relay, it is handed what makes its users present upstream
        relayed = Chat(**{**{name: given[name] for name in list(inspect.signature(Chat).parameters)},
                          "make_member": lambda rooms, user, client: ("upstream", rooms, user, client)})
        relayed.room_events(Exchange(get, {"room": "lobby"}, "127.0.0.1"))
        assert opened[-1] == (["room:lobby"], ("upstream", ["lobby"], "ann", "127.0.0.1"))
        opened.pop()
        sub = hub.subscribe("room:lobby")
        body = b'{"user": "ann", "text": "hello"}'
        post = Request("POST", "/room/lobby/comments", "/room/lobby/comments", "", "1.1",
                       [("content-type", "application/json")], body, True)
        response = await chat.post_comment(Exchange(post, {"room": "lobby"}, "127.0.0.1"))
        assert response.status == 201 and [c.text for c in store.comments] == ["hello"]
        assert [(e.name, e.data["text"]) for e in sub.drain()] == [("comment_posted", "hello")]
        assert abs(store.comments[0].created_at - time.time()) < 60

    asyncio.run(main())
