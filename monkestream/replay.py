"""Replay: what a resuming stream is owed, from the hub's rings and SQLite, built as one backlog.

Theory of operation
-------------------
Rule 1: a stream resuming after id A is owed, for each of its topics, every
        event after A: from the topic's replay ring when the ring reaches back
        to A; for a ticker topic, else from SQLite and then the ring; else a
        ``reset`` event naming the topic, so the client knows to refetch.
Rule 2: every SQLite read happens first (``prepare``: one call on the reader
        thread for all the stream's tickers). The backlog is then built in one
        synchronous step from the rings as they stand, and the hub attaches
        the stream in that same step (hub Rule 3), so nothing published
        meanwhile is lost or sent twice.
Rule 3: the id that ended the previous run (it ended cleanly) stands for
        the start of this run, so the reconnect storm after a restart, where
        every live client holds that id, costs no SQLite read.
Rule 4: a backlog has a budget in bytes. Events go in id order while they
        fit; past it the backlog is partial: the stream gets what fits and is
        closed, and its client resumes from the last id it got. So a stream's
        memory never passes its budget, and every event still arrives once,
        in order. SQLite reads are bounded to match: at most
        ``budget // MIN_FRAME_BYTES`` rows in all (``MIN_ROWS_PER_SYMBOL``
        each at least), shared by the stream's symbols.
Rule 5: the all-topics stream (hub Rule 9) resumes the same way over every
        topic the hub holds, its frames labelled with their topics. When the
        hub cannot tell which topics had events after the id, its backlog is
        one ``reset`` naming ``*``: every topic.
"""

from __future__ import annotations

from typing import Callable

from .hub import EVERY_TOPIC, Backlog, Hub
from .jsontext import dumps
from .sse import EventId, encode_event, label_frame
from .store import Store

MIN_FRAME_BYTES = 64          # no ticker frame is shorter: bounds the rows a budget can use
MIN_ROWS_PER_SYMBOL = 16      # rows read per symbol at least, however many share a budget
PREPARE_ATTEMPTS = 3          # SQLite reads for one resume while rings keep moving past it

Replayed = list[tuple[EventId, bytes]]


class Stored:
    """One topic's events read from SQLite: ``rows`` in id order, and whether they reach the ring."""

    __slots__ = ("rows", "complete")

    def __init__(self, rows: Replayed, complete: bool) -> None:
        self.rows = rows
        self.complete = complete   # False: cut at the row limit, the rest is owed after a reconnect


class Replayer:
    """Builds backlogs from the hub's rings and the store, within a byte budget."""

    def __init__(self, hub: Hub, store: Store, *, stored_symbol: Callable[[str], str | None],
                 budget_bytes: int) -> None:
        self.hub = hub
        self.store = store
        self._stored_symbol = stored_symbol   # the SQLite symbol behind a topic, None if SQLite keeps none
        self.budget_bytes = budget_bytes
        self.partial = 0                      # backlogs cut at the budget (metrics)
        self.sqlite_reads = 0

    async def prepare(self, topics: list[str], last_id: str, client: str = "") -> Callable[[], Backlog]:
        """Read from SQLite what the rings cannot give; return the step that builds the backlog.

        Call the result in the step that attaches the stream (``Hub.open_stream``).
        ``client`` is whom the stream is for (a relay's replayer names it upstream).
        """
        after = EventId.parse(last_id)
        if after is None:
            return lambda: self._build(topics, last_id, None, {})
        if self.store.ends_previous_run(after):  # a restart seen to its end: no SQLite read is needed
            after = EventId(self.hub.epoch, 0)
        stored: dict[str, Stored | None] = {}   # None: too far behind for SQLite to replay
        candidates = topics
        if topics == [EVERY_TOPIC]:  # Rule 5: the topics whose rings cannot tell
            got = self.hub.replay_all(after)
            candidates = got[1] if got is not None else []
        for _attempt in range(PREPARE_ATTEMPTS):
            needed = [t for t in candidates if self._needs_read(t, after, stored)]
            if not needed:
                break
            stored.update(await self._read(needed, after))
        return lambda: self._build(topics, last_id, after, stored)

    def _needs_read(self, topic: str, after: EventId, stored: dict[str, Stored | None]) -> bool:
        """Whether SQLite can give what the ring (with what was read so far) cannot."""
        if topic in stored and stored[topic] is None:
            return False
        hub = self.hub
        return (self._stored_symbol(topic) is not None and after <= hub.last_id()
                and self.store.covers(after) and self._topic(topic, after, stored.get(topic)) is None)

    async def _read(self, topics: list[str], after: EventId) -> dict[str, Stored | None]:
        # what one budget can carry, shared by the symbols: each part still moves every one of them on
        limit = max(MIN_ROWS_PER_SYMBOL, self.budget_bytes // MIN_FRAME_BYTES // len(topics)) + 1
        symbols = {t: self._stored_symbol(t) or "" for t in topics}
        self.sqlite_reads += 1
        rows = await self.store.replay_many(list(symbols.values()), after, limit)
        out: dict[str, Stored | None] = {}
        for topic, symbol in symbols.items():
            got = rows.get(symbol)
            if got is None:
                out[topic] = None
                continue
            out[topic] = Stored([(s.id, encode_event("price_update", s.ticker.to_json(), str(s.id)))
                                 for s in got], len(got) < limit)
        return out

    def _build(self, topics: list[str], last_id: str, after: EventId | None,
               stored: dict[str, Stored | None]) -> Backlog:
        replayed: Replayed = []
        reset: list[str] = []
        cut: EventId | None = None   # past this id, some topic's stored rows were cut at the limit
        every = topics == [EVERY_TOPIC]
        if every:  # Rule 5
            ring = self.hub.replay_all(after) if after is not None else None
            if ring is None:
                return Backlog([reset_event([EVERY_TOPIC], last_id)])
            events, topics = ring
            replayed = [(e.id, label_frame(e.topic, True, e.frame)) for e in events]
        for topic in topics:
            got = self._topic(topic, after, stored.get(topic)) if after is not None else None
            if got is None:
                reset.append(topic)
                continue
            replayed.extend([(i, label_frame(topic, True, f)) for i, f in got] if every else got)
            part = stored.get(topic)
            if part is not None and not part.complete and part.rows:
                cut = min(cut, part.rows[-1][0]) if cut is not None else part.rows[-1][0]
        frames = [reset_event(reset, last_id)] if reset else []
        replayed.sort(key=lambda pair: pair[0])
        complete = cut is None
        size = sum(len(frame) for frame in frames)
        for event_id, frame in replayed:
            if cut is not None and event_id > cut or size + len(frame) > self.budget_bytes and frames:
                complete = False
                break
            frames.append(frame)
            size += len(frame)
        if not complete:
            self.partial += 1
        return Backlog(frames, complete)

    def _topic(self, topic: str, after: EventId, stored: Stored | None) -> Replayed | None:
        """Rule 1 for one topic; None: a reset."""
        hub = self.hub
        events = hub.replay(topic, after)
        if events is not None:
            return [(e.id, e.frame) for e in events]
        if stored is None:
            return None
        if not stored.complete:
            return stored.rows  # the rest comes after a reconnect
        # the ring must hold everything of this run after what SQLite gave
        mark = max((i for i, _f in stored.rows if i.epoch == hub.epoch), default=EventId(hub.epoch, 0))
        tail = hub.replay(topic, max(mark, after) if after.epoch == hub.epoch else mark)
        if tail is None:
            return None
        return stored.rows + [(e.id, e.frame) for e in tail]


def reset_event(topics: list[str], last_id: str) -> bytes:
    """The ``reset`` event: these topics' events after ``last_id`` are gone; refetch their state."""
    return encode_event("reset", dumps({"topics": topics, "lastEventId": last_id,
                                        "reason": "the events after this id are no longer held; refetch state"}))
