"""Azure-like quota for the local endpoint: tokens per minute and requests per 10 seconds.

Azure charges a request against the deployment's quota when it admits it. We model both
limits as token buckets that start full:

- tokens: capacity ``tpm`` tokens, refilled at ``tpm / 60`` tokens per second, so one full
  minute of tokens gets through at start;
- requests: RPM is enforced over 10-second windows, so capacity ``rpm / 6`` requests,
  refilled at ``rpm / 60`` requests per second.

A request larger than a whole bucket would otherwise wait forever; it is admitted when the
bucket is full and drives the level negative, so later requests pay back the debt.

Example::

    quota = Quota(tokens_per_minute=6000, requests_per_minute=60)
    decision = quota.admit(tokens=1200)
    if not decision.admitted:
        wait_s = decision.retry_after_s
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


class TokenBucket:
    """A bucket of ``capacity`` units refilled at ``rate`` units per second on ``clock``."""

    __slots__ = ("_capacity", "_clock", "_level", "_rate", "_updated")

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]) -> None:
        self._capacity = capacity
        self._rate = rate
        self._clock = clock
        self._level = capacity
        self._updated = clock()

    @property
    def level(self) -> float:
        """Units available now (negative while paying back an oversized request)."""
        self._refill()
        return self._level

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` units can be taken; 0 when they can be taken now."""
        needed = min(cost, self._capacity)
        missing = needed - self.level
        return max(0.0, missing / self._rate)

    def take(self, cost: float) -> None:
        """Take ``cost`` units (callers check :meth:`wait_s` first)."""
        self._refill()
        self._level -= cost

    def refill_fully(self) -> None:
        """Make the bucket full again, as at start."""
        self._level = self._capacity
        self._updated = self._clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._level = min(self._capacity, self._level + elapsed * self._rate)
        self._updated = now


@dataclass(frozen=True)
class Admission:
    """The quota's answer to one request.

    Attributes:
        admitted: whether the request was charged and may proceed.
        retry_after_s: seconds until enough quota is available (0 when admitted).
        remaining_tokens: whole tokens left after this request, or None without a TPM limit.
        remaining_requests: whole requests left in the 10 s window, or None without an RPM limit.
    """

    admitted: bool
    retry_after_s: float
    remaining_tokens: int | None
    remaining_requests: int | None


class Quota:
    """Tokens-per-minute and requests-per-minute limits; either may be None (unlimited)."""

    __slots__ = ("_clock", "_requests", "_tokens")

    def __init__(
        self,
        tokens_per_minute: int | None,
        requests_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._tokens = (
            TokenBucket(tokens_per_minute, tokens_per_minute / 60.0, clock) if tokens_per_minute else None
        )
        self._requests = (
            TokenBucket(requests_per_minute / 6.0, requests_per_minute / 60.0, clock)
            if requests_per_minute
            else None
        )

    def admit(self, tokens: int) -> Admission:
        """Charge one request of ``tokens`` tokens if both limits allow it, else charge nothing."""
        wait_s = max(
            self._tokens.wait_s(tokens) if self._tokens else 0.0,
            self._requests.wait_s(1) if self._requests else 0.0,
        )
        if wait_s > 0:
            return Admission(False, wait_s, self._remaining_tokens(), self._remaining_requests())
        if self._tokens:
            self._tokens.take(tokens)
        if self._requests:
            self._requests.take(1)
        return Admission(True, 0.0, self._remaining_tokens(), self._remaining_requests())

    def reset(self) -> None:
        """Refill both buckets, as at server start."""
        for bucket in (self._tokens, self._requests):
            if bucket:
                bucket.refill_fully()

    def _remaining_tokens(self) -> int | None:
        return max(0, int(self._tokens.level)) if self._tokens else None

    def _remaining_requests(self) -> int | None:
        return max(0, int(self._requests.level)) if self._requests else None
