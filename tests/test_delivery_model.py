"""The delivery rule (hub Rules 2 and 3, replay Rules 1, 2 and 4), checked against a reference model.

A hypothesis state machine drives the real ``Hub`` and ``Replayer`` through
random interleavings of publish, bulk publish, open, open with resume (from
the ring, or from an SQLite-like store whose read is still in progress while
other steps run), pause (also from inside a write, as a transport does),
resume, overflow past the cap, close and flush, over lossless and conflating
topics. Every byte a stream is sent goes through the WHATWG parser, and after
each step every stream is checked against the log of what was published:

- ids ascend strictly, so no event arrives twice;
- every event received belongs to the stream's topics, comes after where it
  started, and is exactly the event published under that id;
- nothing is missing: up to the last event received (and, once the hub is
  settled, up to the hub's last id for a stream still open) every event of its
  topics arrived, except an event of a conflating topic published while the
  stream was paused, and only when a newer one of that topic followed it or
  the stream is still paused or closed; or, from before its position, an
  event of a topic the stream was told to reset, or a live-only event
  (presence, published with ``keep=False``).

Rings are small and share a small byte budget, and idle topics are expired,
so resumes often fall outside what the hub holds and must get a ``reset``.

A sink's bytes count as unsent only while its stream is paused, as a
transport pauses a stream past its high-water mark; the other way a slow
reader is conflated, a bulk batch larger than a stream's headroom, is
``test_hub.py``'s ``test_a_big_batch_skips_streams_that_are_behind``.

``HYPOTHESIS_PROFILE=long`` runs many more and longer interleavings.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from monkestream.hub import CloseReason, Hub, Stream
from monkestream.replay import Replayer
from monkestream.sse import EventId, EventStreamParser
from monkestream.store import StoredTicker
from monkestream.ticker import Ticker

settings.register_profile("ci", max_examples=150, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, stateful_step_count=120, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

TOPICS = ("ticker:A", "ticker:B", "room:R", "room:S")
CONFLATING = {"ticker:A", "ticker:B"}
# a few topic sets, so that streams often share one (and its Fanout), plus any other set
TOPIC_SETS = st.one_of(st.sampled_from([{"ticker:A"}, {"room:R"}, {"ticker:A", "room:R"}, set(TOPICS)]),
                       st.sets(st.sampled_from(TOPICS), min_size=1))
EPOCH = 7
RING = 4
RING_BYTES = 3000   # all rings together: trims them often
CAP = 4096
BUDGET = 2048


class ManualScheduler:
    """Time stands still; ``call_soon`` callbacks (the hub's flush) run only when the machine says so."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def now(self) -> float:
        return 0.0

    def call_later(self, delay: float, callback: Any) -> Any:
        raise AssertionError("the hub keeps no timers")

    def call_soon(self, callback: Any) -> Any:
        self.calls.append(callback)
        return None

    async def sleep(self, delay: float) -> None:
        raise AssertionError("the hub never sleeps")

    def run(self) -> None:
        while self.calls:
            calls, self.calls = self.calls, []
            for callback in calls:
                callback()


class Suspend:
    """An await that hands control back to the machine: an SQLite read in progress."""

    def __await__(self) -> Any:
        yield


class FakeStore:
    """SQLite as the replayer sees it: this run's tickers up to what the writer has written."""

    def __init__(self, log: dict[EventId, tuple[str, Any]]) -> None:
        self.log = log
        self.written = 0   # every ticker of this run with seq <= written is stored

    def covers(self, after: EventId) -> bool:
        return after.epoch == EPOCH

    def ends_previous_run(self, after: EventId) -> bool:
        return False  # one run: no previous one

    async def replay_many(self, symbols: list[str], after: EventId, limit: int,
                          most: int = 10000) -> dict[str, list[StoredTicker] | None]:
        snapshot = self.written  # the read sees the database as it is when it starts
        await Suspend()
        out: dict[str, list[StoredTicker] | None] = {}
        for symbol in symbols:
            rows = [StoredTicker(i, data) for i, (topic, data) in sorted(self.log.items())
                    if topic == "ticker:" + symbol and after < i and i.seq <= snapshot]
            out[symbol] = rows[:limit]
        return out


class Sink:
    """A stream's far end: the bytes go through the WHATWG parser; it can pause like a transport."""

    def __init__(self, machine: DeliveryMachine) -> None:
        self.machine = machine
        self.parser = EventStreamParser()
        self.events: list[tuple[EventId, str, Any]] = []
        self.backlog = 0
        self.closed_with: CloseReason | None = None
        self.pause_on_write = False
        self.stream: Stream | None = None

    def _take(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            self.events.append((EventId.parse(event.last_event_id), event.type, json.loads(event.data)))
        if self.pause_on_write and self.stream is not None:
            self.pause_on_write = False
            self.machine.hub.pause(self.stream)  # as a transport does, from inside the write

    def send(self, frames: bytes) -> None:
        assert self.closed_with is None, "written after the hub closed it"
        self._take(frames)

    def buffered(self) -> int:
        return self.backlog

    def hub_closed(self, reason: CloseReason) -> None:
        self.closed_with = reason


class Client:
    """One stream as the model sees it."""

    def __init__(self, topics: tuple[str, ...], after: EventId | None, sink: Sink) -> None:
        self.topics = topics
        self.after = after              # where it started: its Last-Event-ID, or the hub's id at the request
        self.sink = sink
        self.stream: Stream | None = None
        self.position: EventId | None = None   # set when it went live; None: closed with part of its backlog
        self.started: EventId | None = None    # the hub's last id when its backlog was built
        self.framed = True                     # framed by the hub: it shares a Fanout while it keeps up
        self.held: set[EventId] = set()  # conflating events published while it was paused

    @property
    def closed(self) -> bool:
        return self.sink.closed_with is not None


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.scheduler = ManualScheduler()
        self.hub = Hub(epoch=EPOCH, replay_events=RING, conflate=lambda t: t in CONFLATING,
                       scheduler=self.scheduler, ring_bytes_max=RING_BYTES)
        self.live_only: set[EventId] = set()   # published with keep=False: never in a backlog
        self.log: dict[EventId, tuple[str, Any]] = {}
        self.store = FakeStore(self.log)
        self.replayer = Replayer(self.hub, self.store, budget_bytes=BUDGET,
                                 stored_symbol=lambda t: t[len("ticker:"):] if t in CONFLATING else None)
        self.clients: list[Client] = []
        self.opening: list[tuple[Client, Any]] = []   # resumes waiting on their SQLite read
        self.count = 0

    # -- publishing ---------------------------------------------------------------

    def _publish(self, topic: str, keep: bool = True) -> None:
        self.count += 1
        if topic in CONFLATING:
            data: Any = Ticker(topic[len("ticker:"):], str(self.count), "USD", self.count)
            event = self.hub.publish(topic, "price_update", data, json_text=data.to_json())
            body = json.loads(data.to_json())
        else:
            body = data = {"room": topic, "n": self.count}
            event = self.hub.publish(topic, "comment_posted" if keep else "user_joined", data, keep=keep)
            if not keep:
                self.live_only.add(event.id)
        self.log[event.id] = (topic, data)
        self.bodies[event.id] = body
        for client in self.clients:
            if client.stream is not None and client.stream.paused and topic in CONFLATING:
                client.held.add(event.id)

    @property
    def bodies(self) -> dict[EventId, Any]:
        if not hasattr(self, "_bodies"):
            self._bodies: dict[EventId, Any] = {}
        return self._bodies

    @rule(topics=st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3))
    def publish(self, topics: list[str]) -> None:
        for topic in topics:
            self._publish(topic)

    @rule(topics=st.lists(st.sampled_from(TOPICS), min_size=20, max_size=200))
    def publish_bulk(self, topics: list[str]) -> None:
        for topic in topics:
            self._publish(topic)

    @rule(topic=st.sampled_from(["room:R", "room:S"]))
    def publish_presence(self, topic: str) -> None:
        self._publish(topic, keep=False)

    @rule()
    def expire_idle_topics(self) -> None:
        self.hub.expire(0)

    @rule()
    def flush(self) -> None:
        self.scheduler.run()

    @rule()
    def sqlite_catches_up(self) -> None:
        self.store.written = self.hub.seq

    # -- streams ------------------------------------------------------------------

    @rule(topics=TOPIC_SETS, framed=st.booleans(),
          resume_from=st.one_of(st.none(), st.integers(0, 1000)), lag=st.integers(0, 30))
    def open(self, topics: set[str], framed: bool, resume_from: int | None, lag: int) -> None:
        if resume_from is not None and self.clients:
            last = self.clients[resume_from % len(self.clients)].sink.parser.last_event_id
            last_id = last or str(self.hub.last_id())
        else:  # a new client starts where the hub stands, minus a lag: published while it was opening
            last_id = str(EventId(EPOCH, max(0, self.hub.seq - lag)))
        sink = Sink(self)
        client = Client(tuple(sorted(topics)), EventId.parse(last_id), sink)
        client.framed = framed
        prepare = self.replayer.prepare(list(client.topics), last_id)
        self._step(client, prepare)

    def _step(self, client: Client, prepare: Any) -> None:
        try:
            prepare.send(None)
        except StopIteration as done:
            start = done.value
            stream = Stream(client.topics, client.sink, cap_bytes=CAP,
                            send_framed=client.sink._take if client.framed else None)
            client.sink.stream = client.stream = stream
            self.clients.append(client)
            live = self.hub.open_stream(stream, start)
            client.started = self.hub.last_id()
            if live:
                client.position = client.started
        else:
            self.opening.append((client, prepare))

    @precondition(lambda self: self.opening)
    @rule(i=st.integers(0, 1000))
    def sqlite_read_returns(self, i: int) -> None:
        client, prepare = self.opening.pop(i % len(self.opening))
        self._step(client, prepare)

    def _live(self) -> list[Client]:
        return [c for c in self.clients if not c.closed]

    @precondition(lambda self: self._live())
    @rule(i=st.integers(0, 1000))
    def pause(self, i: int) -> None:
        client = self._live()[i % len(self._live())]
        self.hub.pause(client.stream)

    @precondition(lambda self: self._live())
    @rule(i=st.integers(0, 1000))
    def pause_inside_the_next_write(self, i: int) -> None:
        self._live()[i % len(self._live())].sink.pause_on_write = True

    @precondition(lambda self: self._live())
    @rule(i=st.integers(0, 1000))
    def resume(self, i: int) -> None:
        client = self._live()[i % len(self._live())]
        client.sink.backlog = 0
        self.hub.resume(client.stream)

    @precondition(lambda self: self._live())
    @rule(i=st.integers(0, 1000))
    def overflow(self, i: int) -> None:
        client = self._live()[i % len(self._live())]
        self.hub.pause(client.stream)   # its reader stopped: the transport pauses it,
        client.sink.backlog = CAP + 1   # and the next lossless write passes its cap

    @precondition(lambda self: self._live())
    @rule(i=st.integers(0, 1000))
    def close(self, i: int) -> None:
        client = self._live()[i % len(self._live())]
        self.hub.close_stream(client.stream, CloseReason.CLIENT)

    # -- the rule -----------------------------------------------------------------

    @invariant()
    def every_stream_keeps_the_rule(self) -> None:
        settled = not self.scheduler.calls
        for client in self.clients:
            self._check(client, settled)

    def _check(self, client: Client, settled: bool) -> None:
        events = [e for e in client.sink.events if e[1] != "reset"]
        reset = {t for e in client.sink.events if e[1] == "reset" for t in e[2]["topics"]}
        ids = [e[0] for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), f"ids not once, ascending: {ids}"
        for event_id, _name, body in events:
            topic, _data = self.log[event_id]
            assert topic in client.topics, f"{event_id} of {topic} sent to a stream on {client.topics}"
            assert client.after is not None and event_id > client.after, f"{event_id} is not after {client.after}"
            assert body == self.bodies[event_id], f"{event_id} carries the wrong data"
        received = set(ids)
        bound = max(ids, default=None)
        if settled and not client.closed and client.position is not None:
            bound = self.hub.last_id()
        if bound is None or client.after is None:
            return
        for event_id, (topic, _data) in self.log.items():
            if topic not in client.topics or not client.after < event_id <= bound or event_id in received:
                continue
            if (topic in reset or event_id in self.live_only) and event_id <= client.started:
                continue
            if event_id in client.held and (client.closed or client.stream.paused or any(
                    i > event_id and self.log[i][0] == topic for i in received)):
                continue
            raise AssertionError(f"{event_id} of {topic} never reached a stream on {client.topics} "
                                 f"(after {client.after}, position {client.position}, bound {bound})")

    @invariant()
    def a_closed_stream_is_detached(self) -> None:
        attached = set(self.hub.streams())
        for client in self.clients:
            if client.stream is not None:
                assert (client.stream in attached) == (not client.closed)


TestDelivery = DeliveryMachine.TestCase
TestDelivery.settings = settings.get_profile(PROFILE)
