"""Marble diagrams for testing stream operators on virtual time.

Syntax, as in RxJS marble tests: every character is one frame of ``tick``
seconds; ``-`` is an empty frame; any other character is a value (looked up in
``values``, else the character itself); ``(ab)`` puts ``a`` and ``b`` in the
frame of the ``(`` and the whole group still spans four frames; ``|`` is the
end and ``#`` the error; spaces are ignored and may align diagrams.

``cold(...)`` is a source that starts its diagram when iterated and records
each subscription as ``(first frame, last frame)``; ``run_marbles(...)`` drives
a stream on a ``VirtualScheduler`` and records what came out of it, frame by
frame; ``Recording.expect(diagram)`` compares.  ``start_recording`` and
``drive`` are its two halves, for tests that record several streams at once.  ``marble_test`` runs an
``async def test(scheduler)`` and fails it if a task, timer or loop error is
left behind.

The default tick is a power of two so frame arithmetic is exact in floats.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from monkestream.clock import VirtualScheduler

TICK_S = 0.125
UNTIL_FRAMES = 200


class MarbleError(Exception):
    """The error a ``#`` raises when no other is given."""


ERROR = MarbleError("error")


@dataclass(frozen=True)
class Note:
    """One notification: ``kind`` is "next", "end" or "error" at ``frame``.

    For errors ``value`` is ``(type, args)``, so equal errors compare equal.
    """

    frame: int
    kind: str
    value: Any = None


def _error_value(error: BaseException) -> tuple[type, tuple[Any, ...]]:
    return (type(error), error.args)


def parse(
    diagram: str,
    values: Mapping[str, Any] | None = None,
    error: BaseException = ERROR,
) -> list[Note]:
    """Turn a diagram into its notes, in order."""
    values = values or {}
    notes: list[Note] = []
    frame = 0
    group_frame: int | None = None
    for char in diagram:
        if char == " ":
            continue
        if char == "(":
            if group_frame is not None:
                raise ValueError(f"nested group in {diagram!r}")
            group_frame = frame
        elif char == ")":
            if group_frame is None:
                raise ValueError(f"unbalanced ')' in {diagram!r}")
            group_frame = None
        elif char != "-":
            at = frame if group_frame is None else group_frame
            if notes and notes[-1].kind != "next":
                raise ValueError(f"nothing may follow the end in {diagram!r}")
            if char == "|":
                notes.append(Note(at, "end"))
            elif char == "#":
                notes.append(Note(at, "error", _error_value(error)))
            else:
                notes.append(Note(at, "next", values.get(char, char)))
        frame += 1
    if group_frame is not None:
        raise ValueError(f"unclosed group in {diagram!r}")
    return notes


def render(notes: list[Note], values: Mapping[str, Any] | None = None) -> str:
    """Draw notes back as a diagram (best effort: for failure messages)."""
    names = {repr(value): name for name, value in (values or {}).items()}

    def symbol(note: Note) -> str:
        if note.kind == "end":
            return "|"
        if note.kind == "error":
            return "#"
        return names.get(repr(note.value), f"<{note.value!r}>")

    out: list[str] = []
    position = 0
    index = 0
    while index < len(notes):
        frame = notes[index].frame
        same = [note for note in notes[index:] if note.frame == frame]
        index += len(same)
        out.append("-" * max(0, frame - position))
        position = max(position, frame)
        text = "".join(symbol(note) for note in same)
        if len(same) > 1:
            text = f"({text})"
        out.append(text)
        position += len(same) + 2 if len(same) > 1 else 1
    return "".join(out)


class Cold:
    """A source that plays its diagram from the moment it is iterated.

    ``subscriptions`` lists ``(subscribed, released)`` frames, one pair per
    iteration, counted from ``origin`` (default: the time of creation);
    ``released`` is None while the iteration is still open.
    """

    def __init__(
        self,
        diagram: str,
        *,
        scheduler: VirtualScheduler,
        tick: float = TICK_S,
        values: Mapping[str, Any] | None = None,
        error: BaseException = ERROR,
        origin: float | None = None,
    ) -> None:
        self.diagram = diagram
        self._notes = parse(diagram, values)
        self._error = error
        self._scheduler = scheduler
        self._tick = tick
        self._origin = scheduler.now() if origin is None else origin
        self._spans: list[list[float | None]] = []

    def _frame(self, when: float) -> int:
        return round((when - self._origin) / self._tick)

    @property
    def subscriptions(self) -> list[tuple[int, int | None]]:
        return [
            (self._frame(start), None if end is None else self._frame(end))
            for start, end in self._spans
        ]

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._play()

    async def _play(self) -> AsyncIterator[Any]:
        scheduler = self._scheduler
        start = scheduler.now()
        span: list[float | None] = [start, None]
        self._spans.append(span)
        try:
            for note in self._notes:
                delay = start + note.frame * self._tick - scheduler.now()
                if delay > 0:
                    await scheduler.sleep(delay)
                if note.kind == "next":
                    yield note.value
                elif note.kind == "end":
                    return
                else:
                    raise self._error
            # No end in the diagram: stay open until released.
            await asyncio.get_running_loop().create_future()
        finally:
            span[1] = scheduler.now()


cold = Cold  # the RxJS spelling: cold("-a-b|", scheduler=...)


@dataclass
class Recording:
    """What a stream emitted, by frame, and when its consumer let go."""

    tick: float
    origin: float
    notes: list[Note] = field(default_factory=list)
    events: list[tuple[float, Any]] = field(default_factory=list)
    error: BaseException | None = None
    released: int | None = None

    def frame(self, when: float) -> int:
        return round((when - self.origin) / self.tick)

    def record(self, now: float, kind: str, value: Any = None) -> None:
        if kind == "next":
            self.events.append((now, value))
        elif kind == "error":
            self.error = value
            value = _error_value(value)
        self.notes.append(Note(self.frame(now), kind, value))

    @property
    def values(self) -> list[Any]:
        return [value for _, value in self.events]

    def expect(
        self,
        diagram: str,
        values: Mapping[str, Any] | None = None,
        error: BaseException = ERROR,
    ) -> None:
        """Fail unless the recording matches ``diagram``."""
        expected = parse(diagram, values, error)
        if self.notes != expected:
            raise AssertionError(
                f"\nexpected {diagram}\nactual   {render(self.notes, values)}"
                f"\nexpected notes {expected}\nactual notes   {self.notes}"
            )


def start_recording(
    scheduler: VirtualScheduler,
    stream: AsyncIterable[Any],
    *,
    tick: float = TICK_S,
    origin: float | None = None,
) -> tuple[Recording, asyncio.Task[None]]:
    """Consume ``stream`` in a new task, recording by frame from ``origin``."""
    recording = Recording(tick, scheduler.now() if origin is None else origin)

    async def consume() -> None:
        it = aiter(stream)
        try:
            async for value in it:
                recording.record(scheduler.now(), "next", value)
        except Exception as exc:
            recording.record(scheduler.now(), "error", exc)
        else:
            recording.record(scheduler.now(), "end")
        finally:
            recording.released = recording.frame(scheduler.now())
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()

    task = asyncio.get_running_loop().create_task(consume(), name="marbles.consume")
    return recording, task


async def drive(
    scheduler: VirtualScheduler,
    tasks: Callable[[], list[asyncio.Task[Any]]],
    *,
    tick: float = TICK_S,
    until: int = UNTIL_FRAMES,
) -> None:
    """Jump from timer to timer until every task is done or frame ``until``.

    ``tasks`` is called again after each step, so it may list tasks started
    along the way.  Tasks still running once frame ``until`` has played out
    are cancelled and awaited.
    """
    horizon = scheduler.now() + until * tick
    await scheduler.advance(0)
    while not all(task.done() for task in tasks()):
        when = scheduler.next_time
        if when is None or when > horizon:
            break
        await scheduler.advance_to(max(when, scheduler.now()))
    running = [task for task in tasks() if not task.done()]
    if running:
        await scheduler.advance_to(max(horizon, scheduler.now()))
        for task in running:
            task.cancel()
        await asyncio.wait(running)


async def run_marbles(
    scheduler: VirtualScheduler,
    stream: AsyncIterable[Any] | Callable[[AsyncIterable[Any]], AsyncIterable[Any]],
    *,
    source: AsyncIterable[Any] | None = None,
    tick: float = TICK_S,
    until: int = UNTIL_FRAMES,
) -> Recording:
    """Consume ``stream`` (or ``stream(source)``) on virtual time and record it.

    Time jumps from timer to timer; a consumer still running once frame
    ``until`` has played out is cancelled, like RxPY's ``disposed`` instant.
    """
    if source is not None:
        stream = stream(source)  # type: ignore[operator]
    recording, task = start_recording(scheduler, stream, tick=tick)  # type: ignore[arg-type]
    await drive(scheduler, lambda: [task], tick=tick, until=until)
    return recording


def assert_no_leftovers(scheduler: VirtualScheduler) -> None:
    """Fail if a task other than the caller's, or a timer, is still alive."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    assert not tasks, f"tasks left running: {tasks}"
    assert scheduler.pending == 0, f"timers left pending: {scheduler.pending}"


def marble_test(
    fn: Callable[[VirtualScheduler], Awaitable[None]],
) -> Callable[[], None]:
    """Run ``async def test(scheduler)`` in a fresh loop on a fresh ``VirtualScheduler``.

    Afterwards no task, timer or loop-reported error (an exception nobody
    retrieved, a failed finaliser) may remain.  Asyncio debug mode follows
    the interpreter (``python -X dev`` turns it on).
    """

    def test() -> None:
        loop_errors: list[dict[str, Any]] = []

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(
                lambda _loop, context: loop_errors.append(context)
            )
            scheduler = VirtualScheduler()
            await fn(scheduler)
            await scheduler.advance(0)
            assert_no_leftovers(scheduler)

        asyncio.run(main())
        assert not loop_errors, f"event loop reported: {loop_errors}"

    test.__name__ = fn.__name__
    test.__qualname__ = fn.__qualname__
    test.__doc__ = fn.__doc__
    test.__module__ = fn.__module__
    return test
