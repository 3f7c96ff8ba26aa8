"""Stream operators over async iterables, named as in RxJS.

An operator is a function of its options that returns a function from an async
iterable to an async iterator; ``pipe(source, *operators)`` applies them left
to right::

    prices = pipe(ticks, filter(is_trade), group_by(symbol_of))

=========================  ========================  ============================
monkestream                RxJS                      RxPY (reactivex)
=========================  ========================  ============================
``map``                    ``map``                   ``map``
``filter``                 ``filter``                ``filter``
``scan``                   ``scan``                  ``scan``
``take``                   ``take``                  ``take``
``distinct_until_changed`` ``distinctUntilChanged``  ``distinct_until_changed``
``concat_map``             ``concatMap``             ``concat_map``
``merge``                  ``merge``                 ``merge``
``buffer_time``            ``bufferTime``            ``buffer_with_time``
``throttle_time``          ``throttleTime``          ``throttle_first`` (leading)
``debounce_time``          ``debounceTime``          ``debounce``
``sample_time``            ``sampleTime``            ``sample``
``group_by``               ``groupBy``               ``group_by``
=========================  ========================  ============================

Marble diagrams in the docstrings use one character per frame: ``-`` is an
empty frame, a letter is a value, ``(ab)`` are values in the same frame, ``|``
is the end and ``#`` an error.  The test-suite runs each of them.

Theory of operation
-------------------
Rule 1: nothing runs until the first ``anext()``; each iteration of an operator
        is a fresh, independent run over the source.
Rule 2: the source is closed (``aclose()``) whenever the operator's iterator
        ends: exhaustion, error, ``aclose()`` or cancellation of the consumer.
Rule 3: operators that must act while no item arrives (``merge``, the
        time-based ones with timers, ``group_by``) read their source in one
        *pump* task per run, never one task per item, and hold at most one
        timer at a time.  Closing the iterator cancels the timer and cancels
        and awaits the pump before ``aclose()`` returns.  Everything else runs
        inside the consumer's own ``anext()``.
Rule 4: back-pressure is preserved: every queue between a pump and its
        consumer is bounded (one output for the time-based operators,
        ``MERGE_QUEUE_ITEMS`` for ``merge``, ``max_buffered`` per group), and a
        pump facing a full queue stops reading, so a slow consumer slows the
        source instead of growing a buffer.  A timer cannot wait: it may add
        one output beyond the bound, and ``buffer_time`` does not queue an
        empty window behind an output not yet taken.
Rule 5: a source error reaches the consumer after the outputs already produced;
        anything still held back (an open buffer, a trailing value, a debounce
        candidate) is dropped, as in RxJS.  ``CancelledError`` is never caught.
Rule 6: time comes only from the ``scheduler`` argument (``clock`` rule 1).
Rule 7: a consumer that stops early should ``aclose()`` the iterator
        (``contextlib.aclosing``); a bare ``break`` leaves the clean-up to the
        loop's async-generator finaliser.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from monkestream.clock import Handle, Scheduler, default_scheduler

__all__ = [
    "GROUP_BUFFER_ITEMS",
    "MERGE_QUEUE_ITEMS",
    "GroupedStream",
    "Operator",
    "buffer_time",
    "concat_map",
    "debounce_time",
    "distinct_until_changed",
    "filter",
    "group_by",
    "map",
    "merge",
    "pipe",
    "sample_time",
    "scan",
    "take",
    "throttle_time",
]

T = TypeVar("T")
U = TypeVar("U")
K = TypeVar("K", bound=Hashable)

Operator = Callable[[AsyncIterable[T]], AsyncIterator[U]]

GROUP_BUFFER_ITEMS = 1024
MERGE_QUEUE_ITEMS = 16
# Loop clocks may fire a timer a hair early; a debounce that is due within this
# much is treated as due rather than re-armed for a vanishing remainder.
_DUE_EPSILON_S = 1e-9


class _Signal(enum.Enum):
    END = enum.auto()
    NOTHING = enum.auto()


# -- plumbing -----------------------------------------------------------------


async def _aclose(iterator: object) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    running = [task for task in tasks if not task.done()]
    if running:
        await asyncio.wait(running)


def _is_async_callable(fn: Callable[..., object]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)
    )


def _wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()


async def _wait(waiters: list[asyncio.Future[None]]) -> None:
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    finally:
        if waiter in waiters:
            waiters.remove(waiter)


class _Channel(Generic[T]):
    """A FIFO from producers (pumps, timers) to one consumer, with an end mark.

    ``push`` never blocks (timers cannot wait); ``put`` and ``wait_space``
    wait while ``capacity`` items are queued.  ``finish`` marks the end, with an
    error or not: queued items are still delivered, then ``get`` raises the
    error once or returns ``_Signal.END``.  ``discard`` drops everything.
    """

    __slots__ = ("_items", "_capacity", "_getters", "_putters", "_ended", "_error")

    def __init__(self, capacity: int | None) -> None:
        self._items: deque[T] = deque()
        self._capacity = capacity
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []
        self._ended = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._items)

    def _full(self) -> bool:
        return self._capacity is not None and len(self._items) >= self._capacity

    def push(self, item: T) -> None:
        if not self._ended:
            self._items.append(item)
            if self._getters:
                _wake_all(self._getters)

    async def put(self, item: T) -> bool:
        """Queue ``item`` once there is room; False if the channel ended first."""
        while self._full() and not self._ended:
            await _wait(self._putters)
        if self._ended:
            return False
        self.push(item)
        return True

    async def wait_space(self) -> None:
        while self._full() and not self._ended:
            await _wait(self._putters)

    def finish(self, error: BaseException | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
            _wake_all(self._getters)
            _wake_all(self._putters)

    def discard(self) -> None:
        self.finish()
        self._items.clear()
        self._error = None

    async def get(self) -> T | _Signal:
        while not self._items:
            if self._ended:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                return _Signal.END
            await _wait(self._getters)
        item = self._items.popleft()
        if self._putters:
            _wake_all(self._putters)
        return item


# -- composition and per-item operators ---------------------------------------


def pipe(source: AsyncIterable[Any], *operators: Operator[Any, Any]) -> AsyncIterable[Any]:
    """Apply ``operators`` to ``source`` left to right."""
    stream = source
    for operator in operators:
        stream = operator(stream)
    return stream


def map(fn: Callable[[T], U] | Callable[[T], Awaitable[U]]) -> Operator[T, U]:
    """Emit ``fn(item)`` for each item; ``fn`` may be a coroutine function."""
    is_async = _is_async_callable(fn)

    async def _map(source: AsyncIterable[T]) -> AsyncIterator[U]:
        it = aiter(source)
        try:
            if is_async:
                async for item in it:
                    yield await fn(item)  # type: ignore[misc]
            else:
                async for item in it:
                    yield fn(item)  # type: ignore[misc]
        finally:
            await _aclose(it)

    return _map


def filter(predicate: Callable[[T], object]) -> Operator[T, T]:
    """Emit the items for which ``predicate(item)`` is true."""

    async def _filter(source: AsyncIterable[T]) -> AsyncIterator[T]:
        it = aiter(source)
        try:
            async for item in it:
                if predicate(item):
                    yield item
        finally:
            await _aclose(it)

    return _filter


def scan(fn: Callable[[U, T], U] | Callable[[U, T], Awaitable[U]], seed: U) -> Operator[T, U]:
    """Emit each running accumulation ``acc = fn(acc, item)``, starting from ``seed``.

    The seed itself is not emitted, as in RxJS.
    """
    is_async = _is_async_callable(fn)

    async def _scan(source: AsyncIterable[T]) -> AsyncIterator[U]:
        acc = seed
        it = aiter(source)
        try:
            async for item in it:
                acc = await fn(acc, item) if is_async else fn(acc, item)  # type: ignore[assignment,misc]
                yield acc
        finally:
            await _aclose(it)

    return _scan


def take(count: int) -> Operator[T, T]:
    """Emit the first ``count`` items, then end.

    The source is closed as the last item is handed over, not on the next pull::

        -a-b-c-d|
        [take(2)]
        -a-(b|)
    """

    async def _take(source: AsyncIterable[T]) -> AsyncIterator[T]:
        if count <= 0:
            return
        remaining = count
        it = aiter(source)
        try:
            async for item in it:
                remaining -= 1
                if remaining == 0:
                    await _aclose(it)
                    yield item
                    return
                yield item
        finally:
            await _aclose(it)

    return _take


def distinct_until_changed(key: Callable[[T], object] | None = None) -> Operator[T, T]:
    """Drop an item whose key equals the previous item's key (``==``)."""

    async def _distinct_until_changed(source: AsyncIterable[T]) -> AsyncIterator[T]:
        last: object = _Signal.NOTHING
        it = aiter(source)
        try:
            async for item in it:
                current = item if key is None else key(item)
                if last is _Signal.NOTHING or current != last:
                    last = current
                    yield item
        finally:
            await _aclose(it)

    return _distinct_until_changed


def concat_map(fn: Callable[[T], AsyncIterable[U]]) -> Operator[T, U]:
    """Emit everything from ``fn(item)``, one inner stream after another."""

    async def _concat_map(source: AsyncIterable[T]) -> AsyncIterator[U]:
        it = aiter(source)
        try:
            async for item in it:
                inner = aiter(fn(item))
                try:
                    async for value in inner:
                        yield value
                finally:
                    await _aclose(inner)
        finally:
            await _aclose(it)

    return _concat_map


# -- merge ----------------------------------------------------------------------


async def merge(*sources: AsyncIterable[T]) -> AsyncIterator[T]:
    """Emit the items of all ``sources`` as they come; end when all have ended.

    One pump task per source.  At most ``MERGE_QUEUE_ITEMS`` items (or one per
    source, if more) wait for the consumer, plus one in each pump's hand.  The
    first error is raised after the items already queued, and every other
    source is closed::

        -a---b---c|
        ---x---y-----z|
        [merge]
        -a-x-b-y-c---z|
    """
    iterators = [aiter(source) for source in sources]
    if not iterators:
        return
    channel: _Channel[T] = _Channel(max(len(iterators), MERGE_QUEUE_ITEMS))
    running = len(iterators)

    async def forward(it: AsyncIterator[T]) -> None:
        nonlocal running
        try:
            async for item in it:
                if not await channel.put(item):
                    return
        except Exception as exc:
            channel.finish(exc)
        else:
            running -= 1
            if running == 0:
                channel.finish()
        finally:
            await _aclose(it)

    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(forward(it), name=f"monkestream.merge[{index}]")
        for index, it in enumerate(iterators)
    ]
    try:
        while (item := await channel.get()) is not _Signal.END:
            yield item  # type: ignore[misc]
    finally:
        await _cancel_and_wait(tasks)


# -- the pump behind the time-based operators -----------------------------------


class _Machine(ABC, Generic[T, U]):
    """State of one time-based operator run, driven by its pump and its timer.

    Subclasses react to ``on_item``, ``on_complete`` and ``on_error`` (called by
    the pump) and to their own timer, and ``push`` outputs into ``outbox``.
    """

    def __init__(self, scheduler: Scheduler, seconds: float) -> None:
        self.outbox: _Channel[U] = _Channel(1)
        self.scheduler = scheduler
        self.seconds = seconds
        self.timer: Handle | None = None

    def start(self) -> None:
        """Run once before the first item (periodic operators arm here)."""

    @abstractmethod
    def on_item(self, item: T) -> None:
        """React to one item from the source."""

    def on_complete(self) -> None:
        self.stop()
        self.outbox.finish()

    def on_error(self, exc: BaseException) -> None:
        self.stop()
        self.outbox.finish(exc)

    def arm(self, delay: float, callback: Callable[[], object]) -> None:
        self.timer = self.scheduler.call_later(delay, callback)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def _pump(it: AsyncIterator[T], machine: _Machine[T, Any]) -> None:
    outbox = machine.outbox
    try:
        while True:
            if len(outbox):
                await outbox.wait_space()
            try:
                item = await anext(it)
            except StopAsyncIteration:
                break
            machine.on_item(item)
    except Exception as exc:
        machine.on_error(exc)
    else:
        machine.on_complete()
    finally:
        await _aclose(it)


def _machine_operator(
    name: str, make: Callable[[Scheduler], _Machine[T, U]], scheduler: Scheduler | None
) -> Operator[T, U]:
    """An operator that runs a fresh ``make(clock)`` machine for each iteration, as task ``name``."""

    def operator(source: AsyncIterable[T]) -> AsyncIterator[U]:
        return _run(source, lambda: make(scheduler or default_scheduler()), name)

    return operator


async def _run(
    source: AsyncIterable[T], make_machine: Callable[[], _Machine[T, U]], name: str
) -> AsyncIterator[U]:
    machine = make_machine()
    it = aiter(source)
    machine.start()
    task = asyncio.get_running_loop().create_task(_pump(it, machine), name=name)
    try:
        while (output := await machine.outbox.get()) is not _Signal.END:
            yield output  # type: ignore[misc]
    finally:
        machine.stop()
        await _cancel_and_wait([task])


# -- buffer_time ------------------------------------------------------------------


class _BufferTime(_Machine[T, list[T]]):
    def __init__(
        self, scheduler: Scheduler, seconds: float, max_size: int | None, emit_empty: bool
    ) -> None:
        super().__init__(scheduler, seconds)
        self.max_size = max_size
        self.emit_empty = emit_empty
        self.buffer: list[T] = []

    def start(self) -> None:
        self.arm(self.seconds, self.on_window_end)

    def on_window_end(self) -> None:
        # An empty window is not queued behind an output still untaken (rule 4).
        if self.buffer or (self.emit_empty and not len(self.outbox)):
            self.outbox.push(self.buffer)
            self.buffer = []
        self.arm(self.seconds, self.on_window_end)

    def on_item(self, item: T) -> None:
        self.buffer.append(item)
        if self.max_size is not None and len(self.buffer) >= self.max_size:
            self.stop()
            self.outbox.push(self.buffer)
            self.buffer = []
            self.arm(self.seconds, self.on_window_end)

    def on_complete(self) -> None:
        if self.buffer:
            self.outbox.push(self.buffer)
            self.buffer = []
        super().on_complete()

    def on_error(self, exc: BaseException) -> None:
        self.buffer = []
        super().on_error(exc)


def buffer_time(
    seconds: float,
    *,
    max_size: int | None = None,
    emit_empty: bool = True,
    scheduler: Scheduler | None = None,
) -> Operator[T, list[T]]:
    """Emit the items of each ``seconds``-long window as one list.

    Windows start when iteration starts and follow one another.  An empty
    window emits ``[]`` unless ``emit_empty`` is false.  Reaching ``max_size``
    items emits at once and starts a new window.  When the source ends, a
    non-empty partial buffer is emitted, then the iterator ends.  When the
    source fails, the open buffer is dropped and the error raised: a batch
    writer sees the failure instead of a last batch that looks complete.

    Window of 4 frames; x=[a, b], y=[c], z=[d], w=[], v=[e]::

        -a-b-c---d-------e-|
        [buffer_time(4)]
        ----x---y---z---w--(v|)
    """
    if seconds <= 0:
        raise ValueError("buffer_time needs a positive window")
    if max_size is not None and max_size < 1:
        raise ValueError("max_size must be at least 1")

    return _machine_operator("monkestream.buffer_time",
                             lambda clock: _BufferTime(clock, seconds, max_size, emit_empty), scheduler)


# -- throttle_time ------------------------------------------------------------------


class _ThrottleTime(_Machine[T, T]):
    def __init__(self, scheduler: Scheduler, seconds: float, leading: bool) -> None:
        super().__init__(scheduler, seconds)
        self.leading = leading
        self.trailing: object = _Signal.NOTHING
        self.completing = False

    def on_item(self, item: T) -> None:
        if self.timer is not None:
            self.trailing = item
            return
        if self.leading:
            self.outbox.push(item)
        else:
            self.trailing = item
        self.arm(self.seconds, self.on_window_end)

    def on_window_end(self) -> None:
        self.timer = None
        value, self.trailing = self.trailing, _Signal.NOTHING
        if value is _Signal.NOTHING:
            return
        self.outbox.push(value)  # type: ignore[arg-type]
        if self.completing:
            self.outbox.finish()
        else:
            self.arm(self.seconds, self.on_window_end)

    def on_complete(self) -> None:
        # RxJS: with a trailing value pending, the end waits for the window.
        if self.timer is not None and self.trailing is not _Signal.NOTHING:
            self.completing = True
        else:
            super().on_complete()

    def on_error(self, exc: BaseException) -> None:
        self.trailing = _Signal.NOTHING
        super().on_error(exc)


def throttle_time(
    seconds: float,
    *,
    leading: bool = True,
    trailing: bool = False,
    scheduler: Scheduler | None = None,
) -> Operator[T, T]:
    """Emit an item, then ignore the source for ``seconds`` (RxJS semantics).

    With ``leading`` the item that opens a window is emitted at once.  With
    ``trailing`` the last item seen during a window is emitted when the window
    closes, and that emission opens the next window; if the source ends with
    such an item pending, the end waits for it.  Without ``trailing`` no timer
    or task is used: the window is a comparison with ``now()``.

    Window of 4 frames, leading only::

        -a-bc----d-e---f--|
        [throttle_time(4)]
        -a-------d-----f--|

    Window of 4 frames, leading and trailing::

        -a-bc-----d-e-------f|
        [throttle_time(4, trailing=True)]
        -a---c----d---e-----f|
    """
    if seconds <= 0:
        raise ValueError("throttle_time needs a positive window")
    if not (leading or trailing):
        raise ValueError("throttle_time with neither leading nor trailing emits nothing")

    if not trailing:

        async def _throttle_leading(source: AsyncIterable[T]) -> AsyncIterator[T]:
            clock = scheduler or default_scheduler()
            window_end = float("-inf")
            it = aiter(source)
            try:
                async for item in it:
                    now = clock.now()
                    if now >= window_end:
                        window_end = now + seconds
                        yield item
            finally:
                await _aclose(it)

        return _throttle_leading

    return _machine_operator("monkestream.throttle_time",
                             lambda clock: _ThrottleTime(clock, seconds, leading), scheduler)


# -- debounce_time ------------------------------------------------------------------


class _DebounceTime(_Machine[T, T]):
    def __init__(self, scheduler: Scheduler, seconds: float) -> None:
        super().__init__(scheduler, seconds)
        self.candidate: object = _Signal.NOTHING
        self.due = 0.0

    def on_item(self, item: T) -> None:
        self.candidate = item
        self.due = self.scheduler.now() + self.seconds
        # One timer per quiet spell: a busy source moves ``due``, not the timer.
        if self.timer is None:
            self.arm(self.seconds, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        remaining = self.due - self.scheduler.now()
        if remaining > _DUE_EPSILON_S:
            self.arm(remaining, self.on_timer)
            return
        value, self.candidate = self.candidate, _Signal.NOTHING
        if value is not _Signal.NOTHING:
            self.outbox.push(value)  # type: ignore[arg-type]

    def on_complete(self) -> None:
        value, self.candidate = self.candidate, _Signal.NOTHING
        if value is not _Signal.NOTHING:
            self.outbox.push(value)  # type: ignore[arg-type]
        super().on_complete()

    def on_error(self, exc: BaseException) -> None:
        self.candidate = _Signal.NOTHING
        super().on_error(exc)


def debounce_time(seconds: float, *, scheduler: Scheduler | None = None) -> Operator[T, T]:
    """Emit an item once ``seconds`` pass without a newer one.

    When the source ends, the pending item is emitted at once, as in RxJS.

    Quiet time of 3 frames::

        -a-bc----d---e-f-|
        [debounce_time(3)]
        -------c----d----(f|)
    """
    if seconds <= 0:
        raise ValueError("debounce_time needs a positive quiet time")

    return _machine_operator("monkestream.debounce_time", lambda clock: _DebounceTime(clock, seconds), scheduler)


# -- sample_time ----------------------------------------------------------------------


class _SampleTime(_Machine[T, T]):
    def __init__(self, scheduler: Scheduler, seconds: float) -> None:
        super().__init__(scheduler, seconds)
        self.latest: object = _Signal.NOTHING

    def start(self) -> None:
        self.arm(self.seconds, self.on_tick)

    def on_tick(self) -> None:
        value, self.latest = self.latest, _Signal.NOTHING
        if value is not _Signal.NOTHING:
            self.outbox.push(value)  # type: ignore[arg-type]
        self.arm(self.seconds, self.on_tick)

    def on_item(self, item: T) -> None:
        self.latest = item


def sample_time(seconds: float, *, scheduler: Scheduler | None = None) -> Operator[T, T]:
    """Every ``seconds``, emit the latest item if one arrived since the last tick.

    Ticks start when iteration starts.  When the source ends, an item not yet
    sampled is dropped and the iterator ends at once, as in RxJS.

    Period of 4 frames::

        -a-b---c-----d---e-|
        [sample_time(4)]
        ----b---c-------d--|
    """
    if seconds <= 0:
        raise ValueError("sample_time needs a positive period")

    return _machine_operator("monkestream.sample_time", lambda clock: _SampleTime(clock, seconds), scheduler)


# -- group_by ------------------------------------------------------------------------


class GroupedStream(Generic[K, T]):
    """The items of one ``group_by`` key, as an async iterator; iterate it once.

    ``aclose()`` discards the group: its queued items are dropped and later
    items with its key are thrown away instead of stalling the source.
    """

    __slots__ = ("key", "_channel")

    def __init__(self, key: K, channel: _Channel[T]) -> None:
        self.key = key
        self._channel = channel

    def __aiter__(self) -> GroupedStream[K, T]:
        return self

    async def __anext__(self) -> T:
        item = await self._channel.get()
        if item is _Signal.END:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        self._channel.discard()

    def __repr__(self) -> str:
        return f"<GroupedStream key={self.key!r} queued={len(self._channel)}>"


def group_by(
    key_fn: Callable[[T], K],
    *,
    max_groups: int | None = None,
    max_buffered: int | None = GROUP_BUFFER_ITEMS,
) -> Operator[T, GroupedStream[K, T]]:
    """Split the source into one ``GroupedStream`` per ``key_fn(item)``.

    A new group is emitted on the outer iterator with its first item already
    queued.  One pump task reads the source for as long as the outer iterator
    is open, so the outer iterator and its groups may be consumed in any tasks
    and in any order.

    Each group queues at most ``max_buffered`` items (None: no bound).  When a
    group's queue is full the pump waits, so a group nobody consumes stalls
    the whole source once full; ``aclose()`` on a group you do not want.  With
    ``max_groups``, a new key beyond the bound ends the group that has gone
    longest without an item (it still delivers what it has queued); a later
    item with that key opens a new group.  New groups wait for the outer
    consumer in a queue of ``max_groups`` (None: ``GROUP_BUFFER_ITEMS``); the
    pump waits while it is full.

    When the source ends, every group ends after its queued items and then
    the outer iterator ends.  A source error (or one from ``key_fn``) is raised
    by every group and by the outer iterator, each after its queued items.
    Closing the outer iterator closes the source and ends every group.

    Keys X and Y, then ``throttle_time(4, trailing=True)`` in each group;
    a=(X, 1), b=(Y, 1), c=(X, 2), d=(X, 3), e=(Y, 2)::

        -abcd-----e---|
        [group_by(key)]
        X: -a---d--------|
        Y: --b-------e---|
    """
    if max_groups is not None and max_groups < 1:
        raise ValueError("max_groups must be at least 1")
    if max_buffered is not None and max_buffered < 1:
        raise ValueError("max_buffered must be at least 1")

    async def _group_by(source: AsyncIterable[T]) -> AsyncIterator[GroupedStream[K, T]]:
        it = aiter(source)
        groups: OrderedDict[K, GroupedStream[K, T]] = OrderedDict()
        # new groups wait for the outer consumer in a bounded queue too (Rule 4)
        outer: _Channel[GroupedStream[K, T]] = _Channel(max_groups if max_groups is not None else GROUP_BUFFER_ITEMS)

        async def route() -> None:
            try:
                async for item in it:
                    key = key_fn(item)
                    group = groups.get(key)
                    if group is None:
                        if max_groups is not None and len(groups) >= max_groups:
                            _, evicted = groups.popitem(last=False)
                            evicted._channel.finish()
                        group = groups[key] = GroupedStream(key, _Channel(max_buffered))
                        group._channel.push(item)
                        await outer.put(group)
                        continue
                    if max_groups is not None:
                        groups.move_to_end(key)
                    # A discarded group refuses the item: it is dropped.
                    await group._channel.put(item)
            except Exception as exc:
                for group in groups.values():
                    group._channel.finish(exc)
                outer.finish(exc)
            else:
                for group in groups.values():
                    group._channel.finish()
                outer.finish()
            finally:
                await _aclose(it)

        task = asyncio.get_running_loop().create_task(route(), name="monkestream.group_by")
        try:
            while (group := await outer.get()) is not _Signal.END:
                yield group  # type: ignore[misc]
        finally:
            await _cancel_and_wait([task])
            for group in groups.values():
                group._channel.finish()
            groups.clear()

    return _group_by
