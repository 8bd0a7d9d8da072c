"""Three ways a quota may meter one limit (tokens or requests), one per ``--limiter`` model.

Azure documents its metering only loosely ("added to a running token count that is reset
each minute"; RPM "evaluated over a small period of time, typically 1 or 10 seconds"), so the
local endpoint offers each plausible reading, and a client must be right under all of them:

- :class:`TokenBucket`: holds ``limit`` units, refilled at ``limit / window_s`` per second;
- :class:`SlidingWindow`: at most ``limit`` units admitted in any ``window_s`` seconds;
- :class:`FixedWindow`: at most ``limit`` units between boundaries at multiples of
  ``window_s`` on the clock, where the count resets.

Every meter charges a cost when it is taken (at admission). A cost larger than the whole
limit would otherwise wait forever: it is admitted when the meter is full or the window
empty, and the excess is paid back (bucket debt) or ages out with the window.

``limit`` is a callable, so the limit may wander over time (``--tpm-jitter``)::

    tokens = SlidingWindow(lambda: 240_000, 60.0, time.monotonic)
    if tokens.wait_s(5_000) == 0:
        tokens.take(5_000)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

Limit = Callable[[], float]
"""The limit now, in units per window."""


class Meter(Protocol):
    """One limit, as :class:`sparkembed.server.quota.Quota` uses it."""

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` units may be taken; 0 when they may be taken now."""
        ...

    def take(self, cost: float) -> None:
        """Charge ``cost`` units (callers check :meth:`wait_s` first)."""
        ...

    def remaining(self) -> float:
        """Units that may still be taken now (0 while paying back an oversized cost)."""
        ...

    def reset(self) -> None:
        """Forget every charge, as at start."""
        ...


class TokenBucket:
    """A bucket of ``limit`` units refilled at ``limit / window_s`` units per second; starts full."""

    __slots__ = ("_clock", "_level", "_limit", "_updated", "_window_s")

    def __init__(self, limit: Limit, window_s: float, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._level = limit()
        self._updated = clock()

    def wait_s(self, cost: float) -> float:
        capacity = self._refill()
        missing = min(cost, capacity) - self._level
        return max(0.0, missing / (capacity / self._window_s))

    def take(self, cost: float) -> None:
        self._refill()
        self._level -= cost

    def remaining(self) -> float:
        self._refill()
        return max(0.0, self._level)

    def reset(self) -> None:
        self._level = self._limit()
        self._updated = self._clock()

    def _refill(self) -> float:
        """Add what flowed in since the last call; return the capacity now."""
        now, capacity = self._clock(), self._limit()
        elapsed = max(0.0, now - self._updated)
        self._level = min(capacity, self._level + elapsed * capacity / self._window_s)
        self._updated = now
        return capacity


class SlidingWindow:
    """At most ``limit`` units admitted in the last ``window_s`` seconds."""

    __slots__ = ("_admitted", "_clock", "_limit", "_used", "_window_s")

    def __init__(self, limit: Limit, window_s: float, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._admitted: deque[tuple[float, float]] = deque()  # (when, cost), oldest first
        self._used = 0.0

    def wait_s(self, cost: float) -> float:
        now = self._expire()
        limit = self._limit()
        if not self._admitted or self._used + cost <= limit:
            return 0.0
        # Oldest charges age out first; an oversized cost waits for an empty window.
        must_free = self._used + cost - limit if cost <= limit else self._used
        freed = 0.0
        for when, charged in self._admitted:
            freed += charged
            if freed >= must_free:
                return when + self._window_s - now
        raise AssertionError("unreachable: the whole window frees enough")

    def take(self, cost: float) -> None:
        self._admitted.append((self._expire(), cost))
        self._used += cost

    def remaining(self) -> float:
        self._expire()
        return max(0.0, self._limit() - self._used)

    def reset(self) -> None:
        self._admitted.clear()
        self._used = 0.0

    def _expire(self) -> float:
        """Drop charges older than the window; return now."""
        now = self._clock()
        while self._admitted and self._admitted[0][0] <= now - self._window_s:
            self._used -= self._admitted.popleft()[1]
        if not self._admitted:
            self._used = 0.0  # no float residue once empty
        return now


class FixedWindow:
    """At most ``limit`` units per window; windows start at multiples of ``window_s`` on the clock."""

    __slots__ = ("_clock", "_index", "_limit", "_used", "_window_s")

    def __init__(self, limit: Limit, window_s: float, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._index = math.floor(clock() / window_s)
        self._used = 0.0

    def wait_s(self, cost: float) -> float:
        now = self._roll()
        if self._used == 0 or self._used + cost <= self._limit():
            return 0.0
        return max(0.0, (self._index + 1) * self._window_s - now)

    def take(self, cost: float) -> None:
        self._roll()
        self._used += cost

    def remaining(self) -> float:
        self._roll()
        return max(0.0, self._limit() - self._used)

    def reset(self) -> None:
        self._roll()
        self._used = 0.0

    def _roll(self) -> float:
        """Start a new count when the clock passed a boundary; return now."""
        now = self._clock()
        index = math.floor(now / self._window_s)
        if index != self._index:
            self._index, self._used = index, 0.0
        return now
