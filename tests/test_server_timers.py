"""The server's timers on virtual time: heartbeats, stalled streams, maximum age, request timeouts.

A real ``Server`` and ``Hub`` share one ``VirtualScheduler``; connections are
the server's own ``Connection`` protocol objects on fake transports, driven the
way asyncio drives them (``data_received``, ``pause_writing``, ...). Nothing
sleeps: time moves only in ``advance``, so each test asserts the exact instant
a thing happens, and that it has not happened an instant before.

The tick runs every ``TICK_S`` (0.5 s here) from the server's start at t=0.
"""

from __future__ import annotations

import asyncio
import random
from typing import Callable

import pytest

from marbles import marble_test
from monkestream.app import App
from monkestream.clock import VirtualScheduler
from monkestream.config import Config
from monkestream.http11 import chunk
from monkestream.hub import CloseReason, Hub
from monkestream.server import Connection, EventStream, Exchange, Router, Server
from monkestream.sse import encode_comment

EPSILON = 1e-3
HEARTBEAT_ON_THE_WIRE = chunk(encode_comment())


class FakeTransport:
    """What a ``Connection`` needs of an asyncio transport; it records writes and closes like one."""

    def __init__(self, protocol: Connection) -> None:
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.buffered = 0          # what get_write_buffer_size() answers
        self.closed = False
        self.aborted = False
        self._lost = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        if not self.buffered:  # asyncio waits for the buffer to drain before it lets go
            self._lose()

    def abort(self) -> None:
        self.closed = self.aborted = True
        self._lose()

    def _lose(self) -> None:
        if not self._lost:
            self._lost = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def heartbeats(self) -> int:
        return self.writes.count(HEARTBEAT_ON_THE_WIRE)


class Lowest(random.Random):
    """Jitter at its lower bound, so a maximum age is exactly 0.8 × the setting."""

    def uniform(self, a: float, b: float) -> float:
        return a

    def randint(self, a: int, b: int) -> int:
        return a


async def started(scheduler: VirtualScheduler, **settings: object) -> Server:
    """A server listening from t=0, with a route ``/t/{topic}`` opening a stream on one topic."""
    hub = Hub(epoch=1, wire_framing=chunk, scheduler=scheduler)
    router = Router()
    router.add("GET", "/t/{topic}", stream_on, "a stream on one topic")
    config = Config(port=0, no_demo=True, **settings)  # type: ignore[arg-type]
    server = Server(config, hub, router, rng=Lowest())
    await server.start()
    return server


def stream_on(ex: Exchange) -> EventStream:
    return EventStream([ex.params["topic"]])


async def connect(server: Server, request: bytes) -> tuple[Connection, FakeTransport]:
    """A connection that sent ``request``; returns once everything it set off has run."""
    conn = Connection(server)
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    if request:
        conn.data_received(request)
    await server.scheduler.advance(0)  # type: ignore[attr-defined]
    return conn, transport


async def open_stream(server: Server, topic: str = "A") -> tuple[Connection, FakeTransport]:
    conn, transport = await connect(server, f"GET /t/{topic} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert conn.stream is not None and not transport.closed
    return conn, transport


async def blocked_stream(scheduler: VirtualScheduler, **settings: object) -> tuple[Server, Connection, FakeTransport]:
    """A started server, and a stream opened at 0.25 whose transport fills at once (asyncio's ``pause_writing``)."""
    server = await started(scheduler, **settings)
    await at(scheduler, 0.25)
    conn, transport = await open_stream(server)
    transport.buffered = 10_000
    conn.pause_writing()
    return server, conn, transport


async def at(scheduler: VirtualScheduler, when: float) -> None:
    await scheduler.advance_to(when)


async def happens_at(scheduler: VirtualScheduler, when: float, happened: Callable[[], bool]) -> None:
    """``happened()`` is false an instant before ``when``, and true at ``when``."""
    await scheduler.advance_to(when - EPSILON)
    assert not happened(), f"already at {when} - {EPSILON}"
    await scheduler.advance_to(when)
    assert happened(), f"not yet at {when}"


# -- heartbeats -------------------------------------------------------------------


async def check_heartbeats(scheduler: VirtualScheduler, heartbeat: float, opened_at: float,
                           expected: list[float]) -> None:
    """A quiet stream opened at ``opened_at`` gets its n-th heartbeat exactly at ``expected[n - 1]``."""
    server = await started(scheduler, heartbeat=heartbeat)
    await at(scheduler, opened_at)
    _, quiet = await open_stream(server)
    for n, when in enumerate(expected, 1):
        await happens_at(scheduler, when, lambda: quiet.heartbeats() == n)
    await server.stop()


@marble_test
async def test_a_quiet_stream_gets_its_heartbeat_at_the_first_round(scheduler: VirtualScheduler) -> None:
    """heartbeat=1.2 on a 0.5 s tick: rounds at 1.5, 3.0, 4.5 (the first tick at least 1.2 s after the last)."""
    await check_heartbeats(scheduler, 1.2, 0.25, [1.5, 3.0, 4.5])


@marble_test
async def test_a_stream_opened_within_a_heartbeat_of_the_round_waits_for_the_next(scheduler: VirtualScheduler) -> None:
    """heartbeat=1: rounds at 1.0, 2.0, ...; a stream opened at 0.25 is not yet quiet for 1 s at 1.0."""
    await check_heartbeats(scheduler, 1.0, 0.25, [2.0, 3.0])


@marble_test
async def test_an_event_puts_off_the_heartbeat_by_a_round(scheduler: VirtualScheduler) -> None:
    server = await started(scheduler, heartbeat=1.0)
    _, busy = await open_stream(server, "B")
    _, idle = await open_stream(server, "I")
    await at(scheduler, 1.25)
    server.hub.publish("B", "tick", 1)
    await at(scheduler, 2.0)  # the round: B had an event 0.75 s ago, I had nothing for 2 s
    assert (busy.heartbeats(), idle.heartbeats()) == (0, 1)
    await happens_at(scheduler, 3.0, lambda: busy.heartbeats() == 1)
    assert idle.heartbeats() == 2
    await server.stop()


@marble_test
async def test_a_paused_stream_gets_no_heartbeat(scheduler: VirtualScheduler) -> None:
    server, conn, blocked = await blocked_stream(scheduler, heartbeat=1.0, stall_timeout=60)
    await at(scheduler, 5.0)
    assert blocked.heartbeats() == 0
    blocked.buffered = 0
    conn.resume_writing()
    await happens_at(scheduler, 6.0, lambda: blocked.heartbeats() == 1)
    await server.stop()


# -- stalled streams ----------------------------------------------------------------


@marble_test
async def test_a_stream_blocked_past_the_stall_timeout_is_closed_at_the_next_tick(scheduler: VirtualScheduler) -> None:
    """stall_timeout=2, blocked at 0.25: still open at the 2.0 tick (1.75 s), closed at the 2.5 tick."""
    server, conn, stalled = await blocked_stream(scheduler, stall_timeout=2.0)
    await happens_at(scheduler, 2.5, lambda: stalled.closed)
    assert not stalled.aborted
    assert server.hub.closed_by_reason[CloseReason.PEER_GONE] == 1
    assert not server.streams and not server.paused
    # the peer still reads nothing: the socket is let go a stall timeout later
    await happens_at(scheduler, 4.5, lambda: stalled.aborted)
    await scheduler.advance(0)
    assert conn not in server.connections
    await server.stop()


@marble_test
async def test_draining_in_time_restarts_the_stall_clock(scheduler: VirtualScheduler) -> None:
    server, conn, reader = await blocked_stream(scheduler, stall_timeout=2.0)
    await at(scheduler, 1.0)
    reader.buffered = 0
    conn.resume_writing()
    await at(scheduler, 1.25)
    conn.pause_writing()  # blocked again at 1.25: closed at the first tick past 3.25
    await happens_at(scheduler, 3.5, lambda: reader.closed)
    assert server.hub.closed_by_reason[CloseReason.PEER_GONE] == 1
    await server.stop()


# -- maximum age --------------------------------------------------------------------


@marble_test
async def test_streams_are_closed_at_their_maximum_age(scheduler: VirtualScheduler) -> None:
    """max_stream_age=10, jittered to 8 s: opened at 0.25 → closed at the 8.5 tick; opened at 3 → at 11 exactly."""
    server = await started(scheduler, max_stream_age=10)
    await at(scheduler, 0.25)
    _, first = await open_stream(server)
    await at(scheduler, 3.0)
    _, second = await open_stream(server)
    assert b"retry: 3000\n\n" in b"".join(first.writes)  # the reconnection hint, at its lowest jitter
    await happens_at(scheduler, 8.5, lambda: first.closed)
    assert first.writes[-1] == b"0\r\n\r\n"  # the stream's last chunk: a clean end
    await happens_at(scheduler, 11.0, lambda: second.closed)
    assert server.hub.closed_by_reason[CloseReason.MAX_AGE] == 2
    assert not server.streams
    await server.stop()


# -- request timeouts -----------------------------------------------------------------


@pytest.mark.parametrize(("first", "more"), [
    (b"GET /t/A HTTP/1.1\r\n", b"Host: x\r\n"),
    (b"POST /t/A HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", b"def"),
], ids=["head", "body"])
def test_server_rule_4_a_request_that_does_not_arrive_in_time_gets_408(first: bytes, more: bytes) -> None:
    """Its head, or its body, trickles in: the deadline counts from its first byte, whatever follows."""

    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        server = await started(scheduler, header_timeout=3.0)
        await at(scheduler, 0.25)
        conn, trickler = await connect(server, first)
        await at(scheduler, 2.0)
        conn.data_received(more)
        await happens_at(scheduler, 3.25, lambda: trickler.closed)
        assert len(trickler.writes) == 1 and trickler.writes[0].startswith(b"HTTP/1.1 408 ")
        await server.stop()

    run()


@marble_test
async def test_server_rule_4_an_idle_keepalive_connection_closes_at_its_timeout(scheduler: VirtualScheduler) -> None:
    server = await started(scheduler, keepalive_timeout=5.0)
    _, idle = await connect(server, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.writes[0].startswith(b"HTTP/1.1 404 ")
    await happens_at(scheduler, 5.0, lambda: idle.closed)
    await server.stop()


# -- one clock ------------------------------------------------------------------------


def test_app_rule_2_the_app_gives_its_one_scheduler_to_every_part(tmp_path) -> None:
    scheduler = VirtualScheduler()
    app = App(Config(port=0, db=str(tmp_path / "one.db"), no_demo=True), scheduler)
    assert app.hub.scheduler is scheduler
    assert app.server.scheduler is scheduler
    assert app.ingest.scheduler is scheduler


def test_server_rule_5_the_server_uses_the_hubs_scheduler_unless_told_otherwise() -> None:
    scheduler = VirtualScheduler()
    hub = Hub(scheduler=scheduler)
    assert Server(Config(), hub, Router()).scheduler is scheduler


# -- the module's rules not covered above --------------------------------------------------


@marble_test
async def test_server_rule_3_a_stream_costs_no_task_and_no_timer_of_its_own(scheduler: VirtualScheduler) -> None:
    server = await started(scheduler, heartbeat=1.0, stall_timeout=2.0, max_stream_age=60)
    tasks, timers = len(asyncio.all_tasks()), scheduler.pending
    assert timers == 1  # the shared tick
    streams = [await open_stream(server, f"T{i % 3}") for i in range(30)]
    assert len(asyncio.all_tasks()) == tasks and scheduler.pending == timers
    server.hub.publish("T0", "e", 1)
    slow, blocked = streams[2]
    blocked.buffered = 10_000
    slow.pause_writing()
    await at(scheduler, 2.0)  # a heartbeat round, from the one tick, to the quiet streams
    assert all(transport.heartbeats() == 1 for _, transport in streams[1::3] if transport is not blocked)
    assert len(asyncio.all_tasks()) == tasks and scheduler.pending == timers
    await at(scheduler, 3.0)  # the same tick closes the stalled one
    assert blocked.closed and server.hub.closed_by_reason[CloseReason.PEER_GONE] == 1
    await at(scheduler, 5.0)  # no longer a stream: its socket is let go a stall timeout later
    assert blocked.aborted and len(asyncio.all_tasks()) == tasks and scheduler.pending == timers
    await server.stop()
