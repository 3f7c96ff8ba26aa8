"""The hub on its own: publish never awaits, subscriptions, policies, push streams, replay."""

from __future__ import annotations

import asyncio

import pytest

from monkestream import CloseReason, EventId, Hub, Policy
from monkestream.clock import VirtualScheduler
from monkestream.hub import Backlog, Stream


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
