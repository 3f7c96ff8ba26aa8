"""``--workers``: an origin and its relays sharing one port, as real processes, supervised by a parent.

Clients and writes are spread across the processes by the kernel (SO_REUSEPORT):
every stream must still get every event, in the same order under the same ids,
whichever process it landed on; a worker that dies is started again; SIGTERM
stops them all with nothing lost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from helpers import ServerProcess, healthz, request
from test_relay import Source, post_price

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading is Linux's")


def answering(port: int, tries: int = 40) -> dict[int, str]:
    """pid -> role, of the processes that answered ``tries`` new connections."""
    seen: dict[int, str] = {}
    for _ in range(tries):
        health = healthz(port)
        seen[health["pid"]] = health["role"]
    return seen


def wait_for_pids(port: int, count: int, timeout: float = 20.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen = answering(port)
        except (OSError, AssertionError):
            seen = {}
        if len(seen) >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_workers_rule_1_clients_and_writes_spread_across_processes_see_one_service(tmp_path):
    with ServerProcess(tmp_path / "w.db", "--no-demo", "--workers", "2", "--flush-interval", "0.05") as srv:
        seen = wait_for_pids(srv.port, 2)
        assert sorted(seen.values()) == ["origin", "relay"]
        sources = [Source(srv.port, "/ticker/BTC/event") for _ in range(16)]
        try:
            for n in range(1, 21):  # each on a new connection: the kernel spreads them too
                assert post_price(srv.port, "BTC", n) == 201
            for source in sources:
                assert source.wait_prices(20) == list(range(1, 21))
            firsts = {tuple(e.last_event_id for e in s.events if e.type == "price_update") for s in sources}
            assert len(firsts) == 1   # one order, one set of ids, on every process
            answered = {re.search(r'monkestream_process_info\{role="(\w+)",worker="(\d)"',
                                  request(srv.port, "GET", "/metrics")[2].decode()).groups() for _ in range(30)}
            assert answered == {("origin", "0"), ("relay", "1")}
        finally:
            for source in sources:
                source.close()
        assert srv.stop(signal.SIGTERM) == 0
    log = srv.read_log()
    assert "all workers stopped" in log and log.count("stopped cleanly") == 2


@pytest.mark.parametrize("role", ["relay", "origin"])
def test_workers_rule_2_a_worker_that_dies_is_started_again_and_streams_go_on(tmp_path, role):
    with ServerProcess(tmp_path / "w.db", "--no-demo", "--workers", "2", "--flush-interval", "0.05") as srv:
        seen = wait_for_pids(srv.port, 2)
        victim = next(pid for pid, r in seen.items() if r == role)
        sources = [Source(srv.port, "/ticker/BTC/event") for _ in range(8)]
        try:
            for n in range(1, 6):
                assert post_price(srv.port, "BTC", n) == 201
            for source in sources:
                assert source.wait_prices(5) == [1, 2, 3, 4, 5]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                seen = wait_for_pids(srv.port, 2, timeout=2)
                if len(seen) == 2 and victim not in seen:
                    break
                assert time.monotonic() < deadline, seen
            if role == "origin":  # its run's events are gone with it: every client is told so, once
                for source in sources:
                    deadline = time.monotonic() + 20
                    while not [e for e in source.events if e.type == "reset"]:
                        assert time.monotonic() < deadline
                        source.pump(0.1)
            for n in range(6, 11):
                deadline = time.monotonic() + 10
                while post_price(srv.port, "BTC", n) != 201:  # a relay answers 503 until its origin is back
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            for source in sources:  # the prices the clients had, then the new ones, once each
                assert source.wait_prices(10) == list(range(1, 11))
                assert len([e for e in source.events if e.type == "reset"]) == (role == "origin")
            assert "exited (signal SIGKILL); starting it again" in srv.read_log()
        finally:
            for source in sources:
                source.close()
        assert srv.stop(signal.SIGTERM) == 0


def test_workers_rule_3_sigterm_stops_all_with_nothing_lost(tmp_path):
    srv = ServerProcess(tmp_path / "w.db", "--no-demo", "--workers", "3", "--flush-interval", "5").start()
    wait_for_pids(srv.port, 3)
    for n in range(1, 51):  # a long window: they are in memory when the signal comes
        assert request(srv.port, "POST", "/tickers", [{"symbol": "ETH", "price": str(n)}])[0] == 201
    pids = set(answering(srv.port))
    assert srv.stop(signal.SIGTERM) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with ServerProcess(tmp_path / "w.db", "--no-demo") as single:
        status, _, body = request(single.port, "GET", "/ticker/ETH/history?limit=100")
        assert [t["price"] for t in json.loads(body)["tickers"]] == list(range(1, 51))
