"""RateLimiter: token buckets per key, on a clock the test controls."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st
from marbles import marble_test

from monkestream import ratelimit as ops
from monkestream.clock import VirtualScheduler


# -- RateLimiter --------------------------------------------------------------------


class ManualClock:
    """Just ``now()``: all a RateLimiter reads."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time


def limiter(rate: float, burst: int, **kwargs: Any) -> tuple[ops.RateLimiter, ManualClock]:
    clock = ManualClock()
    return ops.RateLimiter(rate, burst, scheduler=clock, **kwargs), clock  # type: ignore[arg-type]


def test_rate_limiter_burst_then_refusal() -> None:
    limit, _ = limiter(rate=1.0, burst=3)
    assert [limit.allow("alice") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("bob")


def test_rate_limiter_refills_over_time_up_to_burst() -> None:
    limit, clock = limiter(rate=2.0, burst=2)
    assert limit.allow("k") and limit.allow("k") and not limit.allow("k")
    assert limit.retry_after("k") == pytest.approx(0.5)
    clock.time = 0.5
    assert limit.allow("k")
    assert not limit.allow("k")
    clock.time = 100.0
    assert [limit.allow("k") for _ in range(3)] == [True, True, False]


@marble_test
async def test_rate_limiter_on_virtual_time(scheduler: VirtualScheduler) -> None:
    limit = ops.RateLimiter(rate=1.0, burst=1, scheduler=scheduler)
    assert limit.allow("k") and not limit.allow("k")
    await scheduler.advance(1.0)
    assert limit.allow("k")


def test_rate_limiter_bounds_the_keys_it_tracks() -> None:
    limit, _ = limiter(rate=1.0, burst=1, max_keys=2)
    assert limit.allow("a") and limit.allow("b") and limit.allow("c")
    assert len(limit) == 2
    assert limit.allow("a")  # forgotten as least recently seen: starts full again
    assert not limit.allow("c")


def test_rate_limiter_forgets_idle_keys() -> None:
    limit, clock = limiter(rate=1.0, burst=2)
    limit.allow("a")
    limit.allow("b")
    clock.time = 1.9
    limit.allow("b")
    assert len(limit) == 2
    clock.time = 2.0
    limit.allow("b")
    assert len(limit) == 1
    assert limit.retry_after("a") == 0.0


def test_rate_limiter_costs_and_validation() -> None:
    limit, _ = limiter(rate=1.0, burst=3)
    assert limit.allow("k", cost=3)
    assert not limit.allow("k", cost=1)
    assert limit.retry_after("k", cost=4) == float("inf")
    for rate, burst, max_keys in [(0, 1, 1), (1, 0, 1), (1, 1, 0)]:
        with pytest.raises(ValueError):
            ops.RateLimiter(rate, burst, max_keys=max_keys)


def test_rate_limiter_without_scheduler_reads_the_running_loop() -> None:
    limit = ops.RateLimiter(rate=1.0, burst=1)

    async def main() -> list[bool]:
        return [limit.allow("k"), limit.allow("k")]

    assert asyncio.run(main()) == [True, False]


@settings(max_examples=100, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.floats(0.0, 2.0), st.sampled_from("abc")), min_size=1, max_size=60
    ),
    rate=st.floats(0.5, 5.0),
    burst=st.integers(1, 5),
)
def test_rate_limiter_never_exceeds_burst_plus_refill(
    calls: list[tuple[float, str]], rate: float, burst: int
) -> None:
    limit, clock = limiter(rate=rate, burst=burst)
    allowed = {"a": 0, "b": 0, "c": 0}
    for gap, key in calls:
        clock.time += gap
        allowed[key] += limit.allow(key)
    for count in allowed.values():
        assert count <= burst + rate * clock.time + 1e-9
