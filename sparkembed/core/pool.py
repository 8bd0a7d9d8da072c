"""A pool of deployments of one model: which one takes the next request, and which are out.

Each deployment (a :class:`Route`) has its own :class:`~sparkembed.core.ratelimit.RateLimiter`,
sized to its quota times this worker's share, and its own :class:`Breaker`. A request goes
to the deployment whose limiter is least booked relative to its quota (:func:`choose`), so
traffic follows the quota each one has left: twice the quota, twice the tokens; a deployment
paused by a 429, or whose service reports less room, gets less.

A breaker takes a failing deployment out, and lets one request probe it after a cooldown::

    breaker = Breaker(cooldown_s=10.0)
    breaker.failed("strike"); breaker.failed("strike"); breaker.failed("strike")
    breaker.state           # "open": its requests go to the others
    # ... 10 s later
    breaker.admit()         # True: the one probe; the others wait for its answer
    breaker.succeeded()     # "closed" again (a failed probe doubles the cooldown)

Pure: no I/O, an injectable clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sparkembed.config import EmbedConfig
from sparkembed.core.ratelimit import RateLimiter
from sparkembed.core.types import Backend
from sparkembed.errors import ConfigError, ServiceError, SparkEmbedError, TransportError

STRIKES_TO_OPEN = 3
"""Consecutive 5xx answers, timeouts or dropped connections that take a deployment out."""
COOLDOWN_S = 10.0
"""Seconds a deployment stays out before one request probes it ..."""
MAX_COOLDOWN_S = 300.0
"""... doubled after each failed probe, up to this."""
PROBE_WAIT_S = 1.0
"""How long to wait for a probe's answer before looking again, when every deployment is out."""
SAME_VECTOR_COSINE = 0.9999
"""Deployments of a pool must answer the preflight's text with vectors at least this close."""

Verdict = Literal["out", "strike", "alive"]
"""What a failed attempt says of its deployment: ``out`` at once (refused connection, 401/403/404,
quota exhausted), one ``strike`` (5xx, 408, timeout, dropped connection) or ``alive`` (it
answered: a 400 or a 429 is about the request or the pace, not the deployment)."""


def verdict(error: ServiceError | TransportError, action: str) -> Verdict:
    """What ``error`` (with the retry policy's ``action`` for it) says of the deployment."""
    if action == "quota_exhausted":
        return "out"
    if isinstance(error, TransportError):
        return "out" if error.unreachable else "strike"
    if error.status in (401, 403, 404):
        return "out"
    if error.status == 408 or error.status >= 500:
        return "strike"
    return "alive"


class Breaker:
    """Closed, open for a cooldown, then half-open for one probe.

    Args:
        strikes_to_open: consecutive strikes that open it.
        cooldown_s: seconds open before the first probe; doubled after each failed probe.
        max_cooldown_s: the longest cooldown.
        clock: monotonic seconds.
    """

    __slots__ = (
        "_strikes_to_open",
        "_base_s",
        "_max_s",
        "_clock",
        "_strikes",
        "_cooldown_s",
        "_until",
        "_probing",
    )

    def __init__(
        self,
        *,
        strikes_to_open: int = STRIKES_TO_OPEN,
        cooldown_s: float = COOLDOWN_S,
        max_cooldown_s: float = MAX_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._strikes_to_open = strikes_to_open
        self._base_s = cooldown_s
        self._max_s = max_cooldown_s
        self._clock = clock
        self._strikes = 0
        self._cooldown_s = cooldown_s
        self._until: float | None = None  # None: closed; else out until then, then half-open
        self._probing = False

    @property
    def state(self) -> Literal["closed", "open", "half-open"]:
        if self._until is None:
            return "closed"
        return "open" if self._clock() < self._until else "half-open"

    def ready_in_s(self) -> float:
        """Seconds until a request may be sent here: 0 when closed, or half-open with no probe out."""
        if self._until is None:
            return 0.0
        if self._probing:
            return PROBE_WAIT_S
        return max(0.0, self._until - self._clock())

    def admit(self) -> bool:
        """Whether a request may go now; in half-open, it becomes the one probe."""
        if self.ready_in_s() > 0:
            return False
        if self._until is not None:
            self._probing = True
        return True

    def release(self) -> None:
        """An admitted request was not sent after all (the run stops, the batch was split)."""
        self._probing = False

    def succeeded(self) -> None:
        """The deployment answered: closed again."""
        self._strikes, self._until, self._probing = 0, None, False
        self._cooldown_s = self._base_s

    def failed(self, verdict: Verdict, hold_s: float | None = None) -> None:
        """A failed attempt; ``hold_s`` keeps an ``out`` deployment out at least that long
        (a quota exhausted until its retry-after)."""
        if verdict == "alive":
            self.succeeded()
            return
        state = self.state
        if state == "open":
            return  # requests sent before it opened: their failures say nothing new
        if state == "half-open":
            if not self._probing:
                return  # sent before it opened, answered after the cooldown: wait for a probe
            self._cooldown_s = min(self._cooldown_s * 2, self._max_s)
            self._open(hold_s)
            return
        self._strikes += 1
        if verdict == "out" or self._strikes >= self._strikes_to_open:
            self._open(hold_s)

    def _open(self, hold_s: float | None) -> None:
        self._until = self._clock() + max(self._cooldown_s, hold_s or 0.0)
        self._probing = False


@dataclass(eq=False)
class Route:
    """One deployment as a worker sees it.

    Attributes:
        name: what the ``deployment`` column calls it.
        backend: its HTTP client.
        limiter: this worker's share of its quota.
        config: a one-URL config for it (URL, model, key, quota): :meth:`EmbedConfig.deployments`.
        breaker: whether it is in or out.
        exhausted: (until, reason) after its quota ran out (one deployment alone: rows fail
            without being sent until then).
        last_failure: the config error that took it out (401/403/404), if that was the cause.
    """

    name: str
    backend: Backend
    limiter: RateLimiter
    config: EmbedConfig
    breaker: Breaker = field(default_factory=Breaker)
    exhausted: tuple[float, str] | None = None
    last_failure: SparkEmbedError | None = None


def choose(routes: Sequence[Route], tokens: int) -> Route | None:
    """The deployment that should send a request of ``tokens`` estimated tokens: of those
    whose breaker lets a request through, the least booked relative to its quota (see
    :meth:`RateLimiter.load`). None when every deployment is out."""
    best, best_load = None, math.inf
    for route in routes:
        if route.breaker.ready_in_s() > 0:
            continue
        load = route.limiter.load(tokens)
        if load < best_load:
            best, best_load = route, load
    return best


def ready_in_s(routes: Sequence[Route]) -> float:
    """Seconds until some deployment may be tried again."""
    return min((route.breaker.ready_in_s() for route in routes), default=0.0)


def check_same_space(answers: Sequence[tuple[str, str | None, np.ndarray]]) -> None:
    """Refuse a pool whose deployments do not serve the same vectors.

    Args:
        answers: (deployment, model it reported, its vector) for the same text, per deployment.

    Raises:
        ConfigError: a deployment reports another model, or answers another vector size, or a
            vector of cosine below :data:`SAME_VECTOR_COSINE` to the first's; it is named.
    """
    if len(answers) < 2:
        return
    first, model, vector = answers[0]
    for name, other_model, other in answers[1:]:
        if other_model != model:
            why = f"serves model {other_model!r}, but {first} serves {model!r}"
        elif other.shape != vector.shape:
            why = f"answers {other.shape[-1]} dimensions, but {first} answers {vector.shape[-1]}"
        else:
            norms = float(np.linalg.norm(other) * np.linalg.norm(vector))
            cosine = float(np.dot(other, vector)) / norms if norms else 0.0
            if cosine >= SAME_VECTOR_COSINE:
                continue
            why = f"answers another vector than {first} for the same text (cosine {cosine:.4f})"
        raise ConfigError(
            f"endpoint.pool: deployment {name} {why}. One table must never mix vector spaces: "
            "pool only deployments of the same model and dimensions"
        )
