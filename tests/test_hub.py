"""The hub on its own: publish never awaits, subscriptions, policies, push streams, replay."""

from __future__ import annotations

import asyncio

import pytest

from monkestream import CloseReason, EventId, Hub, Policy
from monkestream.hub import Stream


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


def test_push_streams_get_one_write_per_flush_with_shared_bytes():
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


def test_a_paused_lossless_stream_is_closed_past_its_cap():
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
