"""Azure-like quota for the local endpoint: tokens per minute and requests per 10 seconds.

Azure charges a request against the deployment's quota when it admits it. How it meters is
not documented precisely, so ``--limiter`` picks one of three models (see
:mod:`sparkembed.server.meters`), each applied to both limits:

- ``token-bucket`` (default): tokens in a bucket of ``tpm`` refilled at ``tpm / 60`` per
  second, so one full minute of tokens gets through at start; requests in a bucket of
  ``rpm / 6`` refilled at ``rpm / 60`` per second;
- ``sliding-window``: at most ``tpm`` tokens admitted in any 60 s, and ``rpm / 6`` requests
  in any 10 s;
- ``fixed-window``: the same counts, reset at every multiple of 60 s (10 s) on the clock.

``window_scale`` multiplies the window lengths (and the refill periods), so a test can run
minutes of metering in seconds. ``tpm_jitter`` makes the effective TPM limit wander within
±that fraction, as a shared regional pool does (:class:`Wander`).

A request larger than the whole limit would otherwise wait forever; it is admitted when
the bucket is full or the window empty, and the excess is paid back or ages out.

Example::

    quota = Quota(tokens_per_minute=6000, requests_per_minute=60, limiter="sliding-window")
    decision = quota.admit(tokens=1200)
    if not decision.admitted:
        wait_s = decision.retry_after_s
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sparkembed.server.meters import FixedWindow, Meter, SlidingWindow, TokenBucket

LimiterModel = Literal["token-bucket", "sliding-window", "fixed-window"]
LIMITER_MODELS: tuple[LimiterModel, ...] = ("token-bucket", "sliding-window", "fixed-window")
TOKENS_WINDOW_S = 60.0
"""TPM is counted over this many seconds (times ``window_scale``) ..."""
REQUESTS_WINDOW_S = 10.0
"""... and RPM over this many, at ``rpm / 6`` requests a window."""
WANDER_PERIOD_S = 10.0
"""The jittered limit moves between new random targets this many seconds apart (scaled)."""

_METERS: dict[str, Callable[[Callable[[], float], float, Callable[[], float]], Meter]] = {
    "token-bucket": TokenBucket,
    "sliding-window": SlidingWindow,
    "fixed-window": FixedWindow,
}


class Wander:
    """A factor in ``[1 - spread, 1 + spread]`` that drifts slowly and reproducibly.

    Targets are drawn every ``period_s`` seconds of the clock from ``seed``, and the factor
    moves in a straight line from one to the next, so it never jumps::

        factor = Wander(0.05, 10.0, seed=7, clock=time.monotonic)
        limit = 240_000 * factor()      # within 228,000 .. 252,000
    """

    __slots__ = ("_clock", "_period_s", "_seed", "_spread", "_targets")

    def __init__(self, spread: float, period_s: float, seed: int, clock: Callable[[], float]) -> None:
        self._spread = spread
        self._period_s = period_s
        self._seed = seed
        self._clock = clock
        self._targets: dict[int, float] = {}

    def __call__(self) -> float:
        return self.at(self._clock())

    def at(self, when: float) -> float:
        """The factor at ``when`` on the clock."""
        position = when / self._period_s
        step = math.floor(position)
        along = position - step
        offset = self._target(step) * (1 - along) + self._target(step + 1) * along
        return 1.0 + self._spread * offset

    def _target(self, step: int) -> float:
        """The target at ``step``, in [-1, 1]: the same for a seed whatever the order of calls."""
        target = self._targets.get(step)
        if target is None:
            if len(self._targets) > 64:
                self._targets.clear()
            target = self._targets[step] = random.Random(f"{self._seed}:{step}").uniform(-1.0, 1.0)
        return target


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
    """Tokens-per-minute and requests-per-minute limits; either may be None (unlimited).

    Args:
        tokens_per_minute: TPM quota, or None.
        requests_per_minute: RPM quota (checked per 10 s), or None.
        clock: seconds; fixed windows start at its multiples of the window length.
        limiter: how both limits are metered.
        window_scale: multiplies the 60 s and 10 s windows (e.g. 0.05 for 3 s "minutes").
        tpm_jitter: the TPM limit wanders within ± this fraction (0 keeps it fixed).
        seed: seed of the wander; None draws one.
    """

    __slots__ = ("_report", "_requests", "_tokens")

    def __init__(
        self,
        tokens_per_minute: int | None,
        requests_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        limiter: LimiterModel = "token-bucket",
        window_scale: float = 1.0,
        tpm_jitter: float = 0.0,
        seed: int | None = None,
        report_remaining: bool = True,
    ) -> None:
        meter = _METERS[limiter]
        self._report = report_remaining
        self._tokens: Meter | None = None
        self._requests: Meter | None = None
        if tokens_per_minute:
            tpm = float(tokens_per_minute)
            if tpm_jitter:
                seed = random.randrange(2**32) if seed is None else seed
                wander = Wander(tpm_jitter, WANDER_PERIOD_S * window_scale, seed, clock)
                self._tokens = meter(lambda: tpm * wander(), TOKENS_WINDOW_S * window_scale, clock)
            else:
                self._tokens = meter(lambda: tpm, TOKENS_WINDOW_S * window_scale, clock)
        if requests_per_minute:
            per_window = requests_per_minute * REQUESTS_WINDOW_S / TOKENS_WINDOW_S
            self._requests = meter(lambda: per_window, REQUESTS_WINDOW_S * window_scale, clock)

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
        """Forget every charge, as at server start."""
        for meter in (self._tokens, self._requests):
            if meter:
                meter.reset()

    def _remaining_tokens(self) -> int | None:
        return int(self._tokens.remaining()) if self._tokens and self._report else None

    def _remaining_requests(self) -> int | None:
        return int(self._requests.remaining()) if self._requests and self._report else None
