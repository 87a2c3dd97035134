"""Rate limits: a token bucket per connection (frames) and per token (HTTP requests)."""

from __future__ import annotations

import time


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. ``take()`` is False when empty."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def seconds_until_token(self) -> float:
        return max(0.0, (1 - self.tokens) / self.rate) if self.rate > 0 else float("inf")


class Buckets:
    """One bucket per key (a user), forgetting idle ones so memory stays bounded."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[object, TokenBucket] = {}

    def take(self, key: object) -> TokenBucket | None:
        """None when allowed; the empty bucket (for Retry-After) when refused."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_full()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return None if bucket.take() else bucket

    def _forget_full(self) -> None:
        # A bucket that has refilled completely holds no state worth keeping.
        now = time.monotonic()
        self._buckets = {k: b for k, b in self._buckets.items()
                         if b.tokens + (now - b.updated) * b.rate < b.burst}
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()


class WindowLimit:
    """At most ``count`` events within any ``window`` seconds. ``take()`` is False when over."""

    __slots__ = ("count", "times", "window")

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self.times: list[float] = []

    def take(self) -> bool:
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < self.window]
        self.times.append(now)
        return len(self.times) <= self.count
