"""Token-bucket rate limiting of one worker's share of a deployment's quota.

The buckets mirror how Azure (and the local endpoint) meter a deployment:

* TPM: capacity = one minute of quota, refilled at quota / 60 per second, so a fresh
  minute's quota may go at once.
* RPM: checked over 10-second windows: capacity = RPM / 6, refilled at RPM / 60 per second.

If every worker paces its share (quota / workers) with buckets of the same shape, the
sum of the workers' buckets never holds more than the service's bucket, and nothing
is throttled. A 429 means that picture broke (estimates off, another client on the
deployment): the limiter then pauses every acquirer, empties its buckets and lowers
its rate (AIMD), and climbs back while requests succeed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

HEADROOM = 0.01
"""Fraction of the share left unused, so small estimate errors don't cost 429s."""
DEFAULT_COOLDOWN_S = 1.0
"""Pause after a 429 that gave no retry-after, in seconds."""
DECREASE = 0.7
"""A 429 multiplies the admitted rate by this (the AIMD multiplicative decrease) ..."""
MIN_RATE_FACTOR = 0.1
"""... never below this fraction of the configured rate."""
HOLDOFF_S = 2.0
"""429s until this long after a cool-down ends answer requests sent before it: the same
congestion event, so they extend the pause but don't decrease the rate again."""
RECOVERY_PER_S = 0.02
"""While requests succeed, the rate factor climbs back by this much per second (from
0.7 to 1 in 15 s: quick after a stray 429, gentle when the quota really is lower)."""
_EPSILON = 1e-9
"""Slack for float round-off when a sleeper wakes on time (seconds; relative for buckets)."""


class TokenBucket:
    """A bucket of ``capacity`` units that refills at ``rate`` units per second.

    It starts full. :meth:`take` may drive the level below zero: a request larger than
    the bucket goes once the bucket is full and leaves a debt that the refill pays off,
    so big requests never deadlock and the long-run rate stays exact::

        bucket = TokenBucket(60_000, 1_000)     # 60k tokens, 1k tokens/s
        bucket.delay_s(1_000)                   # 0.0: full
        bucket.take(60_000)
        bucket.delay_s(1_000)                   # 1.0

    Args:
        capacity: most units held (the burst), > 0.
        rate: refill in units per second, > 0.
        clock: monotonic seconds.
    """

    __slots__ = ("capacity", "rate", "_level", "_updated", "_clock")

    def __init__(self, capacity: float, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity <= 0 or rate <= 0:
            raise ValueError(f"capacity and rate must be > 0, got {capacity} and {rate}")
        self.capacity = capacity
        self.rate = rate
        self._clock = clock
        self._level = float(capacity)
        self._updated = clock()

    @property
    def level(self) -> float:
        """Units available now; negative while paying off a debt."""
        self._refill()
        return self._level

    def delay_s(self, amount: float) -> float:
        """Seconds until ``amount`` units may be taken (until full, if it exceeds capacity)."""
        self._refill()
        missing = min(amount, self.capacity) - self._level
        if missing <= _EPSILON * self.capacity:
            return 0.0
        return missing / self.rate

    def take(self, amount: float) -> None:
        """Remove ``amount`` units, going into debt if needed."""
        self._refill()
        self._level -= amount

    def give(self, amount: float) -> None:
        """Return ``amount`` units (a refund), up to capacity."""
        self._refill()
        self._level = min(self.capacity, self._level + amount)

    def drain(self) -> None:
        """Empty the bucket, keeping any debt."""
        self._refill()
        self._level = min(self._level, 0.0)

    def set_rate(self, rate: float) -> None:
        """Change the refill rate from now on (time so far refills at the old rate)."""
        self._refill()
        self.rate = rate

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now


class RateLimiter:
    """Admit requests within a share of TPM and RPM quota; cool down and adapt on 429s.

    Waiters are served first come, first served: a large request at the head is not
    overtaken by small ones behind it. Only the head sleeps, until the moment its cost
    fits; the rest wait for their turn, so no one polls::

        limiter = RateLimiter(tokens_per_minute=150_000, requests_per_minute=900)
        waited_s = await limiter.acquire(estimated_tokens)
        try:
            response = await send(batch)
        except ServiceError as exc:
            limiter.settle(estimated_tokens, 0)        # a refused request costs nothing
            if exc.status == 429:
                limiter.on_throttle(exc.retry_after_s)
        else:
            limiter.settle(estimated_tokens, response.usage.prompt_tokens)
            limiter.on_success()

    Args:
        tokens_per_minute: this worker's share of the TPM quota; None for no token limit.
        requests_per_minute: this worker's share of the RPM quota; None for no request limit.
        clock: monotonic seconds; must tick with the event loop's ``time()``.
        headroom: fraction of the share left unused.
    """

    __slots__ = (
        "_tokens",
        "_requests",
        "_base_rates",
        "_clock",
        "_queue",
        "_kick",
        "_paused_until",
        "_holdoff_until",
        "_recovered_at",
        "_factor",
        "_waited_s",
    )

    def __init__(
        self,
        tokens_per_minute: float | None,
        requests_per_minute: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        headroom: float = HEADROOM,
    ) -> None:
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        keep = 1 - headroom
        self._tokens: TokenBucket | None = None
        self._requests: TokenBucket | None = None
        if tokens_per_minute is not None:
            self._tokens = TokenBucket(tokens_per_minute * keep, tokens_per_minute * keep / 60, clock=clock)
        if requests_per_minute is not None:
            self._requests = TokenBucket(
                requests_per_minute * keep / 6, requests_per_minute * keep / 60, clock=clock
            )
        self._base_rates = [(b, b.rate) for b in (self._tokens, self._requests) if b is not None]
        self._clock = clock
        self._queue: deque[asyncio.Future[None]] = deque()
        self._kick: asyncio.Future[None] | None = None
        self._paused_until = self._holdoff_until = self._recovered_at = clock()
        self._factor = 1.0
        self._waited_s = 0.0

    @property
    def waited_s(self) -> float:
        """Total seconds callers spent waiting in :meth:`acquire`."""
        return self._waited_s

    @property
    def rate_factor(self) -> float:
        """Current AIMD multiplier of the configured rates, in (0, 1]."""
        return self._factor

    async def acquire(self, tokens: int) -> float:
        """Wait until a request of ``tokens`` estimated tokens may be sent; take its cost.

        Returns:
            Seconds waited.
        """
        start = self._clock()
        if not self._queue and self._delay_s(tokens) == 0:
            self._take(tokens)
            return 0.0
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            if self._queue[0] is not turn:
                await turn
            while (delay := self._delay_s(tokens)) > 0:
                await self._nap(delay)
            self._take(tokens)
        finally:
            self._queue.remove(turn)
            if self._queue and not self._queue[0].done():
                self._queue[0].set_result(None)
        waited = self._clock() - start
        self._waited_s += waited
        return waited

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token bucket once the service reported the real usage.

        During a cool-down refunds are dropped: the service's bucket is empty, so ours
        stays empty too, whichever of ``settle`` and :meth:`on_throttle` comes first.

        Args:
            estimated_tokens: what :meth:`acquire` was charged.
            actual_tokens: what the service billed (0 for a refused request).
        """
        if self._tokens is None or actual_tokens == estimated_tokens:
            return
        if actual_tokens < estimated_tokens:
            if self._clock() < self._paused_until:
                return
            self._tokens.give(estimated_tokens - actual_tokens)
            self._wake_sleeper()
        else:
            self._tokens.take(actual_tokens - estimated_tokens)

    def on_throttle(self, retry_after_s: float | None) -> None:
        """A 429 arrived: pause every acquirer, empty the buckets, lower the rate.

        Args:
            retry_after_s: seconds the service asked to wait; None pauses
                :data:`DEFAULT_COOLDOWN_S`.
        """
        now = self._clock()
        # 429s that arrive while paused or soon after answer requests sent before the
        # pause: one congestion event, so they extend the pause but cut the rate only once.
        same_event = now < self._paused_until or now < self._holdoff_until
        pause = DEFAULT_COOLDOWN_S if retry_after_s is None else max(0.0, retry_after_s)
        self._paused_until = max(self._paused_until, now + pause)
        # The service's bucket is empty: assume ours are too, or we'd burst into it again.
        for bucket, _ in self._base_rates:
            bucket.drain()
        if not same_event:
            self._set_factor(max(MIN_RATE_FACTOR, self._factor * DECREASE))
            self._holdoff_until = self._paused_until + HOLDOFF_S
        self._recovered_at = max(self._recovered_at, self._paused_until, self._holdoff_until)

    def on_success(self) -> None:
        """A request succeeded: raise the rate back toward the configured one.

        The climb is additive in time (:data:`RECOVERY_PER_S`), so recovery takes as
        long whether requests are small and many or large and few.
        """
        now = self._clock()
        if self._factor >= 1.0 or now <= self._recovered_at:
            return
        self._set_factor(min(1.0, self._factor + RECOVERY_PER_S * (now - self._recovered_at)))
        self._recovered_at = now
        self._wake_sleeper()

    def _delay_s(self, tokens: int) -> float:
        delay = self._paused_until - self._clock()
        if self._tokens is not None:
            delay = max(delay, self._tokens.delay_s(tokens))
        if self._requests is not None:
            delay = max(delay, self._requests.delay_s(1))
        return delay if delay > _EPSILON else 0.0

    def _take(self, tokens: int) -> None:
        if self._tokens is not None:
            self._tokens.take(tokens)
        if self._requests is not None:
            self._requests.take(1)

    def _set_factor(self, factor: float) -> None:
        self._factor = factor
        for bucket, rate in self._base_rates:
            bucket.set_rate(rate * factor)

    async def _nap(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if :meth:`_wake_sleeper` is called."""
        loop = asyncio.get_running_loop()
        self._kick = kick = loop.create_future()
        timer = loop.call_later(delay, _resolve, kick)
        try:
            await kick
        finally:
            timer.cancel()
            self._kick = None

    def _wake_sleeper(self) -> None:
        """Capacity came back early: let the head waiter recompute its delay."""
        if self._kick is not None:
            _resolve(self._kick)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
