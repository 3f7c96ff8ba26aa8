"""Schedulers: where operators and timers get the time from.

Theory of operation
-------------------
Everything in monkestream that waits or reads the clock does it through a
``Scheduler``, so the same code runs on the event loop in production and on
virtual time in tests.

Rule 1: library code never calls ``asyncio.sleep`` or ``loop.time()``; it takes
        ``scheduler: Scheduler | None`` and falls back to ``default_scheduler()``.
Rule 2: ``now()`` is in seconds and never goes backwards.
Rule 3: ``call_later`` returns a ``Handle``; ``cancel()`` is idempotent and a
        no-op once the callback has run.
Rule 4: ``VirtualScheduler`` time moves only inside ``advance()``,
        ``advance_to()`` and ``run_until_idle()``.  Due callbacks run in time
        order, ties in the order they were scheduled, with ``now()`` set to each
        callback's own time.
Rule 5: before each callback and before returning, ``advance()`` lets the event
        loop run until it is quiet: woken coroutines reach their next await, so
        a test observes every consequence of instant *t* before instant *t'*.
Rule 6: ``VirtualScheduler.pending`` counts timers neither run nor cancelled;
        a cancelled ``sleep()`` cancels its timer, so a clean shutdown leaves 0.
Rule 7: ``within(scheduler, seconds, awaitable)`` is the one timeout: it
        cancels the awaitable and raises ``TimeoutError`` when the scheduler's
        clock passes the deadline, and leaves no timer behind.

"Quiet" (rule 5) is judged without private loop internals: the loop is given
``sleep(0)`` passes until ``SETTLE_QUIET_PASSES`` in a row have neither added,
cancelled nor run a timer, with ``SETTLE_MAX_PASSES`` as a hard stop.  Each
pass lets every ready coroutine take one step, so any hand-off chain shorter
than the quiet count completes; the operators in ``ops`` need at most four.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

__all__ = [
    "AsyncioScheduler",
    "Handle",
    "Scheduler",
    "VirtualScheduler",
    "VirtualTimer",
    "default_scheduler",
    "within",
]

T = TypeVar("T")

SETTLE_QUIET_PASSES = 16
SETTLE_MAX_PASSES = 100_000
# Timers due within this much of the target run in the same advance(), so
# float noise such as 0.1 + 0.2 > 0.3 does not push a callback to the next step.
TIME_EPSILON_S = 1e-9
IDLE_LIMIT_S = 3600.0


class Handle(Protocol):
    """A scheduled callback that can still be called off."""

    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """A monotonic clock plus timers, in seconds."""

    def now(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Handle: ...

    def call_soon(self, callback: Callable[[], object]) -> Handle: ...

    async def sleep(self, delay: float) -> None: ...


class AsyncioScheduler:
    """Scheduler on an asyncio event loop: ``loop.time()``, ``loop.call_later``.

    Without a ``loop`` every call uses the loop running at the time, so one
    instance may be created before the loop starts.
    """

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop if self._loop is not None else asyncio.get_running_loop()

    def now(self) -> float:
        return self._get_loop().time()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Handle:
        return self._get_loop().call_later(delay, callback)

    def call_soon(self, callback: Callable[[], object]) -> Handle:
        return self._get_loop().call_soon(callback)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(delay)

    def __repr__(self) -> str:
        return f"AsyncioScheduler(loop={self._loop!r})"


async def within(scheduler: Scheduler, seconds: float, awaitable: Awaitable[T]) -> T:
    """What ``awaitable`` gives, or ``TimeoutError`` once ``seconds`` have passed on ``scheduler``'s clock."""
    task = asyncio.ensure_future(awaitable)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()
    timer = scheduler.call_later(seconds, expire)
    try:
        return await task
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError(f"not done within {seconds:g} s") from None
        raise
    finally:
        timer.cancel()


def default_scheduler() -> Scheduler:
    """Return an ``AsyncioScheduler`` bound to the running loop.

    Raises ``RuntimeError`` when no loop is running, like ``get_running_loop``.
    """
    return AsyncioScheduler(asyncio.get_running_loop())


class VirtualTimer:
    """A callback waiting on a ``VirtualScheduler``; its ``Handle``."""

    __slots__ = ("when", "_callback", "_scheduler")

    def __init__(
        self, when: float, callback: Callable[[], object], scheduler: VirtualScheduler
    ) -> None:
        self.when = when
        self._callback: Callable[[], object] | None = callback
        self._scheduler: VirtualScheduler | None = scheduler

    def cancel(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None:
            self._scheduler = self._callback = None
            scheduler._forget()

    def cancelled(self) -> bool:
        """Tell whether the timer was cancelled or has already run."""
        return self._scheduler is None

    def _run(self) -> None:
        callback, scheduler = self._callback, self._scheduler
        if callback is None or scheduler is None:
            return
        self._scheduler = self._callback = None
        scheduler._forget()
        callback()

    def __repr__(self) -> str:
        state = "done" if self._scheduler is None else "pending"
        return f"<VirtualTimer when={self.when!r} {state}>"


class VirtualScheduler:
    """Virtual time for tests and simulations: the clock moves when told to.

    ``advance(seconds)`` and ``advance_to(when)`` run due callbacks in time
    order and let woken coroutines run between them (the module's rules 4 and
    5); ``run_until_idle()`` jumps from timer to timer; ``next_time`` and
    ``pending`` show what is left.
    """

    def __init__(self, start: float = 0.0, *, settle_passes: int = SETTLE_QUIET_PASSES) -> None:
        if settle_passes < 1:
            raise ValueError("settle_passes must be at least 1")
        self._now = float(start)
        self._heap: list[tuple[float, int, VirtualTimer]] = []
        self._seq = itertools.count()
        self._live = 0
        # Bumped on every timer added, cancelled or run: the settle loop's
        # evidence that the loop is still busy with timers.
        self._changes = 0
        self._settle_passes = settle_passes

    def now(self) -> float:
        return self._now

    @property
    def pending(self) -> int:
        """Count the timers that have neither run nor been cancelled."""
        return self._live

    @property
    def next_time(self) -> float | None:
        """Return when the earliest pending timer is due, or None."""
        self._drop_dead()
        return self._heap[0][0] if self._heap else None

    def call_later(self, delay: float, callback: Callable[[], object]) -> VirtualTimer:
        timer = VirtualTimer(self._now + max(delay, 0.0), callback, self)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        self._live += 1
        self._changes += 1
        return timer

    def call_soon(self, callback: Callable[[], object]) -> Handle:
        """Run ``callback`` in the loop's next step: work that is not timed waits for no advance()."""
        return asyncio.get_running_loop().call_soon(callback)

    async def sleep(self, delay: float) -> None:
        """Wait until virtual time reaches ``now() + delay``.

        A delay of zero or less yields to the loop once, like ``asyncio.sleep(0)``.
        """
        if delay <= 0:
            await asyncio.sleep(0)
            return
        waiter = asyncio.get_running_loop().create_future()
        timer = self.call_later(delay, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            timer.cancel()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running every callback due on the way."""
        if seconds < 0:
            raise ValueError("virtual time cannot go backwards")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float) -> None:
        """Move time forward to ``when``, running every callback due on the way."""
        if when < self._now:
            raise ValueError("virtual time cannot go backwards")
        await self._settle()
        while (timer := self._pop_due(when)) is not None:
            self._now = max(self._now, timer.when)
            timer._run()
            await self._settle()
        self._now = max(self._now, when)

    async def run_until_idle(self, limit_s: float = IDLE_LIMIT_S) -> None:
        """Advance from timer to timer until none is pending or ``limit_s`` passed.

        A periodic timer never lets the scheduler go idle; then time stops at
        ``now() + limit_s``.
        """
        horizon = self._now + limit_s
        await self._settle()
        while (when := self.next_time) is not None and when <= horizon + TIME_EPSILON_S:
            await self.advance_to(max(when, self._now))
        if self._live:
            await self.advance_to(horizon)

    def _forget(self) -> None:
        self._live -= 1
        self._changes += 1

    def _drop_dead(self) -> None:
        heap = self._heap
        while heap and heap[0][2].cancelled():
            heapq.heappop(heap)

    def _pop_due(self, when: float) -> VirtualTimer | None:
        self._drop_dead()
        if self._heap and self._heap[0][0] <= when + TIME_EPSILON_S:
            return heapq.heappop(self._heap)[2]
        return None

    async def _settle(self) -> None:
        quiet = 0
        for _ in range(SETTLE_MAX_PASSES):
            before = self._changes
            await asyncio.sleep(0)
            quiet = quiet + 1 if self._changes == before else 0
            if quiet >= self._settle_passes:
                return

    def __repr__(self) -> str:
        return f"<VirtualScheduler now={self._now!r} pending={self._live}>"
