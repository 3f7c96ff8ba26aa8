"""Per-key token buckets: how the chat limits posting per client address.

Synchronous on purpose (a request handler asks ``allow(key)`` and answers at
once); time comes from an injectable scheduler, so tests run on virtual time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from .clock import AsyncioScheduler, Scheduler

RATE_LIMIT_KEYS = 10_000


class RateLimiter:
    """Token buckets per key: ``burst`` at once, then ``rate`` per second.

    ``allow(key)`` is synchronous and amortised O(1), for use in a request handler.
    At most ``max_keys`` keys are tracked.  A key idle long enough for its
    bucket to refill completely is forgotten (it would start full anyway);
    if the bound is still reached, the least recently seen key is forgotten,
    which errs towards letting that key through.  Only ``scheduler.now()`` is
    used; without a scheduler the running loop's clock is read at each call.
    """

    __slots__ = ("rate", "burst", "max_keys", "_scheduler", "_buckets", "_refill_s")

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = RATE_LIMIT_KEYS,
        scheduler: Scheduler | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = float(rate)
        self.burst = burst
        self.max_keys = max_keys
        self._scheduler: Scheduler = scheduler if scheduler is not None else AsyncioScheduler()
        # key -> [tokens, time of last update], least recently seen first.
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._refill_s = burst / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False if there are not enough."""
        now = self._scheduler.now()
        self._forget_idle(now)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            bucket = buckets[key] = [float(self.burst), now]
        else:
            buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return True
        return False

    def retry_after(self, key: Hashable, cost: float = 1.0) -> float:
        """Return the seconds until ``allow(key, cost)`` would succeed (0.0 if now).

        A ``cost`` above ``burst`` can never succeed: ``inf``.
        """
        if cost > self.burst:
            return float("inf")
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        elapsed = self._scheduler.now() - bucket[1]
        tokens = min(self.burst, bucket[0] + elapsed * self.rate)
        return max(0.0, (cost - tokens) / self.rate)

    def _forget_idle(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            oldest_key, (_, seen) = next(iter(buckets.items()))
            if now - seen < self._refill_s:
                return
            del buckets[oldest_key]
