"""One framing: the hub's frames are ``sse.encode_event``'s, and a browser reads back what was published."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given
from hypothesis import strategies as st

from monkestream import Hub
from monkestream.jsontext import dumps
from monkestream.sse import EventStreamParser, encode_event

names = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), min_size=1, max_size=20)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10)


@given(name=names, data=values)
def test_the_hubs_frames_are_encode_events_and_read_back_as_published(name, data):
    async def main():
        hub = Hub(epoch=9)
        event = hub.publish("t", name, data)
        assert event.frame == encode_event(name, dumps(data), f"9-{event.seq}")
        (read,) = EventStreamParser().feed(event.frame)
        assert (read.type, json.loads(read.data), read.last_event_id) == (name, data, "9-1")
    asyncio.run(main())


@given(text=st.text(st.characters(blacklist_categories=("Cs",))))
def test_a_json_text_with_line_breaks_is_split_into_data_lines_and_joined_back(text):
    async def main():
        hub = Hub(epoch=1)
        event = hub.publish("t", "e", None, json_text=text)
        assert event.frame == encode_event("e", text, "1-1")
        (read,) = EventStreamParser().feed(event.frame)
        assert read.data == text.replace("\r\n", "\n").replace("\r", "\n")
    asyncio.run(main())
