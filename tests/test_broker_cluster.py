"""A cluster of nodes on one Redis log: resume anywhere, chat and presence across nodes, late nodes.

Real ``redis-server`` and real node processes, as in ``test_broker``.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from helpers import ServerProcess, SSEClient, request
from test_broker import bulk, cluster, health, price, prices, redis_server, wait_until  # noqa: F401 - fixtures

import pytest
import shutil

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def ids_and_prices(client: SSEClient) -> list[tuple[str, str]]:
    return [(i, json.loads(d)["price"]) for i, d in prices(client)]


def comments(node: ServerProcess, room: str) -> list[dict[str, Any]]:
    return json.loads(request(node.port, "GET", f"/room/{room}/comments")[2])["comments"]


# -- cluster Rule 1: writes go to the log, every node applies them ------------------------

def test_cluster_rule_1_a_comment_has_one_id_everywhere_and_a_deletion_on_any_node_deletes_it_everywhere(cluster):
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    with SSEClient(c.port, "/room/lobby/event") as on_c, SSEClient(a.port, "/room/lobby/event") as on_a:
        status, _, body = request(a.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "hello"})
        assert status == 201
        posted = json.loads(body)
        assert comments(a, "lobby") == [{k: v for k, v in posted.items() if k != "deleteKey"}]
        wait_until(lambda: comments(b, "lobby") == comments(c, "lobby") == comments(a, "lobby"))
        status, _, _ = request(b.port, "DELETE", f"/room/lobby/comments/{posted['id']}",
                               headers={"X-Delete-Key": "wrong"})
        assert status == 403
        status, _, _ = request(b.port, "DELETE", f"/room/lobby/comments/{posted['id']}",
                               headers={"X-Delete-Key": posted["deleteKey"]})
        assert status == 204
        assert comments(b, "lobby") == []
        wait_until(lambda: comments(a, "lobby") == comments(c, "lobby") == [])
        for stream in (on_c, on_a):
            stream.wait_for(2, timeout=10)
        seen = [[(e.type, e.last_event_id, json.loads(e.data)["id"]) for e in s.events
                 if e.type.startswith("comment")] for s in (on_a, on_c)]
        assert seen[0] == seen[1] and [t for t, _, _ in seen[0]] == ["comment_posted", "comment_deleted"]
        assert {i for _, _, i in seen[0]} == {posted["id"]}
    status, _, body = request(c.port, "POST", "/room/lobby/comments", {"user": "bob", "text": "next"})
    assert status == 201 and json.loads(body)["id"] > posted["id"]  # one counter for every node


# -- cluster Rule 2: resume anywhere -----------------------------------------------------------

def test_cluster_rule_2_after_kill_9_of_a_node_its_clients_resume_on_another_with_no_gap_and_no_duplicate(cluster):
    a = cluster.node("a")
    b = cluster.node("b")
    c = cluster.node("c", "--replay-events", "4")  # its rings are short: the rest comes from the log
    with SSEClient(b.port, "/ticker/DOGE/event") as witness, SSEClient(a.port, "/ticker/DOGE/event") as victim:
        for i in range(10):
            assert bulk(b, [("DOGE", f"{i}.1"), ("BTC", str(i + 1))]) == 201
        victim.wait_for(10, name="price_update")
        last = victim.events[-1].last_event_id
        a.stop(signal.SIGKILL)
        for i in range(10, 40):
            assert bulk(b, [("DOGE", f"{i}.1"), ("BTC", str(i + 1))]) == 201
        witness.wait_for(40, name="price_update")
        wait_until(lambda: health(c)["broker"]["position"] == health(b)["broker"]["position"])
        with SSEClient(c.port, "/ticker/DOGE/event", {"Last-Event-ID": last}) as resumed:
            resumed.wait_for(30, name="price_update")
            assert not [e for e in resumed.events if e.type == "reset"]
            assert ids_and_prices(victim) + ids_and_prices(resumed) == ids_and_prices(witness)
            assert price(b, "DOGE", "99")[0] == 201  # and it goes on live
            resumed.wait_for(31, name="price_update")
            witness.wait_for(41, name="price_update")
            assert ids_and_prices(victim) + ids_and_prices(resumed) == ids_and_prices(witness)


def test_cluster_rule_2_beyond_the_log_a_resume_comes_from_sqlite_and_beyond_that_is_a_reset(cluster):
    a = cluster.node("a", "--broker-retention", "100", "--replay-events", "4")
    with SSEClient(a.port, "/ticker/DOGE/event") as witness:
        assert price(a, "DOGE", "1")[0] == 201
        witness.wait_for(1, name="price_update")
        first = witness.events[-1].last_event_id
        for i in range(30):  # far past the log's 100 entries, and DOGE's ring
            assert bulk(a, [("DOGE", f"{i + 2}")] + [("BTC", str(i + 1))] * 20) == 201
        witness.wait_for(31, name="price_update")
        time.sleep(0.3)  # the last window reaches SQLite
        with SSEClient(a.port, "/ticker/DOGE/event", {"Last-Event-ID": first}) as resumed:
            resumed.wait_for(30, name="price_update")
            assert not [e for e in resumed.events if e.type == "reset"]
            assert ids_and_prices(resumed) == ids_and_prices(witness)[1:]
    late = cluster.node("late", "--broker-retention", "100")  # it never saw what the log no longer holds
    wait_until(lambda: health(late)["broker"]["position"] == health(a)["broker"]["position"])
    for path in ("/room/lobby/event", "/ticker/DOGE/event"):
        with SSEClient(late.port, path, {"Last-Event-ID": first}) as stream:
            stream.wait_for(1)
            assert stream.events[0].type == "reset"


# -- cluster Rule 3: chat across nodes ------------------------------------------------------------

def test_cluster_rule_3_presence_is_cluster_wide_and_a_dead_nodes_users_leave(cluster):
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    with SSEClient(c.port, "/room/lobby/event?user=obs", timeout=40) as observer:
        observer.wait_for(1, name="members")
        observer.wait_for(1, name="user_joined")  # its own join, read back from the log, before ann's tabs
        tab_a = SSEClient(a.port, "/room/lobby/event?user=ann")
        tab_b = SSEClient(b.port, "/room/lobby/event?user=ann")
        observer.wait_for(2, name="user_joined")  # obs, then ann once
        observer.pump(0.5)
        joined = [json.loads(e.data)["user"] for e in observer.events if e.type == "user_joined"]
        assert joined == ["obs", "ann"]
        tab_b.wait_for(1, name="members")
        with SSEClient(b.port, "/room/lobby/event?user=zed") as late:
            members = json.loads(late.wait_for(1, name="members")[0].data)["users"]
            assert members == ["ann", "obs", "zed"]
        tab_a.close()  # ann is still on b
        observer.wait_for(1, name="user_left")  # zed
        observer.pump(1.0)
        assert [json.loads(e.data)["user"] for e in observer.events if e.type == "user_left"] == ["zed"]
        started = time.monotonic()
        b.stop(signal.SIGKILL)  # ann's last tab was there
        left = observer.wait_for(2, name="user_left", timeout=40)
        assert [json.loads(e.data)["user"] for e in left] == ["zed", "ann"]
        assert time.monotonic() - started < 30
        tab_b.close()


def test_cluster_rule_3_the_comment_rate_is_per_client_across_nodes(cluster):
    a = cluster.node("a", "--comment-burst", "2", "--comment-rate", "0.01")
    b = cluster.node("b", "--comment-burst", "2", "--comment-rate", "0.01")
    for node in (a, b):
        assert request(node.port, "POST", "/room/r/comments", {"user": "u", "text": "x"})[0] == 201
    status, headers, _ = request(a.port, "POST", "/room/r/comments", {"user": "u", "text": "x"})
    assert status == 429 and int(headers["retry-after"]) >= 1


# -- every node whole: a late node, a node coming back ------------------------------------------

def test_a_node_started_late_catches_up_history_charts_and_symbols_from_the_log(cluster):
    a = cluster.node("a")
    now = int(time.time())
    rows = [{"symbol": "ETH", "price": str(1000 + i), "currency": "USD", "createdAt": now - 600 + i * 10}
            for i in range(60)]
    assert request(a.port, "POST", "/tickers", rows)[0] == 201
    assert request(a.port, "POST", "/room/lobby/comments", {"user": "ann", "text": "before"})[0] == 201
    late = cluster.node("late")

    def history(node: ServerProcess) -> list[Any]:
        return json.loads(request(node.port, "GET", "/ticker/ETH/history?limit=1000")[2])["tickers"]
    wait_until(lambda: len(history(late)) == 60, what="the late node's history")
    assert history(late) == history(a)
    assert [s["symbol"] for s in json.loads(request(late.port, "GET", "/symbols")[2])["symbols"]] == ["ETH"]
    points = wait_until(lambda: json.loads(request(late.port, "GET", "/ticker/ETH/chart?window=1h")[2])["points"])
    assert {p["price"] for p in points} <= {1000 + i for i in range(60)}
    assert [c["text"] for c in comments(late, "lobby")] == ["before"]


def test_a_node_coming_back_catches_up_from_its_own_position_without_duplicates(cluster):
    a, b = cluster.node("a"), cluster.node("b")
    assert bulk(a, [("DOGE", str(i + 1)) for i in range(10)]) == 201
    wait_until(lambda: health(b)["broker"]["position"] == health(a)["broker"]["position"])
    assert b.stop() == 0
    assert bulk(a, [("DOGE", str(i + 11)) for i in range(10)]) == 201
    b = cluster.node("b")

    def history(node: ServerProcess) -> list[Any]:
        return json.loads(request(node.port, "GET", "/ticker/DOGE/history?limit=1000")[2])["tickers"]
    wait_until(lambda: len(history(b)) >= 20, what="b's history")
    time.sleep(0.3)
    assert [t["price"] for t in history(b)] == list(range(1, 21))
    assert health(b)["broker"]["gaps"] == 0


def test_cluster_rule_1_ingest_refuses_while_this_node_has_not_applied_what_it_appended():
    from monkestream.broker import Broker
    from monkestream.charts import ChartCache
    from monkestream.cluster import LOG_BEHIND_MAX_S, LogIngest
    from monkestream.hub import Hub
    from monkestream.ingest import IngestRefused
    from monkestream.sse import EventId

    hub = Hub(epoch=0)
    broker = Broker("redis://127.0.0.1:1/0", "1000", hub)  # never connected: only its bookkeeping is used
    ingest = LogIngest(broker, hub, ChartCache(), flush_interval=1.0)
    now_ms = int(time.time() * 1000)
    broker.last_appended = EventId(now_ms, 3)
    ingest.applied = lambda: EventId(now_ms - int(LOG_BEHIND_MAX_S * 1000), 0)
    ingest.check_capacity(10)  # just within
    ingest.applied = lambda: EventId(now_ms - int(LOG_BEHIND_MAX_S * 1000) - 1, 7)
    with pytest.raises(IngestRefused) as refused:
        ingest.check_capacity(10)
    assert refused.value.retry_after >= 1 and "behind the log" in str(refused.value)
    ingest.applied = lambda: EventId(now_ms, 3)  # caught up
    ingest.check_capacity(10)
