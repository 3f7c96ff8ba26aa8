"""The in-process pub/sub hub: topics, ids, replay rings and the fan-out to subscribers.

Theory of operation
-------------------
Rule 1: ``publish()`` never awaits and never raises because of a subscriber.
        It encodes the event once (``Event.frame``, by ``sse.encode_event``)
        before taking its id, so an event that cannot be encoded burns no id;
        then it keeps the event in the topic's replay ring, hands it to pull
        subscribers' queues with ``put_nowait`` and queues it for push streams.
        A flush scheduled with ``scheduler.call_soon`` writes everything
        published in this loop iteration.
Rule 2: the delivery rule. A push stream has a position: the id of the last
        event it was given (at first, the end of its backlog). It receives
        every event of its topics published after its position exactly once,
        in ascending id order. The one exception is conflation: while its
        transport is paused, a conflating topic's events may be replaced by a
        newer one of the same topic, never reordered and never repeated.
Rule 3: the rule is kept in one place. Every change to a stream (open,
        pause, resume) first flushes what is pending (``_settle``), so it
        happens at a moment when every attached stream has been given every
        event published. A change a transport asks for from inside a write
        (``pause_writing``) needs no flush: a stream's pending events are in
        one place (its Fanout or its own list), already taken by that write.
        A stream opens with its backlog built in the same step as it is
        attached (``open_stream(stream, start)`` calls ``start``), so nothing
        can be published between the backlog's end and its position.
Rule 4: a push stream receives one write per flush, not one per event. Streams
        on the same set of topics that are keeping up share a ``Fanout``: its
        frames are joined and framed once and the same bytes go to each of them.
        Paused streams and streams that frame their own bytes get their events
        through their own ``pending`` list.
Rule 5: memory is bounded whatever a subscriber does. A pull subscriber's queue
        has a size and an overflow policy. A paused push stream keeps, for each
        conflating topic, only the latest event it missed; lossless events are
        written at each flush (merged in id order with every conflated event
        it holds) until its buffer passes its cap, and it is then closed with
        ``CloseReason.SLOW`` so that it resumes with its Last-Event-ID.
Rule 6: ids are ``EPOCH-SEQ`` (``sse.EventId``) and only grow. The hub numbers
        events itself (``seq`` counts every event, so ids order events across
        topics) or carries ids assigned elsewhere (``publish(..., event_id=)``),
        which must be greater than the last. A hub that ``follows`` another
        carries only such ids: it refuses to number one itself.
Rule 7: memory is bounded by topic too. Each kind of topic (the part of its
        name before ``:``) may have a budget of topics (``limits``); a topic
        is created only within it, in one step with the check (``topic()``,
        ``reserve()``), so concurrent creators never overshoot, and
        ``TopicLimit`` is raised when it is full. A topic with no stream and
        no direct subscriber is forgotten at once when its ring is empty, or
        by ``expire()`` once idle; an event published with ``keep=False``
        (presence) is delivered live but never kept. All rings together hold
        at most ``ring_bytes_max`` bytes (frames plus ``EVENT_OVERHEAD_BYTES``
        each): past it the oldest kept events are dropped first. A resume
        from before what a forgotten or trimmed ring held gets None.
Rule 8: the hub owns no task. Embedders may use it from any asyncio program;
        only the flush callback and the queues touch the running loop, and the
        time it records comes from its ``Scheduler``.
Rule 9: the all-topics stream (topics ``(EVERY_TOPIC,)``) is a relay's: it
        receives every event of every topic, present or future, kept or live
        only, each frame labelled with its topic (``sse.label_frame``). It is
        lossless: never conflated, never sharing a Fanout; past its cap it is
        closed (``CloseReason.SLOW``) and resumes with its Last-Event-ID.
        ``replay_all`` is its resume: every kept event after an id, with the
        topics whose rings cannot tell, or None when the hub itself cannot.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, NamedTuple, Protocol

from .clock import AsyncioScheduler, Scheduler
from .errors import MonkestreamError
from .jsontext import dumps
from .sse import EventId, encode_event, encode_position, label_frame

REPLAY_EVENTS = 256           # per topic, the events kept for Last-Event-ID resume
SUBSCRIPTION_QUEUE_EVENTS = 1024
STREAM_BUFFER_BYTES = 256 * 1024
BIG_BATCH_BYTES = 16 * 1024     # a flush larger than this checks each stream's buffer first
RING_BYTES = 64 * 1024 * 1024   # all replay rings together (Rule 7)
EVENT_OVERHEAD_BYTES = 300      # an event's objects beside its frame, as counted against RING_BYTES
EVERY_TOPIC = "*"               # the all-topics stream's one topic (Rule 9)


class TopicLimit(MonkestreamError):
    """A new topic would pass its kind's budget (hub Rule 7)."""

    def __init__(self, kind: str, limit: int) -> None:
        super().__init__(f"too many {kind} topics (at most {limit})")
        self.kind = kind
        self.limit = limit


class CloseReason(enum.Enum):
    """Why the server ended a stream; counted in metrics."""

    CLIENT = "client"          # the peer closed the connection
    SLOW = "slow"              # a lossless stream's buffer passed its cap
    PEER_GONE = "peer_gone"    # the write buffer did not drain for too long
    MAX_AGE = "max_age"        # the stream reached its maximum age
    SHUTDOWN = "shutdown"      # the server is stopping
    CATCH_UP = "catch_up"      # its backlog passed the budget: sent in parts, the client resumes for the rest


class Policy(enum.Enum):
    """What a full pull-subscription queue does with one more event."""

    DROP_OLDEST = "drop_oldest"  # a ring: the oldest event makes room
    CONFLATE = "conflate"        # keep only the latest event per topic
    CLOSE = "close"              # end the subscription with an OverflowError


class Event:
    """One published event, serialized once."""

    __slots__ = ("topic", "name", "data", "epoch", "seq", "frame")

    def __init__(self, topic: str, name: str, data: Any, epoch: int, seq: int, frame: bytes) -> None:
        self.topic = topic
        self.name = name
        self.data = data
        self.epoch = epoch
        self.seq = seq
        self.frame = frame

    @property
    def id(self) -> EventId:
        return EventId(self.epoch, self.seq)

    def __repr__(self) -> str:
        return f"Event({self.topic!r}, {self.name!r}, id={self.id})"


def _in_id_order(events: Iterable[Event]) -> list[Event]:
    return sorted(events, key=lambda e: (e.epoch, e.seq))


class Backlog(NamedTuple):
    """What a stream is sent before it goes live: replayed events, notices, its member lists.

    ``complete`` False means more is owed than its budget allows: the stream
    gets these frames and is closed (``CloseReason.CATCH_UP``), and its client
    resumes from the last id they carry.
    """

    frames: list[bytes]
    complete: bool = True


class Topic:
    """One topic: its replay ring and its subscribers."""

    __slots__ = ("name", "kind", "conflate", "ring", "covered_after", "fanouts", "streams", "subs",
                 "reserved", "last_publish")

    def __init__(self, name: str, conflate: bool, replay_events: int) -> None:
        self.name = name
        self.kind = name.partition(":")[0]
        self.conflate = conflate
        self.ring: deque[Event] = deque(maxlen=replay_events)
        # the ring holds every event of the topic after this id (None: since the hub's origin)
        self.covered_after: EventId | None = None
        self.fanouts: list[Fanout] = []
        self.streams: set[Stream] = set()
        self.subs: set[Subscription] = set()
        self.reserved = 0          # streams being opened on it (Hub.reserve)
        self.last_publish = float("-inf")

    def empty(self) -> bool:
        return not (self.fanouts or self.streams or self.subs or self.reserved)


class Sink(Protocol):
    """Where a push stream's bytes go: the server's connection."""

    def send(self, frames: bytes) -> object:
        """Write SSE frames, framing them for the wire."""

    def buffered(self) -> int:
        """Bytes written and not yet sent."""

    def hub_closed(self, reason: CloseReason) -> object:
        """The hub ended the stream (once, whatever the reason)."""


class Stream:
    """A push subscriber: the server's side of one open event stream.

    ``send_framed``, when given, takes bytes already framed by the hub's
    ``wire_framing``; such a stream shares its topics' ``Fanout`` while it
    keeps up.
    """

    __slots__ = ("topics", "sink", "send_framed", "cap_bytes", "paused", "paused_at",
                 "pending", "dirty", "missed", "closed", "fanout")

    def __init__(self, topics: Iterable[str], sink: Sink, *,
                 send_framed: Callable[[bytes], object] | None = None,
                 cap_bytes: int = STREAM_BUFFER_BYTES) -> None:
        self.topics = tuple(dict.fromkeys(topics))
        self.sink = sink
        self.send_framed = send_framed
        self.cap_bytes = cap_bytes
        self.paused = False
        self.paused_at = 0.0
        self.pending: list[Event] = []
        self.dirty = False
        # while paused: conflating topic -> (events missed, the latest)
        self.missed: dict[str, tuple[int, Event]] = {}
        self.closed = False
        self.fanout: Fanout | None = None


class Fanout:
    """The streams on one set of topics that keep up: one framed buffer per flush for all of them."""

    __slots__ = ("key", "writers", "pending", "conflating")

    def __init__(self, key: tuple[str, ...], conflating: frozenset[str]) -> None:
        self.key = key
        self.writers: dict[Stream, Callable[[bytes], object]] = {}
        self.pending: list[Event] = []
        self.conflating = conflating  # the key's topics that conflate


class _Mailbox(asyncio.Queue):
    """A bounded queue of events, a ring: full, the oldest makes room (or, ``lossless``, it refuses).

    Built on asyncio.Queue's documented hooks (``_init``, ``_put``, ``_get``).
    ``join()``/``task_done()`` are not supported: ``offer`` skips the
    bookkeeping they need when the queue already holds items.
    """

    def __init__(self, maxsize: int, lossless: bool = False) -> None:
        self.lossless = lossless
        self.dropped = 0
        self.capacity = maxsize
        super().__init__(maxsize)

    def _init(self, maxsize: int) -> None:
        self._queue: Any = deque()

    def _put(self, item: Event) -> None:
        self._queue.append(item)

    def _get(self) -> Event:
        return self._queue.popleft()

    def take_all(self) -> list[Event]:
        """Every queued event at once, emptied in one step (nobody waits to put: offer never does)."""
        items = list(self._queue)
        self._queue.clear()
        return items

    def offer(self, item: Event) -> bool:
        """Put without waiting, applying the policy; False means the subscriber must end."""
        queue = self._queue
        if len(queue) >= self.capacity:
            if self.lossless:
                return False
            self._get()
            self.dropped += 1
        if queue:
            self._put(item)  # a consumer waits only on an empty queue: nobody to wake
        else:
            self.put_nowait(item)
        return True


class _ConflatingMailbox(_Mailbox):
    """Keeps the latest event per topic; full, the topic waiting longest makes room."""

    def _init(self, maxsize: int) -> None:
        self._queue = {}

    def _put(self, item: Event) -> None:
        self._queue[item.topic] = item

    def _get(self) -> Event:
        return self._queue.pop(next(iter(self._queue)))

    def take_all(self) -> list[Event]:
        items = list(self._queue.values())
        self._queue.clear()
        return items

    def offer(self, item: Event) -> bool:
        queue = self._queue
        if item.topic in queue:
            queue[item.topic] = item  # the newer event takes the older one's place
            self.dropped += 1
            return True
        return super().offer(item)


class _End(Event):
    """Put into an empty mailbox by ``close()`` to wake a waiting consumer."""

    def __init__(self) -> None:
        super().__init__("", "", None, 0, 0, b"")


class Subscription:
    """A pull subscriber for code inside the process: ``async for event in sub``.

    Ends when closed (``close()``, ``async with``) or when the hub closes it;
    a CLOSE-policy subscription that overflowed raises OverflowError.
    """

    def __init__(self, hub: Hub, topics: tuple[str, ...], maxsize: int, policy: Policy) -> None:
        self.hub = hub
        self.topics = topics
        self._mailbox = (_ConflatingMailbox(maxsize) if policy is Policy.CONFLATE
                         else _Mailbox(maxsize, lossless=policy is Policy.CLOSE))
        self._closed = False
        self._overflowed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped(self) -> int:
        """Events the overflow policy discarded (or replaced, when conflating)."""
        return self._mailbox.dropped

    def qsize(self) -> int:
        return self._mailbox.qsize()

    def _overflow(self) -> None:
        self._overflowed = True
        self.close()

    def close(self) -> None:
        """Unsubscribe; a consumer waiting in ``get()`` ends once the queue is drained."""
        if self._closed:
            return
        self._closed = True
        self.hub._unsubscribe(self)
        if self._mailbox.empty():
            self._mailbox.put_nowait(_End())

    def _end(self) -> Exception:
        if self._overflowed:
            return OverflowError("subscription queue overflowed")
        return StopAsyncIteration()

    async def get(self) -> Event:
        """The next event; StopAsyncIteration once closed and drained."""
        if self._closed and self._mailbox.empty():
            raise self._end()
        event = await self._mailbox.get()
        if isinstance(event, _End):
            raise self._end()
        return event

    def drain(self) -> list[Event]:
        """Every queued event at once (cheap batching for consumers like the store)."""
        return [event for event in self._mailbox.take_all() if not isinstance(event, _End)]

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Iterate lists of events: waits for one, then takes all that are queued."""
        while True:
            try:
                first = await self.get()
            except StopAsyncIteration:
                return
            yield [first, *self.drain()]

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Hub:
    """Topics and their subscribers; ``publish`` fans out without ever awaiting."""

    def __init__(self, *, epoch: int | None = None, replay_events: int = REPLAY_EVENTS,
                 conflate: Callable[[str], bool] = lambda topic: False,
                 wire_framing: Callable[[bytes], bytes] = lambda payload: payload,
                 scheduler: Scheduler | None = None, limits: dict[str, int] | None = None,
                 ring_bytes_max: int = RING_BYTES) -> None:
        self.epoch = epoch if epoch is not None else time.time_ns() // 1_000_000
        self.seq = 0
        # the hub holds every event after this id (None: after EPOCH-0, the start of its own numbering)
        self.origin: EventId | None = None
        self.follows = False   # True: it carries only ids assigned elsewhere (a relay's), never its own
        self.replay_events = replay_events
        self.scheduler: Scheduler = scheduler if scheduler is not None else AsyncioScheduler()
        self._conflate = conflate
        self._framing = wire_framing
        self.topics: dict[str, Topic] = {}
        self.limits = dict(limits or {})        # topic kind -> most topics of that kind (Rule 7)
        self.topics_by_kind: dict[str, int] = {}
        self.topics_expired = 0
        self._forgotten_after: EventId | None = None  # the newest event a forgotten ring held
        self._heads: list[tuple[int, int, str]] = []  # a heap of ring heads (id, topic), for the byte budget
        self.ring_bytes = 0
        self.ring_bytes_max = ring_bytes_max
        self._fanouts: dict[tuple[str, ...], Fanout] = {}
        self._wildcards: dict[str, set[Subscription]] = {}
        self._dirty_fanouts: list[Fanout] = []
        self._dirty_streams: list[Stream] = []
        self._every: set[Stream] = set()          # all-topics streams (Rule 9)
        self._flush_scheduled = False
        self._writing = False
        self.stream_count = 0
        self.subscription_count = 0
        self.published = 0
        self.delivered = 0
        self.conflated = 0
        self.closed_by_reason: dict[CloseReason, int] = {reason: 0 for reason in CloseReason}

    # -- topics ---------------------------------------------------------------

    def topic(self, name: str) -> Topic:
        """The topic called ``name``, created on first use within its kind's budget (else TopicLimit)."""
        topic = self.topics.get(name)
        if topic is None:
            kind = name.partition(":")[0]
            limit = self.limits.get(kind)
            if limit is not None and self.topics_by_kind.get(kind, 0) >= limit:
                raise TopicLimit(kind, limit)
            topic = self._create(name, kind)
        return topic

    def _create(self, name: str, kind: str) -> Topic:
        topic = self.topics[name] = Topic(name, self._conflate(name), self.replay_events)
        topic.covered_after = self._forgotten_after  # an earlier topic of this name may have held more
        self.topics_by_kind[kind] = self.topics_by_kind.get(kind, 0) + 1
        for prefix, subs in self._wildcards.items():
            if name.startswith(prefix):
                topic.subs.update(subs)
        return topic

    def reserve(self, names: Iterable[str]) -> None:
        """Create what is missing of ``names`` (all or none, TopicLimit) and keep them until ``release``.

        For a stream being opened: its topics count against the budget from
        the request on, and are not forgotten before it is attached.
        """
        names = list(dict.fromkeys(names))
        new: dict[str, int] = {}
        for name in names:
            if name not in self.topics:
                kind = name.partition(":")[0]
                new[kind] = new.get(kind, 0) + 1
        for kind, count in new.items():
            limit = self.limits.get(kind)
            if limit is not None and self.topics_by_kind.get(kind, 0) + count > limit:
                raise TopicLimit(kind, limit)
        for name in names:
            topic = self.topics.get(name) or self._create(name, name.partition(":")[0])
            topic.reserved += 1

    def release(self, names: Iterable[str], *, forget: bool = True) -> None:
        """Undo one ``reserve`` of ``names``.

        ``forget`` False leaves a topic left unused in place: for a stream
        released in the step that attaches it, whose detaching forgets it.
        """
        for name in dict.fromkeys(names):
            topic = self.topics.get(name)
            if topic is not None and topic.reserved:
                topic.reserved -= 1
                if forget:
                    self._forget_if_unused(topic)

    def _forget_if_unused(self, topic: Topic) -> None:
        if topic.empty() and not topic.ring:
            self._forget(topic)

    def _forget(self, topic: Topic) -> None:
        del self.topics[topic.name]
        self.topics_by_kind[topic.kind] -= 1
        self.ring_bytes -= sum(_cost(e) for e in topic.ring)
        newest = topic.ring[-1].id if topic.ring else topic.covered_after
        if newest is not None and (self._forgotten_after is None or newest > self._forgotten_after):
            self._forgotten_after = newest

    def expire(self, idle_s: float) -> int:
        """Forget topics with no stream and no direct subscriber, idle for ``idle_s``; how many (Rule 7)."""
        horizon = self.scheduler.now() - idle_s
        idle = [t for t in self.topics.values()
                if t.last_publish < horizon and not (t.fanouts or t.streams or t.reserved)
                and all(self._by_wildcard(t, sub) for sub in t.subs)]
        for topic in idle:
            self._forget(topic)
        self.topics_expired += len(idle)
        return len(idle)

    def _by_wildcard(self, topic: Topic, sub: Subscription) -> bool:
        return any(topic.name.startswith(prefix) and sub in subs for prefix, subs in self._wildcards.items())

    def last_id(self) -> EventId:
        """The id of the newest event published (seq 0 before any)."""
        return EventId(self.epoch, self.seq)

    # -- publishing -----------------------------------------------------------

    def publish(self, topic: str, name: str, data: Any, *, json_text: str | None = None,
                event_id: EventId | None = None, keep: bool = True) -> Event:
        """Publish one event to a topic; returns it with its id. Never awaits.

        ``data`` is JSON-encoded once, unless ``json_text`` gives its encoding.
        ``event_id``, when given, is the id assigned elsewhere (it must be
        greater than the last); otherwise the hub numbers the event.
        ``keep`` False delivers it live only, never kept for replay (Rule 7).
        Raises TopicLimit, taking no id, when the topic is new and over budget.
        """
        text = json_text if json_text is not None else dumps(data)
        if event_id is None:
            if self.follows:
                raise RuntimeError("this hub carries another's ids: it numbers no event itself")
            epoch, seq = self.epoch, self.seq + 1
        else:
            epoch, seq = event_id
            if (epoch, seq) <= (self.epoch, self.seq):
                raise ValueError(f"event id {event_id} is not after {self.last_id()}")
        frame = encode_event(name, text, f"{epoch}-{seq}")  # may raise: no id is taken before it
        t = self.topics.get(topic) or self.topic(topic)      # so may this
        self.epoch, self.seq = epoch, seq
        event = Event(topic, name, data, epoch, seq, frame)
        if keep:
            self._keep(t, event)
        self._fan_out(t, event)
        if self._every:
            self._fan_out_every(event, keep)
        if not keep:
            self._forget_if_unused(t)  # told to nobody, kept nowhere: it leaves no topic behind
        return event

    def _keep(self, t: Topic, event: Event) -> None:
        ring = t.ring
        if len(ring) == ring.maxlen:
            old = ring[0]
            t.covered_after = old.id
            self.ring_bytes -= _cost(old)
        elif not ring:
            self._push_head(t, event)
        ring.append(event)
        self.ring_bytes += _cost(event)
        if self.ring_bytes > self.ring_bytes_max:
            self._trim()

    def _push_head(self, t: Topic, head: Event) -> None:
        heads = self._heads
        if len(heads) > 2 * len(self.topics) + 64:  # entries of forgotten topics: start afresh
            heads[:] = [(r[0].epoch, r[0].seq, name) for name, r in
                        ((n, topic.ring) for n, topic in self.topics.items()) if r]
            heapq.heapify(heads)
        heapq.heappush(heads, (head.epoch, head.seq, t.name))

    def _trim(self) -> None:
        """Drop the oldest kept events, whatever their topic, until all rings fit their budget."""
        heads = self._heads
        while self.ring_bytes > self.ring_bytes_max and heads:
            epoch, seq, name = heapq.heappop(heads)
            t = self.topics.get(name)
            if t is None or not t.ring:
                continue
            head = t.ring[0]
            if (head.epoch, head.seq) != (epoch, seq):  # its ring moved on: queue its real head
                heapq.heappush(heads, (head.epoch, head.seq, name))
                continue
            t.ring.popleft()
            t.covered_after = head.id
            self.ring_bytes -= _cost(head)
            if t.ring:
                heapq.heappush(heads, (t.ring[0].epoch, t.ring[0].seq, name))
            else:
                self._forget_if_unused(t)

    def _fan_out(self, t: Topic, event: Event) -> None:
        self.published += 1
        t.last_publish = self.scheduler.now()
        overflowed = None
        for sub in t.subs:
            if not sub._mailbox.offer(event):
                if overflowed is None:
                    overflowed = []
                overflowed.append(sub)
        if overflowed:
            for sub in overflowed:  # not while iterating: ending one changes t.subs
                sub._overflow()
        for fanout in t.fanouts:
            if not fanout.pending:
                self._dirty_fanouts.append(fanout)
            fanout.pending.append(event)
        for stream in t.streams:
            if stream.paused and t.conflate:
                held = stream.missed.get(t.name)
                stream.missed[t.name] = (held[0] + 1 if held else 1, event)
                continue
            stream.pending.append(event)
            if not stream.dirty:
                stream.dirty = True
                self._dirty_streams.append(stream)
        if not self._flush_scheduled and (self._dirty_fanouts or self._dirty_streams):
            self._flush_scheduled = True
            self.scheduler.call_soon(self.flush)

    def _fan_out_every(self, event: Event, keep: bool) -> None:
        """Rule 9: the event, labelled once, for each all-topics stream's own list."""
        labelled = Event(event.topic, event.name, event.data, event.epoch, event.seq,
                         label_frame(event.topic, keep, event.frame))
        for stream in self._every:
            stream.pending.append(labelled)
            if not stream.dirty:
                stream.dirty = True
                self._dirty_streams.append(stream)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.scheduler.call_soon(self.flush)

    # -- writing --------------------------------------------------------------

    def flush(self) -> None:
        """Write everything published since the last flush to the push streams."""
        if self._writing:
            return  # from inside a write (a pause): the flush running now writes the rest
        self._flush_scheduled = False
        self._writing = True
        try:
            while self._dirty_fanouts or self._dirty_streams:  # a close may publish (presence)
                fanouts, self._dirty_fanouts = self._dirty_fanouts, []
                for fanout in fanouts:
                    self._flush_fanout(fanout)
                streams, self._dirty_streams = self._dirty_streams, []
                for stream in streams:
                    self._flush_stream(stream)
        finally:
            self._writing = False

    def _settle(self) -> None:
        """Rule 3: before a stream changes, every attached stream is given what is pending."""
        if self._dirty_fanouts or self._dirty_streams:
            self.flush()

    def _flush_fanout(self, fanout: Fanout) -> None:
        events = fanout.pending
        fanout.pending = []
        if not fanout.writers:
            return
        payload = events[0].frame if len(events) == 1 else b"".join([e.frame for e in events])
        framed = self._framing(payload)
        if len(framed) > BIG_BATCH_BYTES:
            self._flush_big(fanout, events, framed)
            return
        written = 0
        for stream, write in tuple(fanout.writers.items()):
            if not stream.closed:
                write(framed)
                written += 1
        self.delivered += len(events) * written

    def _flush_big(self, fanout: Fanout, events: list[Event], framed: bytes) -> None:
        """A large batch goes whole only to streams that are keeping up (nothing unsent).

        A stream already behind gets the batch conflated: the latest event of
        each conflating topic, every event of the others. If that still holds
        lossless events it is closed after them, so a stream's buffer never
        exceeds its cap plus one batch.
        """
        reduced: list[Event] | None = None
        reduced_framed = b""
        lossless = False
        for stream, write in tuple(fanout.writers.items()):
            if stream.closed:
                continue
            buffered = stream.sink.buffered()
            if buffered == 0 or buffered + len(framed) <= stream.cap_bytes:
                write(framed)
                self.delivered += len(events)
                continue
            if reduced is None:
                reduced, lossless = _conflate(events, fanout.conflating)
                reduced_framed = self._framing(b"".join([e.frame for e in reduced]))
            write(reduced_framed)
            self.delivered += len(reduced)
            self.conflated += len(events) - len(reduced)
            if lossless:
                self.close_stream(stream, CloseReason.SLOW)

    def _flush_stream(self, stream: Stream) -> None:
        stream.dirty = False
        if stream.closed:
            return
        events = stream.pending
        stream.pending = []
        if stream.missed:  # paused: what it holds of conflating topics goes out with these, in id order
            events = _in_id_order([*events, *self._take_missed(stream)])
        stream.sink.send(events[0].frame if len(events) == 1 else b"".join([e.frame for e in events]))
        self.delivered += len(events)
        if stream.paused and stream.sink.buffered() > stream.cap_bytes:
            self.close_stream(stream, CloseReason.SLOW)

    def _take_missed(self, stream: Stream) -> list[Event]:
        held = stream.missed
        stream.missed = {}
        for skipped, _event in held.values():
            self.conflated += skipped - 1
        return [event for _skipped, event in held.values()]

    # -- push streams (the server's) -----------------------------------------

    def open_stream(self, stream: Stream, start: Callable[[], Backlog] | None = None) -> bool:
        """Attach a push stream after its backlog (Rule 3); False if it was closed instead.

        ``start`` builds the backlog; it is called here, in the step that
        attaches the stream, and may publish (a chat join). The stream's
        position is the hub's last id once ``start`` has run, and its first
        write ends with an ``id:`` frame saying so. A partial backlog
        (``complete`` False) is sent and the stream closed with ``CATCH_UP``.
        """
        if self._writing:
            raise RuntimeError("open_stream() called from inside a write")
        backlog = start() if start is not None else Backlog([])
        self._settle()
        self.stream_count += 1
        if not backlog.complete:
            stream.sink.send(b"".join(backlog.frames))
            self.close_stream(stream, CloseReason.CATCH_UP)
            return False
        self._place(stream)  # before the write: a pause it causes finds the stream attached
        stream.sink.send(b"".join([*backlog.frames, encode_position(str(self.last_id()))]))
        return True

    def _place(self, stream: Stream) -> None:
        if stream.topics == (EVERY_TOPIC,):
            self._every.add(stream)
            return
        if stream.send_framed is not None and not stream.paused:
            key = tuple(sorted(stream.topics))
            fanout = self._fanouts.get(key)
            if fanout is None:
                fanout = self._fanouts[key] = Fanout(key, frozenset(t for t in key if self.topic(t).conflate))
                for name in key:
                    self.topic(name).fanouts.append(fanout)
            fanout.writers[stream] = stream.send_framed
            stream.fanout = fanout
            return
        for name in stream.topics:
            self.topic(name).streams.add(stream)

    def _unplace(self, stream: Stream) -> None:
        if stream.topics == (EVERY_TOPIC,):
            self._every.discard(stream)
            return
        fanout = stream.fanout
        if fanout is not None:
            stream.fanout = None
            del fanout.writers[stream]
            if fanout.writers:
                return
            del self._fanouts[fanout.key]
            for name in fanout.key:
                t = self.topics[name]
                t.fanouts.remove(fanout)
                self._forget_if_unused(t)
            return
        for name in stream.topics:
            t = self.topics.get(name)
            if t is not None:
                t.streams.discard(stream)
                self._forget_if_unused(t)

    def close_stream(self, stream: Stream, reason: CloseReason = CloseReason.CLIENT) -> None:
        """Detach a push stream at once (idempotent); counts the reason, tells its sink.

        What was pending for it is dropped: its client resumes after the last
        id it received.
        """
        if stream.closed:
            return
        stream.closed = True
        self._unplace(stream)
        stream.pending = []
        stream.missed = {}
        self.stream_count -= 1
        self.closed_by_reason[reason] += 1
        stream.sink.hub_closed(reason)

    def pause(self, stream: Stream) -> None:
        """The stream's transport is full: hold its conflating topics' events (Rule 5)."""
        if stream.closed or stream.paused:
            return
        self._settle()
        if stream.closed or stream.paused:  # the flush's write closed or paused it
            return
        self._unplace(stream)
        stream.paused = True
        stream.paused_at = self.scheduler.now()
        self._place(stream)

    def resume(self, stream: Stream) -> None:
        """The stream drained: send the latest event of each topic it missed, then go on live."""
        if stream.closed or not stream.paused:
            return
        self._settle()
        if stream.closed:  # the flush's write passed its cap
            return
        missed = _in_id_order(self._take_missed(stream))
        self._unplace(stream)
        stream.paused = False
        self._place(stream)
        if missed:  # the last step: a pause this write causes finds the stream live
            self.delivered += len(missed)
            stream.sink.send(b"".join([e.frame for e in missed]))

    def pending_bytes(self) -> int:
        """Bytes of frames published and not yet written: shared buffers, streams' own lists, held events."""
        total = sum(len(e.frame) for fanout in self._fanouts.values() for e in fanout.pending)
        for stream in self.streams():
            total += sum(len(e.frame) for e in stream.pending)
            total += sum(len(e.frame) for _skipped, e in stream.missed.values())
        return total

    def streams(self) -> list[Stream]:
        """Every attached push stream."""
        found: dict[Stream, None] = dict.fromkeys(self._every)
        for t in self.topics.values():
            for fanout in t.fanouts:
                found.update(dict.fromkeys(fanout.writers))
            found.update(dict.fromkeys(t.streams))
        return list(found)

    def close_all_streams(self, reason: CloseReason = CloseReason.SHUTDOWN) -> None:
        """End every push stream (shutdown); pull subscriptions stay until closed by their owners.

        The all-topics streams end last, after a flush, so a relay gets every
        event up to the end, the presence leaves of the other streams included.
        """
        for stream in self.streams():
            if stream not in self._every:
                self.close_stream(stream, reason)
        self._settle()
        for stream in list(self._every):
            self.close_stream(stream, reason)

    # -- pull subscriptions (embedders, the store, the charts) ----------------

    def subscribe(self, *topics: str, maxsize: int = SUBSCRIPTION_QUEUE_EVENTS,
                  policy: Policy | str = Policy.DROP_OLDEST) -> Subscription:
        """Subscribe to topics; iterate the result to receive their events.

        A topic ending in ``*`` subscribes to every topic, present or future,
        that starts with what comes before it (``"ticker:*"``).
        """
        if not topics:
            raise ValueError("subscribe() needs at least one topic")
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        sub = Subscription(self, tuple(dict.fromkeys(topics)), maxsize, Policy(policy))
        for name in sub.topics:
            if name.endswith("*"):
                prefix = name[:-1]
                self._wildcards.setdefault(prefix, set()).add(sub)
                for t in self.topics.values():
                    if t.name.startswith(prefix):
                        t.subs.add(sub)
            else:
                self.topic(name).subs.add(sub)
        self.subscription_count += 1
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        for name in sub.topics:
            if name.endswith("*"):
                prefix = name[:-1]
                wildcard = self._wildcards.get(prefix, set())
                wildcard.discard(sub)
                if not wildcard:
                    self._wildcards.pop(prefix, None)
                for t in list(self.topics.values()):
                    if t.name.startswith(prefix):
                        t.subs.discard(sub)
                        self._forget_if_unused(t)
                continue
            t = self.topics.get(name)
            if t is not None:
                t.subs.discard(sub)
                self._forget_if_unused(t)
        self.subscription_count -= 1

    # -- replay ---------------------------------------------------------------

    def replay(self, topic: str, after: EventId) -> list[Event] | None:
        """Events of ``topic`` published after ``after``, or None if the ring cannot tell.

        None means: the id is from the future, from before what the hub holds
        (another run), or older than what the ring still holds, so the caller
        must find another source or tell the client to reset.
        """
        if after > self.last_id():
            return None
        t = self.topics.get(topic)
        covered = self.origin if self.origin is not None else EventId(self.epoch, 0)
        # a forgotten ring of this name may have held more than what is known now
        held_from = t.covered_after if t is not None else self._forgotten_after
        if held_from is not None and held_from > covered:
            covered = held_from
        if after < covered:
            return None
        if t is None:
            return []
        return [event for event in t.ring if (event.epoch, event.seq) > after]

    def replay_all(self, after: EventId) -> tuple[list[Event], list[str]] | None:
        """Rule 9: every kept event after ``after``, in id order, and the topics whose rings cannot tell.

        None when the hub cannot tell which topics had events after ``after``
        (an id from the future, from before what the hub holds, or before a
        forgotten ring's newest event).
        """
        if after > self.last_id():
            return None
        covered = self.origin if self.origin is not None else EventId(self.epoch, 0)
        if after < covered or self._forgotten_after is not None and after < self._forgotten_after:
            return None
        events: list[Event] = []
        uncovered: list[str] = []
        for name in self.topics:
            got = self.replay(name, after)
            if got is None:
                uncovered.append(name)
            else:
                events.extend(got)
        return _in_id_order(events), uncovered

    def cut(self, names: Iterable[str] | None = None) -> None:
        """Stop claiming the events of these topics (every topic: None) published so far.

        For a relay whose upstream lost them (relay Rule 3): their rings are
        emptied, a resume from before the next event is no longer covered,
        and their streams are closed (``CATCH_UP``) so that they resume.
        """
        mark = EventId(self.epoch, self.seq + 1)  # any id held now is before it
        if names is None:
            self.origin = mark
            cut = set(self.topics)
        else:
            cut = set(names)
            if self._forgotten_after is None or mark > self._forgotten_after:
                self._forgotten_after = mark  # a topic not held now may have been held then
        for name in cut:
            t = self.topics.get(name)
            if t is not None:
                self.ring_bytes -= sum(_cost(e) for e in t.ring)
                t.ring.clear()
                t.covered_after = mark
        for stream in self.streams():
            if names is None or stream.topics == (EVERY_TOPIC,) or cut.intersection(stream.topics):
                self.close_stream(stream, CloseReason.CATCH_UP)

    def is_idle(self) -> bool:
        """True when no stream or subscription is attached (tests use it to find leaks)."""
        return (self.stream_count == 0 and self.subscription_count == 0 and not self._wildcards
                and not self._fanouts and not self._every and all(t.empty() for t in self.topics.values()))


def _cost(event: Event) -> int:
    """What a kept event counts against the rings' byte budget (Rule 7)."""
    return len(event.frame) + EVENT_OVERHEAD_BYTES


def _conflate(events: list[Event], conflating: frozenset[str]) -> tuple[list[Event], bool]:
    """The latest event of each conflating topic and every other event, in order; and whether any is lossless."""
    latest = {e.topic: e for e in events if e.topic in conflating}
    kept = [e for e in events if e.topic not in conflating or latest[e.topic] is e]
    return kept, len(kept) > len(latest)
