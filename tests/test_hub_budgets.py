"""Hub Rule 7: topics within their kind's budget, forgotten when unused or idle, rings within a byte budget."""

from __future__ import annotations

import asyncio
import sys

import pytest

from monkestream import EventId, Hub
from monkestream.clock import VirtualScheduler
from monkestream.hub import EVENT_OVERHEAD_BYTES, Stream, TopicLimit
from test_hub import FakeSink, run


def test_hub_rule_7_each_kind_has_its_budget_and_a_full_one_takes_no_id():
    async def main():
        hub = Hub(limits={"room": 2})
        hub.publish("room:a", "c", 1)
        hub.publish("room:b", "c", 2)
        with pytest.raises(TopicLimit):
            hub.publish("room:c", "c", 3)
        assert hub.seq == 2                         # no id burned
        hub.publish("ticker:X", "p", 1)             # another kind is not held back
        hub.publish("room:a", "c", 4)               # nor is a topic that exists
        assert hub.topics_by_kind == {"room": 2, "ticker": 1}
    run(main())


def test_hub_rule_7_reserve_is_all_or_none_and_holds_topics_until_released():
    async def main():
        hub = Hub(limits={"room": 3})
        hub.reserve(["room:a", "room:b"])
        with pytest.raises(TopicLimit):
            hub.reserve(["room:c", "room:d"])       # two more would pass 3: neither is made
        assert set(hub.topics) == {"room:a", "room:b"}
        hub.reserve(["room:c"])
        hub.release(["room:a", "room:b", "room:c"])
        assert hub.topics == {} and hub.topics_by_kind == {"room": 0}  # nothing kept: forgotten
    run(main())


def test_hub_rule_7_a_live_only_event_reaches_streams_but_no_ring_and_leaves_no_topic():
    async def main():
        hub = Hub()
        sink = FakeSink()
        stream = Stream(["room:r"], sink, send_framed=sink.sent.append)
        hub.open_stream(stream)
        event = hub.publish("room:r", "user_joined", {"user": "u"}, keep=False)
        await asyncio.sleep(0)
        assert sink.sent[-1] == event.frame and not hub.topics["room:r"].ring
        hub.close_stream(stream)
        hub.publish("room:r", "user_left", {"user": "u"}, keep=False)   # to nobody
        assert "room:r" not in hub.topics and hub.ring_bytes == 0
    run(main())


def test_hub_rule_7_idle_topics_expire_and_a_resume_from_before_them_is_not_claimed():
    async def main():
        clock = VirtualScheduler()
        hub = Hub(epoch=1, scheduler=clock)
        sub = hub.subscribe("ticker:*")              # a wildcard subscriber does not keep a topic alive
        old = hub.publish("room:r", "c", 1)
        hub.publish("ticker:X", "p", 1)
        await clock.advance(6)
        hub.publish("ticker:Y", "p", 2)
        assert hub.expire(5) == 2 and set(hub.topics) == {"ticker:Y"}
        assert hub.replay("room:r", EventId(1, 0)) is None        # what it held is gone: a reset
        assert hub.replay("room:r", old.id) is None                # a forgotten ring may have held more
        assert hub.replay("room:r", hub.last_id()) == []           # after everything: nothing missed
        direct = hub.subscribe("ticker:Y")
        await clock.advance(10)
        assert hub.expire(5) == 0                                  # a direct subscriber keeps it
        direct.close()
        sub.close()
    run(main())


def test_hub_rule_7_all_rings_share_a_byte_budget_oldest_first():
    async def main():
        budget = 4000
        hub = Hub(epoch=1, ring_bytes_max=budget)
        events = [hub.publish(f"t{i % 3}", "e", "x" * 50) for i in range(30)]
        cost = [len(e.frame) + EVENT_OVERHEAD_BYTES for e in events]
        kept = sorted(e.seq for t in hub.topics.values() for e in t.ring)
        n = len(kept)
        assert kept == [e.seq for e in events[-n:]]                # the newest, whatever their topic
        assert hub.ring_bytes == sum(cost[-n:]) <= budget < sum(cost[-n - 1:])
        oldest = events[-n]
        assert hub.replay(oldest.topic, EventId(1, oldest.seq - 1)) is not None
        assert hub.replay("t0", events[0].id) is None              # trimmed: not claimed
    run(main())


def test_hub_rule_7_what_a_ring_lets_go_no_longer_counts_nor_stays_in_memory():
    async def main():
        hub = Hub(epoch=1, replay_events=4)
        events = [hub.publish("t", "e", i) for i in range(1000)]
        assert hub.ring_bytes == sum(len(e.frame) + EVENT_OVERHEAD_BYTES for e in events[-4:])
        first = events[0]
        del events
        assert sys.getrefcount(first) == 2  # this name and the call's argument: the hub holds none
        hub.publish("u", "e", 0)
        assert hub.expire(-1) == 2 and hub.ring_bytes == 0
    run(main())
