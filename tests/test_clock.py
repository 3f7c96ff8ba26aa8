"""Tests for monkestream.clock: virtual time, settling, and the asyncio scheduler."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from marbles import marble_test
from monkestream.clock import (
    AsyncioScheduler,
    Scheduler,
    VirtualScheduler,
    default_scheduler,
)


@marble_test
async def test_clock_rule_4_callbacks_run_in_time_order_with_ties_fifo(scheduler: VirtualScheduler) -> None:
    seen: list[tuple[str, float]] = []

    def note(name: str):
        return lambda: seen.append((name, scheduler.now()))

    scheduler.call_later(3.0, note("c"))
    scheduler.call_later(1.0, note("a1"))
    scheduler.call_later(1.0, note("a2"))
    scheduler.call_later(2.0, note("b"))
    assert scheduler.pending == 4
    await scheduler.advance(2.5)
    assert seen == [("a1", 1.0), ("a2", 1.0), ("b", 2.0)]
    assert scheduler.now() == 2.5
    assert scheduler.pending == 1
    await scheduler.advance(0.5)
    assert seen[-1] == ("c", 3.0)
    assert scheduler.pending == 0


@marble_test
async def test_clock_rule_3_cancel_is_idempotent_and_counts_once(scheduler: VirtualScheduler) -> None:
    ran: list[int] = []
    timer = scheduler.call_later(1.0, lambda: ran.append(1))
    timer.cancel()
    timer.cancel()
    assert scheduler.pending == 0
    await scheduler.advance(2.0)
    assert ran == []
    done = scheduler.call_later(0.5, lambda: ran.append(2))
    await scheduler.advance(1.0)
    done.cancel()
    assert ran == [2]
    assert scheduler.pending == 0


@marble_test
async def test_callback_scheduled_by_callback_runs_in_same_advance(
    scheduler: VirtualScheduler,
) -> None:
    seen: list[float] = []

    def first() -> None:
        seen.append(scheduler.now())
        scheduler.call_later(0.5, lambda: seen.append(scheduler.now()))

    scheduler.call_later(1.0, first)
    await scheduler.advance(2.0)
    assert seen == [1.0, 1.5]


@marble_test
async def test_zero_delay_callback_runs_on_next_advance(scheduler: VirtualScheduler) -> None:
    ran: list[float] = []
    scheduler.call_later(0, lambda: ran.append(scheduler.now()))
    scheduler.call_later(-1, lambda: ran.append(scheduler.now()))
    assert ran == []
    await scheduler.advance(0)
    assert ran == [0.0, 0.0]


@marble_test
async def test_sleep_wakes_at_its_virtual_time(scheduler: VirtualScheduler) -> None:
    woke: list[float] = []

    async def sleeper(delay: float) -> None:
        await scheduler.sleep(delay)
        woke.append(scheduler.now())

    tasks = [asyncio.create_task(sleeper(d)) for d in (2.0, 1.0, 3.0)]
    await scheduler.advance(2.0)
    assert woke == [1.0, 2.0]
    await scheduler.advance(5.0)
    assert woke == [1.0, 2.0, 3.0]
    await asyncio.gather(*tasks)


@marble_test
async def test_clock_rule_6_a_cancelled_sleep_removes_its_timer(scheduler: VirtualScheduler) -> None:
    task = asyncio.create_task(scheduler.sleep(10.0))
    await scheduler.advance(1.0)
    assert scheduler.pending == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scheduler.pending == 0


@marble_test
async def test_sleep_zero_only_yields(scheduler: VirtualScheduler) -> None:
    await scheduler.sleep(0)
    await scheduler.sleep(-1.0)
    assert scheduler.now() == 0.0
    assert scheduler.pending == 0


@marble_test
async def test_clock_rule_5_advance_lets_a_chain_of_tasks_finish_between_timers(
    scheduler: VirtualScheduler,
) -> None:
    """A wake-up handed through several queues lands before the next timer."""
    hops = 6
    queues = [asyncio.Queue[float]() for _ in range(hops + 1)]
    arrived: list[tuple[float, float]] = []

    async def relay(inbox: asyncio.Queue[float], outbox: asyncio.Queue[float]) -> None:
        outbox.put_nowait(await inbox.get())

    async def ticker() -> None:
        for _ in range(2):
            await scheduler.sleep(1.0)
            queues[0].put_nowait(scheduler.now())

    async def sink() -> None:
        for _ in range(2):
            sent = await queues[-1].get()
            arrived.append((sent, scheduler.now()))

    relays = [
        asyncio.create_task(relay(queues[i], queues[i + 1])) for i in range(hops)
    ] + [asyncio.create_task(relay(queues[i], queues[i + 1])) for i in range(hops)]
    tasks = [asyncio.create_task(ticker()), asyncio.create_task(sink()), *relays]
    await scheduler.advance(1.0)
    assert arrived == [(1.0, 1.0)]
    await scheduler.advance(1.0)
    assert arrived == [(1.0, 1.0), (2.0, 2.0)]
    await asyncio.gather(*tasks)


@marble_test
async def test_clock_rule_2_advance_refuses_to_go_backwards(scheduler: VirtualScheduler) -> None:
    await scheduler.advance(1.0)
    with pytest.raises(ValueError):
        await scheduler.advance(-0.5)
    with pytest.raises(ValueError):
        await scheduler.advance_to(0.5)
    assert scheduler.now() == 1.0


@marble_test
async def test_float_noise_does_not_delay_a_timer(scheduler: VirtualScheduler) -> None:
    ran: list[bool] = []
    scheduler.call_later(0.1 + 0.2, lambda: ran.append(True))
    await scheduler.advance(0.3)
    assert ran == [True]


@marble_test
async def test_next_time_and_run_until_idle(scheduler: VirtualScheduler) -> None:
    seen: list[float] = []
    assert scheduler.next_time is None
    scheduler.call_later(5.0, lambda: seen.append(scheduler.now()))
    cancelled = scheduler.call_later(1.0, lambda: seen.append(-1.0))
    cancelled.cancel()
    assert scheduler.next_time == 5.0
    await scheduler.run_until_idle()
    assert seen == [5.0]
    assert scheduler.now() == 5.0


@marble_test
async def test_run_until_idle_stops_at_its_limit(scheduler: VirtualScheduler) -> None:
    ticks: list[float] = []
    timer = None

    def tick() -> None:
        nonlocal timer
        ticks.append(scheduler.now())
        timer = scheduler.call_later(1.0, tick)

    timer = scheduler.call_later(1.0, tick)
    await scheduler.run_until_idle(limit_s=3.5)
    assert ticks == [1.0, 2.0, 3.0]
    assert scheduler.now() == 3.5
    timer.cancel()


@marble_test
async def test_callback_error_surfaces_from_advance(scheduler: VirtualScheduler) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    scheduler.call_later(1.0, boom)
    with pytest.raises(RuntimeError, match="boom"):
        await scheduler.advance(2.0)
    assert scheduler.pending == 0


def test_virtual_scheduler_validates_settle_passes() -> None:
    with pytest.raises(ValueError):
        VirtualScheduler(settle_passes=0)
    assert VirtualScheduler(start=5.0).now() == 5.0


def test_schedulers_satisfy_the_protocol() -> None:
    def takes(scheduler: Scheduler) -> Scheduler:
        return scheduler

    assert takes(VirtualScheduler()) is not None
    assert takes(AsyncioScheduler()) is not None


def test_asyncio_scheduler_uses_the_loop() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for scheduler in (AsyncioScheduler(), AsyncioScheduler(loop), default_scheduler()):
            before = loop.time()
            assert before <= scheduler.now() <= loop.time()
            ran = asyncio.Event()
            scheduler.call_later(0, ran.set)
            await asyncio.wait_for(ran.wait(), 1.0)
            cancelled: list[int] = []
            handle = scheduler.call_later(0, lambda: cancelled.append(1))
            handle.cancel()
            await scheduler.sleep(0)
            await scheduler.sleep(0.001)
            assert cancelled == []

    asyncio.run(main())


def test_default_scheduler_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        default_scheduler()



def _reads_the_loop(node: ast.expr) -> bool:
    """``loop``, ``self._loop``, ``asyncio.get_running_loop()``: an expression naming an event loop."""
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Attribute) and node.func.attr in ("get_running_loop", "get_event_loop")
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "loop" in name.lower()


def _own_waits_and_clock_reads(source: str) -> list[str]:
    """Where ``source`` sleeps, times out or reads the time on asyncio's own clock rather than a scheduler's."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "asyncio":
            found += [f"{node.lineno}: from asyncio import {a.name}" for a in node.names
                      if a.name in ("sleep", "wait_for", "timeout")]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, attr = node.func.value, node.func.attr
        if (isinstance(owner, ast.Name) and owner.id == "asyncio" and attr in ("sleep", "wait_for", "timeout")
                or attr in ("time", "call_later", "call_at") and _reads_the_loop(owner)):
            found.append(f"{node.lineno}: {ast.unparse(node.func)}()")
    return sorted(found, key=lambda where: int(where.partition(":")[0]))


def test_clock_rule_1_library_code_waits_and_reads_the_time_only_through_a_scheduler() -> None:
    sample = ("import asyncio, time\nasync def f(loop, scheduler):\n    loop.time()\n    await asyncio.sleep(1)\n"
              "    asyncio.get_running_loop().call_later(1, f)\n    time.time()\n    scheduler.now()\n")
    assert _own_waits_and_clock_reads(sample) == [
        "3: loop.time()", "4: asyncio.sleep()", "5: asyncio.get_running_loop().call_later()"]
    package = Path(__file__).resolve().parent.parent / "monkestream"
    offenders = {path.relative_to(package).as_posix(): found for path in sorted(package.rglob("*.py"))
                 if path.name != "clock.py"
                 and (found := _own_waits_and_clock_reads(path.read_text(encoding="utf-8")))}
    assert offenders == {}


def test_clock_rule_7_within_is_a_timeout_on_the_schedulers_clock() -> None:
    from monkestream.clock import within

    async def main() -> None:
        scheduler = VirtualScheduler()
        done = asyncio.get_running_loop().create_future()

        async def slow() -> str:
            try:
                await scheduler.sleep(5)
                return "late"
            except asyncio.CancelledError:
                done.set_result("cancelled")
                raise

        quick = asyncio.ensure_future(within(scheduler, 5, scheduler.sleep(1)))
        await scheduler.advance(1)
        assert quick.done() and quick.result() is None and scheduler.pending == 0   # no timer left behind

        late = asyncio.ensure_future(within(scheduler, 2, slow()))
        await scheduler.advance(1.9)
        assert not late.done()
        await scheduler.advance(0.1)
        assert isinstance(late.exception(), TimeoutError) and done.result() == "cancelled"
        assert scheduler.pending == 0

        outer = asyncio.ensure_future(within(scheduler, 2, scheduler.sleep(10)))
        await scheduler.advance(0.5)
        outer.cancel()   # cancelled from outside: not a timeout
        await scheduler.advance(0)
        assert outer.cancelled() and scheduler.pending == 0

    asyncio.run(main())
