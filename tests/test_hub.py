"""The hub on its own: publish never awaits, subscriptions, policies, push streams, replay."""

from __future__ import annotations

import asyncio

import pytest

from monkestream import CloseReason, EventId, Hub, Policy
from monkestream.clock import VirtualScheduler
from monkestream.hub import EVENT_OVERHEAD_BYTES, EVERY_TOPIC, Backlog, Stream
from monkestream.sse import EventStreamParser


def run(coro):
    return asyncio.run(coro)


class FakeSink:
    """A push stream's far end: records what the hub writes, with a settable backlog."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.framed: list[bytes] = []
        self.backlog = 0
        self.closed_with: CloseReason | None = None

    def send(self, frames: bytes) -> None:
        self.sent.append(frames)

    def buffered(self) -> int:
        return self.backlog

    def hub_closed(self, reason: CloseReason) -> None:
        self.closed_with = reason


def test_publish_serializes_once_and_numbers_events():
    async def main():
        hub = Hub(epoch=7)
        a = hub.subscribe("t")
        b = hub.subscribe("t")
        event = hub.publish("t", "price_update", {"p": 1})
        assert event.id == EventId(7, 1)
        assert event.frame == b'id: 7-1\nevent: price_update\ndata: {"p":1}\n\n'
        got_a, got_b = await a.get(), await b.get()
        assert got_a is got_b is event  # the same object, the same bytes, for everyone
        assert hub.publish("u", "x", [1]).id == EventId(7, 2)
        a.close()
        b.close()
        assert hub.is_idle()
    run(main())


def test_publish_never_awaits_and_never_blocks_on_a_full_subscriber():
    async def main():
        hub = Hub()
        sub = hub.subscribe("t", maxsize=3)
        for i in range(1000):
            hub.publish("t", "e", i)  # a plain call: no await, no exception
        assert sub.qsize() == 3 and sub.dropped == 997
        assert [e.data for e in sub.drain()] == [997, 998, 999]
        sub.close()
    run(main())


def test_conflating_subscription_keeps_the_latest_per_topic():
    async def main():
        hub = Hub()
        sub = hub.subscribe("ticker:A", "ticker:B", policy=Policy.CONFLATE)
        for i in range(5):
            hub.publish("ticker:A", "p", i)
            hub.publish("ticker:B", "p", 10 + i)
        assert [(e.topic, e.data) for e in sub.drain()] == [("ticker:A", 4), ("ticker:B", 14)]
        sub.close()
    run(main())


def test_close_policy_ends_the_subscription_with_overflow():
    async def main():
        hub = Hub()
        sub = hub.subscribe("t", maxsize=2, policy="close")
        for i in range(3):
            hub.publish("t", "e", i)
        assert [(await sub.get()).data for _ in range(2)] == [0, 1]
        with pytest.raises(OverflowError):
            await sub.get()
        assert hub.is_idle()
    run(main())


def test_closing_wakes_a_waiting_consumer_and_leaves_nothing_behind():
    async def main():
        hub = Hub()
        sub = hub.subscribe("t")
        got = []

        async def consume():
            async for event in sub:
                got.append(event.data)
        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        hub.publish("t", "e", 1)
        await asyncio.sleep(0)
        sub.close()
        await asyncio.wait_for(task, 1)
        assert got == [1]
        assert hub.is_idle()
        assert hub.topic("t").subs == set()
    run(main())


def test_wildcard_subscriptions_cover_present_and_future_topics():
    async def main():
        hub = Hub()
        hub.publish("ticker:OLD", "p", 0)
        sub = hub.subscribe("ticker:*")
        hub.publish("ticker:OLD", "p", 1)
        hub.publish("ticker:NEW", "p", 2)
        hub.publish("room:x", "c", 3)
        assert [e.data for e in sub.drain()] == [1, 2]
        sub.close()
        assert hub.is_idle()
    run(main())


def test_batches_take_everything_queued():
    async def main():
        hub = Hub()
        sub = hub.subscribe("t")
        for i in range(5):
            hub.publish("t", "e", i)
        batches = sub.batches()
        assert [e.data for e in await anext(batches)] == [0, 1, 2, 3, 4]
        sub.close()
        with pytest.raises(StopAsyncIteration):
            await anext(batches)
    run(main())


def test_hub_rule_4_push_streams_get_one_write_per_flush_with_shared_bytes():
    async def main():
        hub = Hub(wire_framing=lambda b: b"<" + b + b">")
        sinks = [FakeSink() for _ in range(3)]
        streams = [Stream(["t"], s, send_framed=s.framed.append) for s in sinks]
        for stream in streams:
            hub.open_stream(stream)
        e1 = hub.publish("t", "e", 1)
        e2 = hub.publish("t", "e", 2)
        assert all(not s.framed for s in sinks)  # nothing is written inside publish
        await asyncio.sleep(0)
        for sink in sinks:
            assert sink.framed == [b"<" + e1.frame + e2.frame + b">"]
        assert sinks[0].framed[0] is sinks[1].framed[0]
        assert hub.delivered == 6
        for stream in streams:
            hub.close_stream(stream)
        assert hub.is_idle()
    run(main())


def test_multi_topic_streams_on_one_topic_set_share_one_write_in_id_order():
    async def main():
        hub = Hub()
        sinks = [FakeSink() for _ in range(2)]
        for sink, topics in zip(sinks, (["a", "b"], ["b", "a"])):
            hub.open_stream(Stream(topics, sink, send_framed=sink.framed.append))
        events = [hub.publish(t, "e", i) for i, t in enumerate("abab")]
        await asyncio.sleep(0)
        assert sinks[0].framed == [b"".join(e.frame for e in events)]  # publish order is id order
        assert sinks[0].framed[0] is sinks[1].framed[0]  # the same set in any order: one buffer
    run(main())


def test_a_paused_stream_on_a_conflating_topic_gets_only_the_latest_on_resume():
    async def main():
        hub = Hub(conflate=lambda t: t.startswith("ticker:"))
        sink = FakeSink()
        stream = Stream(["ticker:X"], sink, send_framed=sink.framed.append)
        hub.open_stream(stream)
        assert sink.sent == [b"id: %s\n\n" % str(hub.last_id()).encode()]  # its position
        sink.sent.clear()
        hub.pause(stream)
        for i in range(10):
            last = hub.publish("ticker:X", "p", i)
        await asyncio.sleep(0)
        assert sink.sent == [] and sink.framed == []
        hub.resume(stream)
        assert sink.sent == [last.frame]
        assert hub.conflated == 9
        hub.publish("ticker:X", "p", 99)
        await asyncio.sleep(0)
        assert len(sink.framed) == 1  # back on the fast path
    run(main())


def test_hub_rule_5_a_paused_lossless_stream_is_closed_past_its_cap():
    async def main():
        hub = Hub()
        sink = FakeSink()
        stream = Stream(["room:r"], sink, send_framed=sink.framed.append, cap_bytes=100)
        hub.open_stream(stream)
        assert sink.sent == [b"id: %s\n\n" % str(hub.last_id()).encode()]  # its position
        sink.sent.clear()
        hub.pause(stream)
        hub.publish("room:r", "c", "x")
        await asyncio.sleep(0)
        assert len(sink.sent) == 1 and sink.closed_with is None  # still within the cap
        sink.backlog = 101
        hub.publish("room:r", "c", "y")
        await asyncio.sleep(0)
        assert sink.closed_with is CloseReason.SLOW
        assert hub.closed_by_reason[CloseReason.SLOW] == 1
        assert hub.is_idle()
    run(main())


def test_a_big_batch_skips_streams_that_are_behind():
    async def main():
        hub = Hub(conflate=lambda t: True)
        ok, behind = FakeSink(), FakeSink()
        behind.backlog = 10
        for sink in (ok, behind):
            hub.open_stream(Stream(["t"], sink, send_framed=sink.framed.append, cap_bytes=1000))
        events = [hub.publish("t", "p", "x" * 100) for _ in range(300)]
        await asyncio.sleep(0)
        assert ok.framed == [b"".join(e.frame for e in events)]
        assert behind.framed == [events[-1].frame]
        assert hub.conflated == 299
    run(main())


def test_replay_from_the_ring_and_its_limits():
    async def main():
        hub = Hub(epoch=5, replay_events=3)
        events = [hub.publish("t", "e", i) for i in range(5)]
        hub.publish("other", "e", 0)
        assert [e.data for e in hub.replay("t", events[1].id)] == [2, 3, 4]
        assert hub.replay("t", events[4].id) == []
        assert hub.replay("t", events[0].id) is None          # fell out of the ring
        assert hub.replay("t", EventId(4, 1)) is None         # another run
        assert hub.replay("t", EventId(5, 999)) is None       # from the future
        assert hub.replay("never", EventId(5, 1)) == []
    run(main())


# -- the delivery rule (hub Rules 2 and 3), one risk at a time ----------------------------

class PausingSink(FakeSink):
    """Pauses its stream from inside the next write, as a transport past its high-water mark does."""

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub
        self.stream: Stream | None = None
        self.pause_next = False

    def send(self, frames: bytes) -> None:
        super().send(frames)
        if self.pause_next:
            self.pause_next = False
            self.hub.pause(self.stream)


def test_hub_rule_1_an_event_that_cannot_be_encoded_takes_no_id():
    async def main():
        hub = Hub(epoch=3)
        hub.publish("t", "e", 1)
        with pytest.raises(ValueError):
            hub.publish("t", "e", float("nan"))  # JSON has no NaN
        with pytest.raises(ValueError):
            hub.publish("t", "bad\nname", 1)
        assert hub.publish("t", "e", 2).id == EventId(3, 2)
    run(main())


def test_hub_rule_2_resume_sends_conflated_and_lossless_events_in_id_order():
    async def main():
        hub = Hub(conflate=lambda t: t.startswith("ticker:"))
        sink = FakeSink()
        stream = Stream(["ticker:X", "room:r"], sink)
        hub.open_stream(stream)
        sink.sent.clear()
        hub.pause(stream)
        chat = hub.publish("room:r", "c", 1)
        tick = hub.publish("ticker:X", "p", 2)
        hub.resume(stream)  # before the flush: the chat event is still pending, the price held
        await asyncio.sleep(0)
        assert b"".join(sink.sent) == chat.frame + tick.frame
    run(main())


def test_hub_rule_3_a_pause_keeps_what_was_pending_for_the_stream():
    async def main():
        hub = Hub()
        sink = FakeSink()
        stream = Stream(["room:r"], sink, send_framed=sink.framed.append)
        hub.open_stream(stream)
        event = hub.publish("room:r", "c", 1)
        hub.pause(stream)  # the event is pending on the shared buffer
        await asyncio.sleep(0)
        assert b"".join(sink.framed + sink.sent[1:]) == event.frame
    run(main())


def test_hub_rule_3_a_pause_from_inside_the_resume_write_leaves_the_stream_paused():
    async def main():
        hub = Hub(conflate=lambda t: True)
        sink = PausingSink(hub)
        stream = sink.stream = Stream(["ticker:X"], sink, send_framed=sink.framed.append)
        hub.open_stream(stream)
        hub.pause(stream)
        hub.publish("ticker:X", "p", 1)
        sink.pause_next = True  # the resume's write fills the transport again
        hub.resume(stream)
        assert stream.paused and stream.fanout is None  # off the shared buffer: the stall timer sees it
        later = hub.publish("ticker:X", "p", 2)
        await asyncio.sleep(0)
        assert sink.framed == []  # held, not written behind a paused transport
        sink.pause_next = False
        hub.resume(stream)
        assert sink.sent[-1] == later.frame
    run(main())


def test_hub_rule_3_a_stream_opened_beside_a_live_one_gets_a_pending_event_once():
    async def main():
        hub = Hub()
        old, new = FakeSink(), FakeSink()
        hub.open_stream(Stream(["t"], old, send_framed=old.framed.append))
        position = hub.last_id()
        event = hub.publish("t", "e", 1)  # pending on the topic's shared buffer
        hub.open_stream(Stream(["t"], new, send_framed=new.framed.append),
                        lambda: Backlog([e.frame for e in hub.replay("t", position)]))
        await asyncio.sleep(0)
        assert b"".join(new.sent + new.framed).count(event.frame) == 1
        assert old.framed == [event.frame]
    run(main())


def test_hub_rule_3_a_backlog_built_by_start_may_publish_and_is_attached_in_the_same_step():
    async def main():
        hub = Hub(epoch=1)
        sink = FakeSink()

        def start() -> Backlog:
            joined = hub.publish("room:r", "user_joined", {"user": "u"})
            return Backlog([joined.frame])
        hub.open_stream(Stream(["room:r"], sink, send_framed=sink.framed.append), start)
        await asyncio.sleep(0)
        assert sink.sent == [b'id: 1-1\nevent: user_joined\ndata: {"user":"u"}\n\nid: 1-1\n\n']
        assert sink.framed == []  # not again from the flush
    run(main())


def test_hub_rule_6_ids_assigned_elsewhere_are_carried_and_must_grow():
    async def main():
        hub = Hub(epoch=1)
        sub = hub.subscribe("t")
        event = hub.publish("t", "e", 1, event_id=EventId(1700000000000, 4))
        assert event.id == EventId(1700000000000, 4) and event.frame.startswith(b"id: 1700000000000-4\n")
        assert hub.last_id() == EventId(1700000000000, 4)
        assert hub.publish("t", "e", 2).id == EventId(1700000000000, 5)
        with pytest.raises(ValueError):
            hub.publish("t", "e", 3, event_id=EventId(1700000000000, 5))
        assert [e.data for e in sub.drain()] == [1, 2]
    run(main())


def test_hub_rule_8_the_hub_owns_no_task_and_its_times_come_from_its_scheduler():
    made_before_any_loop = Hub()

    async def main():
        only_me = asyncio.all_tasks()
        scheduler = VirtualScheduler(start=100.0)
        for hub in (Hub(scheduler=scheduler, conflate=lambda t: True), made_before_any_loop):
            sub = hub.subscribe("t")
            sink = FakeSink()
            stream = Stream(["t"], sink, send_framed=sink.framed.append)
            hub.open_stream(stream)
            first = hub.publish("t", "e", 1)
            hub.pause(stream)  # writes what is pending first (Rule 3)
            second = hub.publish("t", "e", 2)
            await asyncio.sleep(0)  # the flush: a call_soon callback, not a task
            assert asyncio.all_tasks() == only_me and scheduler.pending == 0
            hub.resume(stream)
            written = b"".join(sink.framed + sink.sent)
            assert written.count(first.frame) == written.count(second.frame) == 1
            assert [e.data for e in sub.drain()] == [1, 2]
            sub.close()
            hub.close_stream(stream)
            assert hub.is_idle() and asyncio.all_tasks() == only_me
        await scheduler.advance(5.0)
        hub = Hub(scheduler=scheduler)
        stream = Stream(["u"], FakeSink())
        hub.open_stream(stream)
        hub.publish("u", "e", 1)
        hub.pause(stream)
        assert hub.topic("u").last_publish == stream.paused_at == 105.0  # virtual time, not the loop's
    run(main())


# -- the all-topics stream (hub Rule 9) ----------------------------------------------------

def labelled(event, keep=True):
    """What an all-topics stream is sent for ``event``: its frame after its topic (and ``keep: 0``)."""
    return f"topic: {event.topic}\n".encode() + (b"" if keep else b"keep: 0\n") + event.frame


def every_stream(sink: FakeSink, cap_bytes: int = 1 << 20) -> Stream:
    # given a framed writer, as the server gives every chunked stream: it must still never share a Fanout
    return Stream((EVERY_TOPIC,), sink, send_framed=sink.framed.append, cap_bytes=cap_bytes)


def test_hub_rule_9_the_all_topics_stream_gets_every_event_of_every_topic_labelled():
    async def main():
        hub = Hub(epoch=1)
        before = hub.publish("ticker:OLD", "price_update", 0)  # before its position: not its
        sink, other = FakeSink(), FakeSink()
        stream = every_stream(sink)
        assert hub.open_stream(stream)
        hub.open_stream(Stream(["ticker:OLD"], other, send_framed=other.framed.append))
        assert sink.sent == [b"id: 1-1\n\n"]
        sink.sent.clear()
        old = hub.publish("ticker:OLD", "price_update", 1)
        new = hub.publish("room:new", "comment_posted", {"text": "hi"})   # a topic made after it attached
        live = hub.publish("room:new", "user_joined", {"user": "ann"}, keep=False)
        gone = hub.publish("room:nobody", "user_left", {"user": "bo"}, keep=False)  # a topic kept nowhere
        assert sink.sent == []  # nothing is written inside publish
        await asyncio.sleep(0)
        assert sink.framed == []  # never on a topic's shared buffer...
        assert other.framed == [old.frame]  # ...while a normal stream beside it is
        assert sink.sent == [labelled(old) + labelled(new) + labelled(live, keep=False) + labelled(gone, keep=False)]
        assert before.frame not in sink.sent[0]
        # a browser reading it ignores the labels: the events and ids are the ones published
        events = EventStreamParser().feed(sink.sent[0])
        assert [(e.type, e.last_event_id) for e in events] == [
            (e.name, str(e.id)) for e in (old, new, live, gone)]
        assert hub.replay("room:new", before.id) == [new]  # the live-only event is delivered, not kept
        assert "room:nobody" not in hub.topics
        assert stream in hub.streams() and hub.stream_count == 2
        hub.close_stream(stream)
        assert not hub.is_idle()  # the ticker stream is still there
        hub.close_all_streams()
        assert hub.is_idle()
    run(main())


def test_hub_rule_9_a_paused_all_topics_stream_is_never_conflated():
    async def main():
        hub = Hub(conflate=lambda t: t.startswith("ticker:"))
        every_sink, normal_sink = FakeSink(), FakeSink()
        every = every_stream(every_sink)
        normal = Stream(["ticker:X"], normal_sink, send_framed=normal_sink.framed.append)
        for stream in (every, normal):
            hub.open_stream(stream)
            hub.pause(stream)
        every_sink.sent.clear()
        normal_sink.sent.clear()
        events = []
        for i in range(10):
            events.append(hub.publish("ticker:X", "p", i))
            await asyncio.sleep(0)  # a flush after each
        assert b"".join(every_sink.sent) == b"".join(labelled(e) for e in events)  # each one, while paused
        assert normal_sink.sent == [] and normal_sink.framed == []  # held: the latest only
        hub.resume(normal)
        assert normal_sink.sent == [events[-1].frame]
        assert hub.conflated == 9  # the normal stream's nine, none of the all-topics stream's
        written = len(every_sink.sent)
        hub.resume(every)
        assert len(every_sink.sent) == written  # it held nothing back
        assert every_sink.framed == [] and every_sink.closed_with is None
    run(main())


def test_hub_rule_9_an_all_topics_stream_past_its_cap_while_paused_is_closed_slow():
    async def main():
        hub = Hub(conflate=lambda t: True)  # conflating topics: a normal stream would only be conflated
        sink = FakeSink()
        stream = every_stream(sink, cap_bytes=1000)
        hub.open_stream(stream)
        hub.pause(stream)
        sink.backlog = 1000
        hub.publish("ticker:X", "p", 1)
        await asyncio.sleep(0)
        assert sink.closed_with is None  # at its cap, not past it
        sink.backlog = 1001
        hub.publish("ticker:X", "p", 2)
        await asyncio.sleep(0)
        assert sink.closed_with is CloseReason.SLOW
        assert hub.closed_by_reason[CloseReason.SLOW] == 1
        assert hub.streams() == [] and hub.is_idle()
        written = len(sink.sent)
        hub.publish("room:r", "c", 3)
        await asyncio.sleep(0)
        assert len(sink.sent) == written  # closed: nothing more
    run(main())


def test_hub_rule_9_replay_all_gives_every_kept_event_in_id_order_and_the_topics_it_cannot_tell():
    async def main():
        hub = Hub(epoch=5, replay_events=3)
        a1 = hub.publish("room:a", "e", 1)                               # 5-1
        b1 = hub.publish("room:b", "e", 1)                               # 5-2
        t0 = hub.publish("ticker:T", "p", 0)                             # 5-3
        a2 = hub.publish("room:a", "e", 2)                               # 5-4
        ticks = [hub.publish("ticker:T", "p", i) for i in range(1, 5)]   # 5-5 .. 5-8: the ring keeps 5-6 on
        b2 = hub.publish("room:b", "e", 2)                               # 5-9
        hub.publish("room:a", "presence", 3, keep=False)                 # 5-10: never kept
        assert hub.replay_all(EventId(5, 0)) == ([a1, b1, a2, b2], ["ticker:T"])
        assert hub.replay_all(t0.id) == ([a2, b2], ["ticker:T"])
        assert hub.replay_all(ticks[0].id) == ([*ticks[1:], b2], [])   # the ring reaches back to it
        assert hub.replay_all(b2.id) == ([], [])
        assert hub.replay_all(hub.last_id()) == ([], [])
        assert hub.replay_all(EventId(5, 11)) is None      # from the future
        assert hub.replay_all(EventId(4, 99)) is None      # from before the hub's origin (another run)
    run(main())


def test_hub_rule_9_replay_all_cannot_tell_from_before_a_forgotten_rings_newest_event():
    async def main():
        scheduler = VirtualScheduler(start=10.0)
        hub = Hub(epoch=2, scheduler=scheduler)
        first = hub.publish("room:gone", "e", 1)
        newest = hub.publish("room:gone", "e", 2)
        await scheduler.advance(60)
        kept = hub.publish("room:kept", "e", 3)
        assert hub.expire(30) == 1 and "room:gone" not in hub.topics
        assert hub.replay_all(first.id) is None       # room:gone's 2-2 is gone: who else had events?
        assert hub.replay_all(EventId(2, 0)) is None
        assert hub.replay_all(newest.id) == ([kept], [])
    run(main())


def test_hub_rule_9_cut_empties_the_named_rings_and_closes_their_streams_and_every_all_topics_stream():
    async def main():
        hub = Hub(epoch=1)
        watcher = hub.subscribe("room:*")   # a pull subscriber (a chart, say): cut topics are not forgotten
        sinks = {name: FakeSink() for name in ("every", "a", "ab", "b")}
        streams = {
            "every": every_stream(sinks["every"]),
            "a": Stream(["room:a"], sinks["a"], send_framed=sinks["a"].framed.append),
            "ab": Stream(["room:b", "room:a"], sinks["ab"]),
            "b": Stream(["room:b"], sinks["b"], send_framed=sinks["b"].framed.append),
        }
        for stream in streams.values():
            hub.open_stream(stream)
        hub.publish("room:a", "e", 1)
        b1 = hub.publish("room:b", "e", 2)
        await asyncio.sleep(0)
        for sink in sinks.values():
            sink.framed.clear()
        before = hub.last_id()
        hub.cut(["room:a"])
        assert [n for n, s in sinks.items() if s.closed_with is CloseReason.CATCH_UP] == ["every", "a", "ab"]
        assert sinks["b"].closed_with is None and hub.streams() == [streams["b"]]
        assert hub.closed_by_reason[CloseReason.CATCH_UP] == 3
        assert "room:a" in hub.topics and not hub.topics["room:a"].ring
        assert hub.ring_bytes == len(b1.frame) + EVENT_OVERHEAD_BYTES   # room:b's event alone
        # a resume from before the cut is not covered; room:b's ring still is
        for after in (EventId(1, 0), before):
            assert hub.replay("room:a", after) is None
        assert hub.replay("room:b", EventId(1, 0)) == [b1]
        assert hub.replay_all(before) is None
        # a resume from after the cut is
        a2 = hub.publish("room:a", "e", 3)
        a3 = hub.publish("room:a", "e", 4)
        assert hub.replay("room:a", a2.id) == [a3]
        assert hub.replay("room:a", before) is None
        assert hub.replay_all(a2.id) == ([a3], [])
        b2 = hub.publish("room:b", "e", 5)
        await asyncio.sleep(0)
        assert sinks["b"].framed == [b2.frame]  # the stream left open goes on
        assert sinks["a"].framed == []
        assert [e.data for e in watcher.drain()] == [1, 2, 3, 4, 5]   # a cut ends no pull subscription
        watcher.close()
    run(main())


def test_hub_rule_9_cut_of_every_topic_closes_every_stream_and_moves_the_origin():
    async def main():
        hub = Hub(epoch=3)
        hub.publish("room:a", "e", 1)
        hub.publish("ticker:T", "p", 2)
        sinks = [FakeSink() for _ in range(3)]
        hub.open_stream(every_stream(sinks[0]))
        hub.open_stream(Stream(["room:a"], sinks[1], send_framed=sinks[1].framed.append))
        hub.open_stream(Stream(["ticker:T"], sinks[2]))
        before = hub.last_id()
        hub.cut(None)
        assert [s.closed_with for s in sinks] == [CloseReason.CATCH_UP] * 3
        assert hub.streams() == [] and hub.is_idle()
        assert hub.origin == EventId(3, before.seq + 1)
        assert hub.ring_bytes == 0 and all(not t.ring for t in hub.topics.values())
        for topic in ("room:a", "ticker:T", "room:never"):
            assert hub.replay(topic, before) is None
            assert hub.replay(topic, EventId(3, 0)) is None
        assert hub.replay_all(before) is None
        next_one = hub.publish("ticker:T", "p", 3)
        assert next_one.id == hub.origin
        later = hub.publish("room:a", "e", 4)
        assert hub.replay_all(next_one.id) == ([later], [])
        assert hub.replay("room:never", next_one.id) == []
    run(main())


def test_hub_rule_6_a_hub_that_follows_another_numbers_no_event_itself():
    async def main() -> None:
        hub = Hub(epoch=5)
        hub.follows = True
        with pytest.raises(RuntimeError):
            hub.publish("room:a", "e", 1)
        assert hub.last_id() == EventId(5, 0) and "room:a" not in hub.topics  # nothing taken
        event = hub.publish("room:a", "e", 1, event_id=EventId(9, 4))
        assert event.id == hub.last_id() == EventId(9, 4)
        with pytest.raises(ValueError):
            hub.publish("room:a", "e", 2, event_id=EventId(9, 4))  # ids only grow

    asyncio.run(main())
