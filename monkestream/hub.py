"""The in-process pub/sub hub: topics, ids, replay rings and the fan-out to subscribers.

Theory of operation
-------------------
Rule 1: ``publish()`` never awaits and never raises because of a subscriber. It
        serializes the event once (``Event.frame``), numbers it, keeps it in the
        topic's replay ring, hands it to pull subscribers' queues with
        ``put_nowait`` and queues it for push streams; a flush scheduled with
        ``call_soon`` then writes everything published in this loop iteration.
Rule 2: a push stream receives one write per flush, not one per event: the
        frames of one topic are joined and framed once, and the same bytes go
        to every stream of that topic that is keeping up (the fast path).
        Streams on several topics, paused streams and streams that frame their
        own bytes get their frames in publish order through their own
        ``pending`` list, so ids always reach a client in ascending order.
Rule 3: memory is bounded whatever a subscriber does. A pull subscriber's queue
        has a size and an overflow policy. A push stream whose transport is
        paused (its peer reads too slowly) gets, for a conflating topic, only
        the latest event once it drains; for a lossless topic it keeps being
        written until its buffer passes its cap, and is then closed with
        ``CloseReason.SLOW`` so that it resumes with its Last-Event-ID.
Rule 4: ids are ``EPOCH-SEQ`` (see ``sse.EventId``). ``seq`` counts every event
        of the hub, so ids order events across topics; the epoch is fixed for
        the hub's life and the caller makes it grow from run to run.
Rule 5: the hub owns no task. Embedders may use it from any asyncio program;
        only the flush callback and the queues touch the running loop.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, Protocol

from .sse import EventId, encode_event

REPLAY_EVENTS = 256           # per topic, the events kept for Last-Event-ID resume
SUBSCRIPTION_QUEUE_EVENTS = 1024
STREAM_BUFFER_BYTES = 256 * 1024
BIG_BATCH_BYTES = 16 * 1024     # a flush larger than this checks each stream's buffer first

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class CloseReason(enum.Enum):
    """Why the server ended a stream; counted in metrics."""

    CLIENT = "client"          # the peer closed the connection
    SLOW = "slow"              # a lossless stream's buffer passed its cap
    PEER_GONE = "peer_gone"    # the write buffer did not drain for too long
    MAX_AGE = "max_age"        # the stream reached its maximum age
    SHUTDOWN = "shutdown"      # the server is stopping
    OVERFLOW = "overflow"      # a pull subscription's queue overflowed


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


class Topic:
    """One topic: its replay ring and its subscribers."""

    __slots__ = ("name", "conflate", "ring", "evicted_seq", "fast", "streams", "subs",
                 "pending", "last_publish")

    def __init__(self, name: str, conflate: bool, replay_events: int) -> None:
        self.name = name
        self.conflate = conflate
        self.ring: deque[Event] = deque(maxlen=replay_events)
        self.evicted_seq = 0  # seq of the newest event that fell out of the ring
        self.fast: dict[Stream, Callable[[bytes], object]] = {}
        self.streams: set[Stream] = set()
        self.subs: set[Subscription] = set()
        self.pending: list[bytes] = []
        self.last_publish = 0.0

    def empty(self) -> bool:
        return not (self.fast or self.streams or self.subs)


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
    ``wire_framing`` (the fast path, only for single-topic streams).
    """

    __slots__ = ("topics", "sink", "send_framed", "cap_bytes", "paused", "paused_at",
                 "pending", "dirty", "missed", "closed")

    def __init__(self, topics: Iterable[str], sink: Sink, *,
                 send_framed: Callable[[bytes], object] | None = None,
                 cap_bytes: int = STREAM_BUFFER_BYTES) -> None:
        self.topics = tuple(dict.fromkeys(topics))
        self.sink = sink
        self.send_framed = send_framed if len(self.topics) == 1 else None
        self.cap_bytes = cap_bytes
        self.paused = False
        self.paused_at = 0.0
        self.pending: list[bytes] = []
        self.dirty = False
        # while paused: topic -> (events skipped, the latest), for conflating topics
        self.missed: dict[str, tuple[int, Event]] | None = None
        self.closed = False


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
                 wire_framing: Callable[[bytes], bytes] = lambda payload: payload) -> None:
        self.epoch = epoch if epoch is not None else time.time_ns() // 1_000_000
        self.seq = 0
        self.replay_events = replay_events
        self._conflate = conflate
        self._framing = wire_framing
        self.topics: dict[str, Topic] = {}
        self._wildcards: dict[str, set[Subscription]] = {}
        self._dirty_topics: list[Topic] = []
        self._dirty_streams: list[Stream] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stream_count = 0
        self.subscription_count = 0
        self.published = 0
        self.delivered = 0
        self.conflated = 0
        self.closed_by_reason: dict[CloseReason, int] = {reason: 0 for reason in CloseReason}

    # -- topics ---------------------------------------------------------------

    def topic(self, name: str) -> Topic:
        """The topic called ``name``, created on first use."""
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name, self._conflate(name), self.replay_events)
            for prefix, subs in self._wildcards.items():
                if name.startswith(prefix):
                    topic.subs.update(subs)
        return topic

    def _forget_if_unused(self, topic: Topic) -> None:
        if topic.empty() and not topic.ring and not topic.pending:
            self.topics.pop(topic.name, None)

    def last_id(self) -> EventId:
        """The id of the newest event published (seq 0 before any)."""
        return EventId(self.epoch, self.seq)

    # -- publishing -----------------------------------------------------------

    def publish(self, topic: str, name: str, data: Any, *, json_text: str | None = None) -> Event:
        """Publish one event to a topic; returns it with its id. Never awaits.

        ``data`` is JSON-encoded once, unless ``json_text`` gives its encoding.
        """
        self.seq = seq = self.seq + 1
        text = json_text if json_text is not None else _dumps(data)
        if "\n" in text or "\r" in text or "\n" in name or "\r" in name:
            frame = encode_event(name, text, f"{self.epoch}-{seq}")
        else:  # the common case, the same bytes encode_event would give
            frame = f"id: {self.epoch}-{seq}\nevent: {name}\ndata: {text}\n\n".encode()
        event = Event(topic, name, data, self.epoch, seq, frame)
        self._fan_out(self.topics.get(topic) or self.topic(topic), event)
        return event

    def _fan_out(self, t: Topic, event: Event) -> None:
        self.published += 1
        ring = t.ring
        if len(ring) == ring.maxlen:
            t.evicted_seq = ring[0].seq
        ring.append(event)
        t.last_publish = time.monotonic()
        overflowed = None
        for sub in t.subs:
            if not sub._mailbox.offer(event):
                if overflowed is None:
                    overflowed = []
                overflowed.append(sub)
        if overflowed:
            for sub in overflowed:  # not while iterating: ending one changes t.subs
                sub._overflow()
        if t.fast:
            if not t.pending:
                self._dirty_topics.append(t)
            t.pending.append(event.frame)
        for stream in t.streams:
            if stream.paused and t.conflate:
                missed = stream.missed
                if missed is None:
                    missed = stream.missed = {}
                skipped = missed[t.name][0] if t.name in missed else 0
                missed[t.name] = (skipped + 1, event)
                continue
            stream.pending.append(event.frame)
            if not stream.dirty:
                stream.dirty = True
                self._dirty_streams.append(stream)
        if not self._flush_scheduled and (self._dirty_topics or self._dirty_streams):
            self._flush_scheduled = True
            loop = self._loop
            if loop is None or loop.is_closed():
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything published since the last flush to the push streams."""
        self._flush_scheduled = False
        topics, self._dirty_topics = self._dirty_topics, []
        for t in topics:
            frames = t.pending
            t.pending = []
            if not t.fast:
                continue
            payload = frames[0] if len(frames) == 1 else b"".join(frames)
            framed = self._framing(payload)
            if len(framed) > BIG_BATCH_BYTES:
                self._flush_big(t, frames, framed)
                continue
            for write in tuple(t.fast.values()):
                write(framed)
            self.delivered += len(frames) * len(t.fast)
        streams, self._dirty_streams = self._dirty_streams, []
        for stream in streams:
            stream.dirty = False
            if stream.closed:
                continue
            frames = stream.pending
            stream.pending = []
            stream.sink.send(frames[0] if len(frames) == 1 else b"".join(frames))
            self.delivered += len(frames)
            if stream.paused and stream.sink.buffered() > stream.cap_bytes:
                self.close_stream(stream, CloseReason.SLOW)

    def _flush_big(self, t: Topic, frames: list[bytes], framed: bytes) -> None:
        """A large batch goes whole only to streams that are keeping up (nothing unsent).

        A stream already behind gets, on a conflating topic, only the batch's
        last event; on a lossless one the batch, and is closed if that passes
        its cap. So a stream's buffer never exceeds its cap plus one batch.
        """
        last = None
        for stream, write in tuple(t.fast.items()):
            buffered = stream.sink.buffered()
            if buffered == 0 or buffered + len(framed) <= stream.cap_bytes:
                write(framed)
                self.delivered += len(frames)
            elif t.conflate:
                last = last or self._framing(frames[-1])
                write(last)
                self.delivered += 1
                self.conflated += len(frames) - 1
            else:
                write(framed)
                self.delivered += len(frames)
                self.close_stream(stream, CloseReason.SLOW)

    # -- push streams (the server's) -----------------------------------------

    def open_stream(self, stream: Stream, backlog: Iterable[Event] = ()) -> None:
        """Attach a push stream; ``backlog`` (replayed events) is written first."""
        frames = [event.frame for event in backlog]
        if frames:
            stream.sink.send(b"".join(frames))
        self.stream_count += 1
        self._place(stream)

    def _place(self, stream: Stream) -> None:
        for name in stream.topics:
            t = self.topic(name)
            if stream.send_framed is not None and not stream.paused:
                t.fast[stream] = stream.send_framed
            else:
                t.streams.add(stream)

    def _unplace(self, stream: Stream) -> None:
        for name in stream.topics:
            t = self.topics.get(name)
            if t is not None:
                t.fast.pop(stream, None)
                t.streams.discard(stream)
                self._forget_if_unused(t)

    def close_stream(self, stream: Stream, reason: CloseReason = CloseReason.CLIENT) -> None:
        """Detach a push stream at once (idempotent); counts the reason, calls ``stream.close``."""
        if stream.closed:
            return
        stream.closed = True
        self._unplace(stream)
        stream.pending = []
        stream.missed = None
        self.stream_count -= 1
        self.closed_by_reason[reason] += 1
        stream.sink.hub_closed(reason)

    def pause(self, stream: Stream) -> None:
        """The stream's transport is full: stop writing conflating topics to it."""
        if stream.closed or stream.paused:
            return
        self._unplace(stream)
        stream.paused = True
        stream.paused_at = time.monotonic()
        self._place(stream)

    def resume(self, stream: Stream) -> None:
        """The stream drained: send the latest event of each topic it missed, then go on live."""
        if stream.closed or not stream.paused:
            return
        missed = sorted((stream.missed or {}).values(), key=lambda pair: pair[1].seq)
        stream.missed = None
        if missed:
            for skipped, _event in missed:
                self.conflated += skipped - 1
            self.delivered += len(missed)
            stream.sink.send(b"".join(event.frame for _skipped, event in missed))
        self._unplace(stream)
        stream.paused = False
        self._place(stream)

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

        None means: the id is from another run, from the future, or older than
        what the ring still holds, so the caller must find another source or
        tell the client to reset.
        """
        if after.epoch != self.epoch or after.seq > self.seq:
            return None
        t = self.topics.get(topic)
        if t is None:
            return []
        if after.seq < t.evicted_seq:
            return None
        return [event for event in t.ring if event.seq > after.seq]

    def close_all_streams(self, reason: CloseReason = CloseReason.SHUTDOWN) -> None:
        """End every push stream (shutdown); pull subscriptions stay until closed by their owners."""
        for t in list(self.topics.values()):
            for stream in list(t.fast) + list(t.streams):
                self.close_stream(stream, reason)

    def is_idle(self) -> bool:
        """True when no stream or subscription is attached (tests use it to find leaks)."""
        return (self.stream_count == 0 and self.subscription_count == 0 and not self._wildcards
                and all(t.empty() for t in self.topics.values()))
