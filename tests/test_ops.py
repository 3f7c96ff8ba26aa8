"""Tests for monkestream.ops, on virtual time with marble diagrams.

One frame is ``TICK_S`` seconds; windows are written as ``W * F`` (W frames).
Every test runs under ``marble_test``, which fails it if a task, a timer or a
loop-reported error is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import pytest

from marbles import (
    TICK_S,
    MarbleError,
    Note,
    Recording,
    assert_no_leftovers,
    cold,
    drive,
    marble_test,
    parse,
    render,
    run_marbles,
    start_recording,
)
from monkestream import ops
from monkestream.clock import VirtualScheduler

F = TICK_S


def lists(**values: str) -> dict[str, list[str]]:
    """Map marble names to buffers of single-letter values: x="ab" -> ["a", "b"]."""
    return {name: list(letters) for name, letters in values.items()}


# -- the marble helper itself ----------------------------------------------------


def test_parse_counts_every_character_as_a_frame() -> None:
    assert parse("-a-(bc)-d|") == [
        Note(1, "next", "a"),
        Note(3, "next", "b"),
        Note(3, "next", "c"),
        Note(8, "next", "d"),
        Note(9, "end"),
    ]
    assert parse(" -x- ", {"x": [1]}) == [Note(1, "next", [1])]
    assert render(parse("-a-(bc)-d|")) == "-<'a'>-(<'b'><'c'>)-<'d'>|"
    for bad in ("(a", "a)", "((a))", "-|a"):
        with pytest.raises(ValueError):
            parse(bad)


@marble_test
async def test_cold_records_each_subscription(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b-", scheduler=scheduler)
    rec = await run_marbles(scheduler, src, until=3)
    rec.expect("-a-b")
    assert rec.released == 3
    assert src.subscriptions == [(0, 3)]
    rec = await run_marbles(scheduler, src, until=6)
    rec.expect("-a-b")
    assert src.subscriptions == [(0, 3), (3, 9)]


# -- per-item operators ---------------------------------------------------------


@marble_test
async def test_map_sync_and_async(scheduler: VirtualScheduler) -> None:
    async def tenfold(x: int) -> int:
        await asyncio.sleep(0)
        return x * 10

    for fn in (lambda x: x * 10, tenfold):
        src = cold("-a-b|", scheduler=scheduler, values={"a": 1, "b": 2})
        rec = await run_marbles(scheduler, ops.map(fn), source=src)
        rec.expect("-x-y|", {"x": 10, "y": 20})
        assert src.subscriptions == [(0, 4)]


@marble_test
async def test_map_error_from_fn_closes_source(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b-c|", scheduler=scheduler, values={"a": 1, "b": 0, "c": 2})
    rec = await run_marbles(scheduler, ops.map(lambda x: 1 / x), source=src)
    assert rec.values == [1.0]
    assert isinstance(rec.error, ZeroDivisionError)
    assert rec.notes[-1].frame == 3
    assert src.subscriptions == [(0, 3)]


@marble_test
async def test_filter(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b-c-d|", scheduler=scheduler, values={"a": 1, "b": 2, "c": 3, "d": 4})
    rec = await run_marbles(scheduler, ops.filter(lambda x: x % 2 == 0), source=src)
    rec.expect("---b---d|", {"b": 2, "d": 4})


@marble_test
async def test_scan_emits_each_accumulation_not_the_seed(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b-c|", scheduler=scheduler, values={"a": 1, "b": 2, "c": 3})
    rec = await run_marbles(scheduler, ops.scan(lambda acc, x: acc + x, 10), source=src)
    rec.expect("-x-y-z|", {"x": 11, "y": 13, "z": 16})

    async def add(acc: int, x: int) -> int:
        return acc + x

    src = cold("-a-b|", scheduler=scheduler, values={"a": 1, "b": 2})
    rec = await run_marbles(scheduler, ops.scan(add, 0), source=src)
    rec.expect("-x-y|", {"x": 1, "y": 3})


@marble_test
async def test_take_releases_source_with_last_item(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b-c-d|", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.take(2), source=src)
    rec.expect("-a-(b|)")
    assert src.subscriptions == [(0, 3)]


@marble_test
async def test_take_zero_never_subscribes(scheduler: VirtualScheduler) -> None:
    src = cold("-a|", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.take(0), source=src)
    rec.expect("|")
    assert src.subscriptions == []


@marble_test
async def test_distinct_until_changed(scheduler: VirtualScheduler) -> None:
    src = cold("-a-a-b-b-a|", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.distinct_until_changed(), source=src)
    rec.expect("-a---b---a|")

    values = {"a": ("X", 1), "b": ("X", 2), "c": ("Y", 2)}
    src = cold("-a-b-c|", scheduler=scheduler, values=values)
    rec = await run_marbles(
        scheduler, ops.distinct_until_changed(key=lambda v: v[0]), source=src
    )
    rec.expect("-a---c|", values)


@marble_test
async def test_concat_map_runs_inner_streams_one_after_another(
    scheduler: VirtualScheduler,
) -> None:
    inners = []

    def inner(item: str) -> AsyncIterable[str]:
        values = {"1": item + "1", "2": item + "2"}
        stream = cold("-1-2|", scheduler=scheduler, values=values, origin=0.0)
        inners.append(stream)
        return stream

    src = cold("-a----b|", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.concat_map(inner), source=src)
    rec.expect("--w-x--y-z|", {"w": "a1", "x": "a2", "y": "b1", "z": "b2"})
    assert [s.subscriptions for s in inners] == [[(1, 5)], [(6, 10)]]


@pytest.mark.parametrize(
    "operator",
    [
        ops.map(lambda x: x),
        ops.filter(lambda x: True),
        ops.scan(lambda acc, x: x, None),
        ops.take(5),
        ops.distinct_until_changed(),
        ops.concat_map(lambda x: _once(x)),
    ],
    ids=["map", "filter", "scan", "take", "distinct_until_changed", "concat_map"],
)
def test_source_error_passes_through(operator: ops.Operator[Any, Any]) -> None:
    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        src = cold("-a-b#", scheduler=scheduler)
        rec = await run_marbles(scheduler, operator, source=src)
        rec.expect("-a-b#")
        assert isinstance(rec.error, MarbleError)
        assert src.subscriptions == [(0, 4)]

    run()


async def _once(value: Any) -> AsyncIterator[Any]:
    yield value


def test_pipe_composes_left_to_right() -> None:
    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        src = cold("-a-b-c-d|", scheduler=scheduler, values={"a": 1, "b": 2, "c": 3, "d": 4})
        stream = ops.pipe(
            src,
            ops.filter(lambda x: x > 1),
            ops.map(lambda x: x * 2),
            ops.take(2),
        )
        rec = await run_marbles(scheduler, stream)
        rec.expect("---x-(y|)", {"x": 4, "y": 6})

    run()
    assert ops.pipe([1]) == [1]  # type: ignore[arg-type]


# -- merge -----------------------------------------------------------------------


@marble_test
async def test_merge_interleaves_and_ends_when_all_end(scheduler: VirtualScheduler) -> None:
    first = cold("-a---b---c|", scheduler=scheduler)
    second = cold("---x---y-----z|", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.merge(first, second))
    rec.expect("-a-x-b-y-c---z|")
    assert first.subscriptions == [(0, 10)]
    assert second.subscriptions == [(0, 14)]


@marble_test
async def test_merge_error_in_one_source_cancels_the_others(
    scheduler: VirtualScheduler,
) -> None:
    first = cold("-a---b---c|", scheduler=scheduler)
    second = cold("---x#", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.merge(first, second))
    rec.expect("-a-x#")
    assert first.subscriptions == [(0, 4)]
    assert second.subscriptions == [(0, 4)]


@marble_test
async def test_merge_of_nothing_ends_at_once(scheduler: VirtualScheduler) -> None:
    rec = await run_marbles(scheduler, ops.merge())
    rec.expect("|")


@marble_test
async def test_ops_rule_4_merge_queue_is_bounded_by_the_number_of_sources(
    scheduler: VirtualScheduler,
) -> None:
    """A full queue, one item in each pump's hand, one taken: no more is pulled."""
    pulled = {"a": 0, "b": 0}

    async def endless(name: str) -> AsyncIterator[str]:
        while True:
            pulled[name] += 1
            yield name

    merged = ops.merge(endless("a"), endless("b"))
    assert await anext(merged) in {"a", "b"}
    await scheduler.advance(0)
    bound = ops.MERGE_QUEUE_ITEMS + 2 + 1
    assert sum(pulled.values()) == bound
    await scheduler.advance(1.0)
    assert sum(pulled.values()) == bound
    await merged.aclose()


# -- buffer_time -------------------------------------------------------------------

BUFFER_SOURCE = "-a-b-c---d-------e-|"
BUFFER_OUTPUT = "----x---y---z---w--(v|)"
BUFFER_VALUES = lists(x="ab", y="c", z="d", w="", v="e")


@marble_test
async def test_buffer_time_docstring_diagram(scheduler: VirtualScheduler) -> None:
    """Empty window (w), partial buffer emitted when the source ends (v)."""
    src = cold(BUFFER_SOURCE, scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.buffer_time(4 * F, scheduler=scheduler), source=src)
    rec.expect(BUFFER_OUTPUT, BUFFER_VALUES)
    assert src.subscriptions == [(0, 19)]


@marble_test
async def test_buffer_time_can_skip_empty_windows(scheduler: VirtualScheduler) -> None:
    src = cold(BUFFER_SOURCE, scheduler=scheduler)
    operator = ops.buffer_time(4 * F, emit_empty=False, scheduler=scheduler)
    rec = await run_marbles(scheduler, operator, source=src)
    rec.expect("----x---y---z------(v|)", BUFFER_VALUES)


@marble_test
async def test_buffer_time_max_size_emits_early_and_restarts_window(
    scheduler: VirtualScheduler,
) -> None:
    src = cold("-abc----d|", scheduler=scheduler)
    operator = ops.buffer_time(4 * F, max_size=2, scheduler=scheduler)
    rec = await run_marbles(scheduler, operator, source=src)
    rec.expect("--x---y--(z|)", lists(x="ab", y="c", z="d"))


@marble_test
async def test_buffer_time_end_with_empty_buffer_emits_nothing_more(
    scheduler: VirtualScheduler,
) -> None:
    src = cold("-a---|", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.buffer_time(4 * F, scheduler=scheduler), source=src)
    rec.expect("----x|", lists(x="a"))


@marble_test
async def test_ops_rule_5_buffer_time_error_drops_open_buffer(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b-c#", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.buffer_time(4 * F, scheduler=scheduler), source=src)
    rec.expect("----x-#", lists(x="ab"))
    assert src.subscriptions == [(0, 6)]


@marble_test
async def test_ops_rule_4_buffer_time_back_pressure_stops_reading_the_source(
    scheduler: VirtualScheduler,
) -> None:
    """With a full batch untaken, the source is not read and empty windows are not queued."""
    pulled = 0

    async def fast() -> AsyncIterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    batches = ops.buffer_time(4 * F, max_size=3, scheduler=scheduler)(fast())
    first = asyncio.ensure_future(anext(batches))
    await scheduler.advance(0)
    assert first.result() == [1, 2, 3]
    await scheduler.advance(0)
    assert pulled == 6  # the next batch is full and waits for the consumer
    await scheduler.advance(40 * F)
    assert pulled == 6
    assert await anext(batches) == [4, 5, 6]
    await batches.aclose()


def test_buffer_time_validates_arguments() -> None:
    with pytest.raises(ValueError):
        ops.buffer_time(0)
    with pytest.raises(ValueError):
        ops.buffer_time(1.0, max_size=0)


# -- throttle_time ----------------------------------------------------------------

THROTTLE_LEADING = ("-a-bc----d-e---f--|", "-a-------d-----f--|")
THROTTLE_BOTH = ("-a-bc-----d-e-------f|", "-a---c----d---e-----f|")


@marble_test
async def test_throttle_time_leading_only(scheduler: VirtualScheduler) -> None:
    source, output = THROTTLE_LEADING
    src = cold(source, scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.throttle_time(4 * F, scheduler=scheduler), source=src)
    rec.expect(output)
    assert src.subscriptions == [(0, 18)]


@marble_test
async def test_throttle_time_leading_and_trailing(scheduler: VirtualScheduler) -> None:
    source, output = THROTTLE_BOTH
    src = cold(source, scheduler=scheduler)
    operator = ops.throttle_time(4 * F, trailing=True, scheduler=scheduler)
    rec = await run_marbles(scheduler, operator, source=src)
    rec.expect(output)


@marble_test
async def test_throttle_time_end_waits_for_pending_trailing_value(
    scheduler: VirtualScheduler,
) -> None:
    src = cold("-a-b|", scheduler=scheduler)
    operator = ops.throttle_time(4 * F, trailing=True, scheduler=scheduler)
    rec = await run_marbles(scheduler, operator, source=src)
    rec.expect("-a---(b|)")
    assert src.subscriptions == [(0, 4)]


@marble_test
async def test_throttle_time_trailing_only(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b------c|", scheduler=scheduler)
    operator = ops.throttle_time(4 * F, leading=False, trailing=True, scheduler=scheduler)
    rec = await run_marbles(scheduler, operator, source=src)
    rec.expect("-----b--------(c|)")


@pytest.mark.parametrize("trailing", [False, True])
def test_ops_rule_5_throttle_time_error_drops_trailing_value(trailing: bool) -> None:
    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        src = cold("-a-b#", scheduler=scheduler)
        operator = ops.throttle_time(4 * F, trailing=trailing, scheduler=scheduler)
        rec = await run_marbles(scheduler, operator, source=src)
        rec.expect("-a--#")
        assert src.subscriptions == [(0, 4)]

    run()


def test_throttle_time_validates_arguments() -> None:
    with pytest.raises(ValueError):
        ops.throttle_time(0)
    with pytest.raises(ValueError):
        ops.throttle_time(1.0, leading=False, trailing=False)


# -- debounce_time and sample_time ----------------------------------------------

DEBOUNCE = ("-a-bc----d---e-f-|", "-------c----d----(f|)")
SAMPLE = ("-a-b---c-----d---e-|", "----b---c-------d--|")


@marble_test
async def test_debounce_time(scheduler: VirtualScheduler) -> None:
    source, output = DEBOUNCE
    src = cold(source, scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.debounce_time(3 * F, scheduler=scheduler), source=src)
    rec.expect(output)


@marble_test
async def test_ops_rule_5_debounce_time_error_drops_candidate(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b#", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.debounce_time(3 * F, scheduler=scheduler), source=src)
    rec.expect("----#")


@marble_test
async def test_sample_time(scheduler: VirtualScheduler) -> None:
    source, output = SAMPLE
    src = cold(source, scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.sample_time(4 * F, scheduler=scheduler), source=src)
    rec.expect(output)
    assert src.subscriptions == [(0, 19)]


@marble_test
async def test_sample_time_error(scheduler: VirtualScheduler) -> None:
    src = cold("-a-b-#", scheduler=scheduler)
    rec = await run_marbles(scheduler, ops.sample_time(4 * F, scheduler=scheduler), source=src)
    rec.expect("----b#")


def test_debounce_and_sample_validate_arguments() -> None:
    with pytest.raises(ValueError):
        ops.debounce_time(0)
    with pytest.raises(ValueError):
        ops.sample_time(-1.0)


@pytest.mark.parametrize(
    ("operator", "diagrams"),
    [
        (ops.buffer_time, (BUFFER_SOURCE, BUFFER_OUTPUT)),
        (ops.throttle_time, THROTTLE_LEADING),
        (ops.throttle_time, THROTTLE_BOTH),
        (ops.debounce_time, DEBOUNCE),
        (ops.sample_time, SAMPLE),
        (ops.merge, ("-a---b---c|", "---x---y-----z|", "-a-x-b-y-c---z|")),
        (ops.take, ("-a-b-c-d|", "-a-(b|)")),
        (ops.group_by, ("-abcd-----e---|", "X: -a---d--------|", "Y: --b-------e---|")),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_docstring_diagrams_are_the_tested_ones(
    operator: Callable[..., Any], diagrams: tuple[str, ...]
) -> None:
    for diagram in diagrams:
        assert diagram in (operator.__doc__ or ""), diagram


# -- group_by ---------------------------------------------------------------------

PRICES = {"a": ("X", 1), "b": ("Y", 1), "c": ("X", 2), "d": ("X", 3), "e": ("Y", 2)}


def symbol(price: tuple[str, int]) -> str:
    return price[0]


async def run_groups(
    scheduler: VirtualScheduler,
    outer: AsyncIterable[ops.GroupedStream[Any, Any]],
    per_group: Callable[[ops.GroupedStream[Any, Any]], AsyncIterable[Any]] = lambda g: g,
) -> tuple[Recording, list[tuple[Any, Recording]]]:
    """Record the outer stream (as group keys) and each group, in its own task."""
    origin = scheduler.now()
    groups: list[tuple[Any, Recording]] = []
    tasks: list[asyncio.Task[None]] = []

    async def keys() -> AsyncIterator[Any]:
        async for group in outer:
            recording, task = start_recording(scheduler, per_group(group), origin=origin)
            groups.append((group.key, recording))
            tasks.append(task)
            yield group.key

    outer_recording, outer_task = start_recording(scheduler, keys(), origin=origin)
    await drive(scheduler, lambda: [outer_task, *tasks])
    return outer_recording, groups


@marble_test
async def test_group_by_then_throttle_per_key(scheduler: VirtualScheduler) -> None:
    """The server's pattern: group_by(symbol), then throttle_time in each group."""
    src = cold("-abcd-----e---|", scheduler=scheduler, values=PRICES)
    outer, groups = await run_groups(
        scheduler,
        ops.group_by(symbol)(src),
        lambda g: ops.throttle_time(4 * F, trailing=True, scheduler=scheduler)(g),
    )
    outer.expect("-XY-----------|")
    assert [key for key, _ in groups] == ["X", "Y"]
    groups[0][1].expect("-a---d--------|", PRICES)
    groups[1][1].expect("--b-------e---|", PRICES)
    assert src.subscriptions == [(0, 14)]


@marble_test
async def test_group_by_error_reaches_every_group_and_the_outer(
    scheduler: VirtualScheduler,
) -> None:
    src = cold("-ab#", scheduler=scheduler, values=PRICES)
    outer, groups = await run_groups(scheduler, ops.group_by(symbol)(src))
    outer.expect("-XY#")
    groups[0][1].expect("-a-#", PRICES)
    groups[1][1].expect("--b#", PRICES)


@marble_test
async def test_group_by_key_fn_error_is_a_source_error(scheduler: VirtualScheduler) -> None:
    src = cold("-ab|", scheduler=scheduler, values={"a": ("X", 1), "b": None})
    outer, groups = await run_groups(scheduler, ops.group_by(symbol)(src))
    assert isinstance(outer.error, TypeError)
    assert isinstance(groups[0][1].error, TypeError)
    assert src.subscriptions == [(0, 2)]


@marble_test
async def test_group_by_max_groups_ends_the_least_recently_active(
    scheduler: VirtualScheduler,
) -> None:
    src = cold("-abc|", scheduler=scheduler, values=PRICES)
    outer, groups = await run_groups(scheduler, ops.group_by(symbol, max_groups=1)(src))
    outer.expect("-XYX|")
    groups[0][1].expect("-a|", PRICES)
    groups[1][1].expect("--b|", PRICES)
    groups[2][1].expect("---c|", PRICES)


@marble_test
async def test_group_by_closed_group_drops_its_items(scheduler: VirtualScheduler) -> None:
    values = {"a": ("X", 1), "b": ("Y", 1), "c": ("X", 2), "d": ("X", 3), "e": ("Y", 2)}

    async def first_only(group: ops.GroupedStream[str, Any]) -> AsyncIterator[Any]:
        async for item in group:
            yield item
            if group.key == "X":
                await group.aclose()
                return

    src = cold("-abcde|", scheduler=scheduler, values=values)
    outer, groups = await run_groups(
        scheduler, ops.group_by(symbol, max_buffered=1)(src), first_only
    )
    outer.expect("-XY---|")
    groups[0][1].expect("-(a|)", values)
    groups[1][1].expect("--b--e|", values)


@marble_test
async def test_ops_rule_4_group_by_unconsumed_group_stalls_the_source(
    scheduler: VirtualScheduler,
) -> None:
    pulled = 0

    async def fast() -> AsyncIterator[tuple[str, int]]:
        nonlocal pulled
        while True:
            pulled += 1
            yield ("X", pulled)

    outer = ops.group_by(symbol, max_buffered=2)(fast())
    group = await anext(outer)
    await scheduler.advance(0)
    assert pulled == 3  # two queued in the group, the third waits to be put
    await scheduler.advance(1.0)
    assert pulled == 3
    assert [await anext(group), await anext(group)] == [("X", 1), ("X", 2)]
    await scheduler.advance(0)
    assert pulled == 5
    await outer.aclose()
    assert [item async for item in group] == [("X", 3), ("X", 4)]


@marble_test
async def test_group_by_groups_consumed_inside_the_outer_loop(
    scheduler: VirtualScheduler,
) -> None:
    """Nested consumption works: the pump, not the outer consumer, reads the source."""
    src = cold("-aca|", scheduler=scheduler, values=PRICES)
    seen: list[Any] = []

    async def nested() -> None:
        async for group in ops.group_by(symbol)(src):
            async for item in group:
                seen.append(item)

    task = asyncio.create_task(nested())
    await drive(scheduler, lambda: [task])
    assert seen == [("X", 1), ("X", 2), ("X", 1)]


@marble_test
async def test_group_by_closing_outer_ends_groups_and_releases_source(
    scheduler: VirtualScheduler,
) -> None:
    src = cold("-ab-c---d-", scheduler=scheduler, values=PRICES)
    outer = ops.group_by(symbol)(src)
    got: list[Any] = []

    async def consume() -> None:
        group = await anext(outer)
        await scheduler.sleep(4 * F)
        await outer.aclose()
        got.extend([item async for item in group])

    task = asyncio.create_task(consume())
    await drive(scheduler, lambda: [task])
    assert got == [PRICES["a"], PRICES["c"]]
    assert src.subscriptions == [(0, 5)]


def test_group_by_validates_arguments() -> None:
    with pytest.raises(ValueError):
        ops.group_by(symbol, max_groups=0)
    with pytest.raises(ValueError):
        ops.group_by(symbol, max_buffered=0)


# -- clean-up: nothing is left running ----------------------------------------------

ENDLESS = "-a-b-c-d-e-f-g-h-i-j-k-l-"


def _operators(scheduler: VirtualScheduler) -> dict[str, Callable[[AsyncIterable[Any]], Any]]:
    return {
        "map": ops.map(str.upper),
        "filter": ops.filter(bool),
        "scan": ops.scan(lambda acc, x: acc + x, ""),
        "take": ops.take(100),
        "distinct_until_changed": ops.distinct_until_changed(),
        "concat_map": ops.concat_map(lambda x: cold("-1-2-3-", scheduler=scheduler)),
        "buffer_time": ops.buffer_time(2 * F, scheduler=scheduler),
        "throttle_leading": ops.throttle_time(3 * F, scheduler=scheduler),
        "throttle_trailing": ops.throttle_time(3 * F, trailing=True, scheduler=scheduler),
        "debounce_time": ops.debounce_time(F / 2, scheduler=scheduler),
        "sample_time": ops.sample_time(2 * F, scheduler=scheduler),
        "group_by": ops.group_by(lambda x: x < "c"),
        "merge": lambda source: ops.merge(source, cold(ENDLESS, scheduler=scheduler)),
    }


OPERATOR_NAMES = list(_operators(VirtualScheduler()))


@pytest.mark.parametrize("stop", ["aclose", "cancel"])
@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_ops_rule_2_stopping_early_closes_the_source_and_leaves_nothing_running(name: str, stop: str) -> None:
    """Take two outputs, then aclose() the iterator or cancel the consumer inside anext()."""

    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        src = cold(ENDLESS, scheduler=scheduler)
        stream = _operators(scheduler)[name](src)
        got: list[Any] = []
        waiting = asyncio.Event()

        async def consume() -> None:
            it = aiter(stream)
            while len(got) < 2:
                got.append(await anext(it))
            if stop == "aclose":
                await it.aclose()
                return
            waiting.set()
            got.append(await anext(it))

        task = asyncio.create_task(consume())
        for _ in range(40):
            if task.done() or waiting.is_set():
                break
            await scheduler.advance(F)
        assert len(got) == 2
        if stop == "cancel":
            assert not task.done()
            task.cancel()
        await asyncio.wait([task])
        assert task.cancelled() == (stop == "cancel")
        assert len(got) == 2
        assert src.subscriptions and all(end is not None for _, end in src.subscriptions)
        assert_no_leftovers(scheduler)

    run()


@marble_test
async def test_cancelling_the_server_pattern_leaves_nothing_running(
    scheduler: VirtualScheduler,
) -> None:
    src = cold("-abcd-e-a-c-", scheduler=scheduler, values=PRICES)
    seen: list[Any] = []
    consumers: list[asyncio.Task[None]] = []

    async def per_symbol(group: ops.GroupedStream[str, Any]) -> None:
        throttled = ops.throttle_time(2 * F, trailing=True, scheduler=scheduler)(group)
        async for price in throttled:
            seen.append(price)

    async def route() -> None:
        async for group in ops.group_by(symbol)(src):
            consumers.append(asyncio.create_task(per_symbol(group)))

    router = asyncio.create_task(route())
    await scheduler.advance(6 * F)
    assert len(consumers) == 2
    router.cancel()
    await asyncio.wait([router])
    await asyncio.wait(consumers)
    assert all(task.exception() is None for task in consumers)
    assert src.subscriptions == [(0, 6)]
    assert seen[:2] == [PRICES["a"], PRICES["b"]]


# -- the module's rules ------------------------------------------------------------------


async def _take_one(scheduler: VirtualScheduler, it: AsyncIterator[Any]) -> Any:
    """The next output of ``it``, moving virtual time a frame at a time until it comes."""
    task = asyncio.ensure_future(anext(it))
    for _ in range(40):
        if task.done():
            break
        await scheduler.advance(F)
    return task.result()


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_ops_rule_1_nothing_runs_before_the_first_anext_and_each_iteration_is_a_fresh_run(name: str) -> None:
    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        src = cold("-a-b-c-d|", scheduler=scheduler)
        operator = _operators(scheduler)[name]
        first, second = aiter(operator(src)), aiter(operator(src))
        await scheduler.advance(10 * F)
        assert src.subscriptions == []
        assert scheduler.pending == 0 and asyncio.all_tasks() == {asyncio.current_task()}
        got_first = await _take_one(scheduler, first)
        assert [end for _, end in src.subscriptions] == [None]
        got_second = await _take_one(scheduler, second)  # started later, from the source's beginning
        (start_1, _), (start_2, _) = src.subscriptions
        assert start_2 > start_1
        assert getattr(got_second, "key", got_second) == getattr(got_first, "key", got_first)
        await first.aclose()
        assert src.subscriptions[0][1] is not None and src.subscriptions[1][1] is None  # the other run goes on
        await second.aclose()

    run()


async def _fed(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """A source that uses no timer: it yields what the test puts in ``queue``."""
    while True:
        yield await queue.get()


async def _inner(item: str) -> AsyncIterator[str]:
    yield item


# operator, the tasks it starts per run (by name), the timers it may hold
RULE_3_OPERATORS: dict[str, tuple[Callable[[VirtualScheduler, list[AsyncIterable[Any]]], Any], list[str], int]] = {
    "map": (lambda s, src: ops.map(str.upper)(src[0]), [], 0),
    "filter": (lambda s, src: ops.filter(bool)(src[0]), [], 0),
    "scan": (lambda s, src: ops.scan(lambda acc, x: acc + x, "")(src[0]), [], 0),
    "take": (lambda s, src: ops.take(100)(src[0]), [], 0),
    "distinct_until_changed": (lambda s, src: ops.distinct_until_changed()(src[0]), [], 0),
    "concat_map": (lambda s, src: ops.concat_map(_inner)(src[0]), [], 0),
    "throttle_leading": (lambda s, src: ops.throttle_time(3 * F, scheduler=s)(src[0]), [], 0),
    "buffer_time": (lambda s, src: ops.buffer_time(2 * F, scheduler=s)(src[0]), ["monkestream.buffer_time"], 1),
    "throttle_trailing": (lambda s, src: ops.throttle_time(3 * F, trailing=True, scheduler=s)(src[0]),
                          ["monkestream.throttle_time"], 1),
    "debounce_time": (lambda s, src: ops.debounce_time(F / 2, scheduler=s)(src[0]), ["monkestream.debounce_time"], 1),
    "sample_time": (lambda s, src: ops.sample_time(2 * F, scheduler=s)(src[0]), ["monkestream.sample_time"], 1),
    "group_by": (lambda s, src: ops.group_by(str.lower)(src[0]), ["monkestream.group_by"], 0),
    "merge": (lambda s, src: ops.merge(*src), ["monkestream.merge[0]", "monkestream.merge[1]"], 0),
}


@pytest.mark.parametrize("name", RULE_3_OPERATORS)
def test_ops_rule_3_one_pump_per_run_at_most_one_timer_and_aclose_leaves_nothing(name: str) -> None:
    """Twelve items, a frame apart: the pumps started are one per source, never one per item."""
    make, pumps, timers = RULE_3_OPERATORS[name]

    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        loop = asyncio.get_running_loop()
        created: list[asyncio.Task[Any]] = []

        def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kwargs)
            created.append(task)
            return task

        most_timers = 0
        call_later = scheduler.call_later

        def counted_call_later(delay: float, callback: Callable[[], object]) -> Any:
            nonlocal most_timers
            timer = call_later(delay, callback)
            most_timers = max(most_timers, scheduler.pending)
            return timer

        scheduler.call_later = counted_call_later  # type: ignore[method-assign]
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue(), asyncio.Queue()]
        it = aiter(make(scheduler, [_fed(q) for q in queues]))
        loop.set_task_factory(counting_factory)
        mine: set[asyncio.Task[Any]] = set()
        waiting = asyncio.ensure_future(anext(it))
        mine.add(waiting)
        outputs = 0
        for letter in "abcdefghijkl":
            for queue in queues:
                queue.put_nowait(letter)
            await scheduler.advance(F)
            if waiting.done():
                outputs += 1
                waiting = asyncio.ensure_future(anext(it))
                mine.add(waiting)
        for _ in range(10):  # more items until an output is taken, then no anext() is in progress
            if waiting.done():
                break
            for queue in queues:
                queue.put_nowait("z")
            await scheduler.advance(F)
        loop.set_task_factory(None)
        assert waiting.done() and outputs > 0
        assert sorted(t.get_name() for t in created if t not in mine) == pumps
        assert most_timers <= timers
        assert len(asyncio.all_tasks()) == 1 + len(pumps)  # the pumps still run between two anext()
        await it.aclose()
        assert asyncio.all_tasks() == {asyncio.current_task()}  # cancelled and awaited inside aclose()
        assert scheduler.pending == 0

    run()


TIME_BASED_DIAGRAMS = {
    "buffer_time": (lambda t, s: ops.buffer_time(4 * t, scheduler=s), BUFFER_SOURCE, BUFFER_OUTPUT, BUFFER_VALUES),
    "throttle_leading": (lambda t, s: ops.throttle_time(4 * t, scheduler=s), *THROTTLE_LEADING, None),
    "throttle_both": (lambda t, s: ops.throttle_time(4 * t, trailing=True, scheduler=s), *THROTTLE_BOTH, None),
    "debounce_time": (lambda t, s: ops.debounce_time(3 * t, scheduler=s), *DEBOUNCE, None),
    "sample_time": (lambda t, s: ops.sample_time(4 * t, scheduler=s), *SAMPLE, None),
}


@pytest.mark.parametrize("name", TIME_BASED_DIAGRAMS)
def test_ops_rule_6_time_comes_only_from_the_scheduler(name: str) -> None:
    """Frames of 1000 virtual seconds play out in a few real milliseconds, exactly as drawn."""
    make, source, output, values = TIME_BASED_DIAGRAMS[name]
    tick = 1000.0

    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        src = cold(source, scheduler=scheduler, tick=tick)
        recording = await run_marbles(scheduler, make(tick, scheduler), source=src, tick=tick)
        recording.expect(output, values)

    run()


async def _first_then_stop(windows: AsyncIterator[Any], closing: bool) -> Any:
    """Stop after the first output: leaving ``aclosing()``, or by a bare ``return`` from the loop."""
    if closing:
        async with contextlib.aclosing(windows):
            async for window in windows:
                return window
    async for window in windows:
        return window


@marble_test
async def test_ops_rule_7_aclosing_releases_the_source_at_once_a_bare_break_leaves_it_to_the_finaliser(
    scheduler: VirtualScheduler,
) -> None:
    closed = cold(ENDLESS, scheduler=scheduler)
    consumer = asyncio.ensure_future(_first_then_stop(ops.buffer_time(2 * F, scheduler=scheduler)(closed), True))
    await drive(scheduler, lambda: [consumer])
    assert consumer.result() == ["a"]
    assert [end is not None for _, end in closed.subscriptions] == [True]
    assert_no_leftovers(scheduler)

    left = cold(ENDLESS, scheduler=scheduler)
    windows = ops.buffer_time(2 * F, scheduler=scheduler)(left)
    consumer = asyncio.ensure_future(_first_then_stop(windows, False))
    await drive(scheduler, lambda: [consumer])
    assert consumer.result() == ["a"]
    await scheduler.advance(4 * F)
    assert [end for _, end in left.subscriptions] == [None]  # the source is still held
    assert len(asyncio.all_tasks()) == 2 and scheduler.pending == 1  # by the pump; and the window timer runs
    del windows  # unreferenced: asyncio's async-generator finaliser schedules its aclose()
    await scheduler.advance(0)
    assert [end is not None for _, end in left.subscriptions] == [True]


def test_ops_rule_4_group_by_stops_reading_while_its_new_groups_are_not_taken() -> None:
    @marble_test
    async def run(scheduler: VirtualScheduler) -> None:
        pulled = 0

        async def distinct() -> AsyncIterator[int]:
            nonlocal pulled
            while pulled < 10_000:
                pulled += 1
                yield pulled
            await asyncio.get_running_loop().create_future()  # nothing more, until closed

        outer = ops.group_by(lambda x: x)(distinct())
        await anext(outer)
        await scheduler.advance(0)
        try:
            # the queue's worth, the group taken, and the one the pump waits to put
            assert pulled == ops.GROUP_BUFFER_ITEMS + 2
        finally:
            await outer.aclose()

    run()
