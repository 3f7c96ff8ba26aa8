"""The relay's resume, checked against the upstream's log over random situations (relay Rule 4).

A resume the relay's rings cannot cover is the upstream's backlog up to the
upstream's position, then the relay's ring from there. Whatever the upstream's
log, how far the relay has followed it, where its ring begins, where the client
stands, and how far the upstream's answer reaches (or whether it was cut in
parts), the client must end up with every event of its topics after its id,
once each, in id order: the backlog and then the live events the relay
publishes after attaching it. A backlog the relay cannot complete must be a
gapless prefix of that, so the client's next resume continues it.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from monkestream.hub import EVERY_TOPIC, Hub
from monkestream.relay import Fetched, RelayReplayer
from monkestream.sse import EventId, EventStreamParser, label_frame

TOPICS = ["room:a", "room:b", "ticker:X"]
EPOCH = 7


def ids_in(frames: list[bytes]) -> list[EventId]:
    parser = EventStreamParser()
    events = parser.feed(b"".join(frames))
    return [EventId.parse(e.last_event_id) for e in events]


@st.composite
def situations(draw: st.DrawFn) -> dict:
    log = draw(st.lists(st.sampled_from(TOPICS), min_size=0, max_size=30))
    n = len(log)
    start = draw(st.integers(0, n))            # the relay's origin: it holds every event after this index
    followed = draw(st.integers(start, n))     # how far the relay has followed
    client = draw(st.integers(0, n))           # the client's position
    answered = draw(st.integers(client, n))    # the upstream's position when it answered
    topics = draw(st.sampled_from([[EVERY_TOPIC], ["room:a"], ["room:a", "ticker:X"], TOPICS]))
    cut = draw(st.one_of(st.none(), st.integers(0, n)))  # the upstream sent its backlog in parts
    return dict(log=log, start=start, followed=followed, client=client, answered=answered, topics=topics, cut=cut)


@settings(max_examples=400, deadline=None)
@given(situations())
def test_relay_rule_4_a_fetched_resume_then_the_live_events_give_the_client_its_topics_once_in_order(s):
    async def main() -> None:
        log, topics = s["log"], s["topics"]
        every = topics == [EVERY_TOPIC]
        wanted = [EventId(EPOCH, k + 1) for k, topic in enumerate(log) if every or topic in topics]

        relay_hub = Hub(epoch=0, replay_events=1000)
        relay_hub.follows = True
        relay_hub.epoch, relay_hub.seq = EPOCH, s["start"]
        relay_hub.origin = EventId(EPOCH, s["start"])
        for k in range(s["start"], s["followed"]):
            relay_hub.publish(log[k], "e", k, event_id=EventId(EPOCH, k + 1))

        after = EventId(EPOCH, s["client"])
        frames: list[tuple[EventId | None, bytes]] = []
        for k in range(s["client"], s["answered"]):
            if every or log[k] in topics:
                frame = f"id: {EPOCH}-{k + 1}\nevent: e\ndata: {k}\n\n".encode()
                frames.append((EventId(EPOCH, k + 1), label_frame(log[k], True, frame) if every else frame))
        position: EventId | None = EventId(EPOCH, s["answered"])
        if s["cut"] is not None and s["cut"] < len(frames):
            frames, position = frames[:s["cut"]], None

        replayer = RelayReplayer(relay_hub, None, None, token="", budget_bytes=1 << 20)  # type: ignore[arg-type]
        backlog = replayer._merge(topics, after, Fetched(frames, position))
        got = ids_in(backlog.frames)
        owed = [i for i in wanted if i > after]
        if backlog.complete:
            here = relay_hub.last_id()
            live = [EventId(EPOCH, k + 1) for k in range(s["followed"], len(log)) if every or log[k] in topics]
            assert all(i <= here for i in got)
            assert got + live == owed
        else:
            assert got == owed[:len(got)]   # a gapless prefix: the next resume continues it
            if after > relay_hub.last_id():
                assert got == []            # a client ahead of the relay is sent nothing it has

    asyncio.run(main())
