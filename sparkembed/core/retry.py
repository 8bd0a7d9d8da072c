"""Retry classification: what to do after one failed request.

The engine owns all retries (the SDK's are turned off), and asks
:meth:`RetryPolicy.decide` after every failure. The answer reads like a sentence::

    policy = RetryPolicy(config.retry)
    decision = policy.decide(ServiceError(429, None, "slow down", retry_after_s=1.5),
                             attempt=1, elapsed_s=0.2)
    # Decision(action="retry", delay_s=1.5 to 1.65,
    #          reason="429 error: slow down; retry-after 1.5 s")

| error                                   | action                                          |
|-----------------------------------------|-------------------------------------------------|
| 408, 429, 500, 502, 503, 504, transport | retry: retry-after if given, else backoff       |
| 429 asking to wait > ``max_wait_s``     | quota_exhausted                                 |
| 401, 403, 404, 422                      | config_error (raise :func:`config_error_for`)   |
| 400 and any other status or error       | give_up (the engine bisects 400s)               |

Retries stop when the next wait would end past ``total_timeout_s`` since the first
attempt, and, except after a 429, after ``max_attempts`` attempts: a busy quota is not an
error, so only time bounds the wait for it.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

from sparkembed.config import COGNITIVE_SERVICES_SCOPE, RetryConfig
from sparkembed.errors import EndpointConfigError, ServiceError, TransportError

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CONFIG_STATUSES = frozenset({401, 403, 404, 422})
RETRY_AFTER_JITTER = 0.1
"""Jitter added to a service's retry-after: up to this fraction of it ..."""
RETRY_AFTER_JITTER_MAX_S = 1.0
"""... and never more than this many seconds."""
MAX_SERVICE_MESSAGE_CHARS = 500
"""Service messages are quoted up to this length (some echo the input back)."""

Action = Literal["retry", "give_up", "config_error", "quota_exhausted"]


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt.

    Attributes:
        action: ``retry`` after ``delay_s``; ``give_up`` on this request (fail its rows
            or bisect a 400); ``config_error`` (raise :func:`config_error_for`);
            ``quota_exhausted`` (fail the rows or stop, per ``retry.on_quota_exhausted``).
        delay_s: seconds to wait before the next attempt (``retry`` only).
        reason: human readable, e.g. ``429 retry-after 1.5 s``; never holds headers.
    """

    action: Action
    delay_s: float = 0.0
    reason: str = ""


class RetryPolicy:
    """Decide retry, give up, config error or quota exhaustion for one failure.

    Args:
        config: attempts, time limits and backoff (seconds).
        random: returns a float in [0, 1); injectable so tests can pin the jitter.
    """

    __slots__ = ("_config", "_random")

    def __init__(self, config: RetryConfig, random: Callable[[], float] = _random.random) -> None:
        self._config = config
        self._random = random

    def decide(self, error: BaseException, attempt: int, elapsed_s: float) -> Decision:
        """Classify a failure.

        Args:
            error: a :class:`ServiceError` or :class:`TransportError`; anything else gives up.
            attempt: attempts made so far (1 after the first failure).
            elapsed_s: seconds since the first attempt started.
        """
        if isinstance(error, ServiceError):
            label = _label(error)
            if error.status in CONFIG_STATUSES:
                return Decision("config_error", reason=label)
            wait = error.retry_after_s
            if error.status == 429 and wait is not None and wait > self._config.max_wait_s:
                return Decision(
                    "quota_exhausted",
                    reason=f"{label}; retry-after {wait:g} s exceeds "
                    f"retry.max_wait_s={self._config.max_wait_s:g}",
                )
            if error.status not in RETRYABLE_STATUSES:
                return Decision("give_up", reason=label)
        elif isinstance(error, TransportError):
            label, wait = f"transport error: {error}", None
        else:
            return Decision("give_up", reason=f"unexpected {type(error).__name__}: {error}")

        throttled = isinstance(error, ServiceError) and error.status == 429
        if attempt >= self._config.max_attempts and not throttled:
            return Decision("give_up", reason=f"{label}; gave up after {attempt} attempts")
        if wait is not None:
            delay = wait + self._random() * min(RETRY_AFTER_JITTER * wait, RETRY_AFTER_JITTER_MAX_S)
            why = f"{label}; retry-after {wait:g} s"
        else:
            delay = self.backoff_s(attempt)
            why = f"{label}; backoff {delay:.3g} s"
        if elapsed_s + delay > self._config.total_timeout_s:
            return Decision(
                "give_up",
                reason=f"{label}; waiting {delay:.3g} s more would pass "
                f"retry.total_timeout_s={self._config.total_timeout_s:g}",
            )
        return Decision("retry", delay, why)

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        The cap is ``min(backoff_max_s, backoff_initial_s * 2**(attempt-1))``. The wait is
        half the cap plus a random jitter of up to the other half ("equal jitter"), so
        retries spread out yet never exceed ``backoff_max_s``.
        """
        exponent = min(max(attempt - 1, 0), 64)  # 2**64 already passes any sane cap
        cap = min(self._config.backoff_max_s, self._config.backoff_initial_s * 2.0**exponent)
        return cap / 2 + self._random() * cap / 2


def retry_after_s(headers: Mapping[str, str], *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds the service asked us to wait, from response headers, or None.

    ``retry-after-ms`` (and ``x-ms-retry-after-ms``) win over ``retry-after``, which
    may be seconds or an HTTP-date. Names are matched case-insensitively; malformed
    or negative values are ignored.

    Args:
        headers: response headers.
        now: wall clock (seconds since the epoch), for HTTP-dates.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        millis = _non_negative(lowered.get(name))
        if millis is not None:
            return millis / 1000.0
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    seconds = _non_negative(raw)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - now())


def remaining_quota(headers: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(tokens, requests) the service says are left, from ``x-ratelimit-remaining-tokens`` and
    ``x-ratelimit-remaining-requests``; None where absent or malformed."""
    lowered = {name.lower(): value for name, value in headers.items()}
    tokens = _non_negative(lowered.get("x-ratelimit-remaining-tokens"))
    requests = _non_negative(lowered.get("x-ratelimit-remaining-requests"))
    return (None if tokens is None else int(tokens)), (None if requests is None else int(requests))


def _non_negative(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def config_error_for(
    error: ServiceError,
    *,
    model: str | None,
    dimensions: int | None,
    input_type: str | None,
    key_env: str = "AZURE_INFERENCE_CREDENTIAL",
    url: str | None = None,
) -> EndpointConfigError:
    """The error to raise for a 401/403/404/422: the service's words, then the fix.

    Args:
        error: the service's answer.
        model: ``endpoint.model`` as configured (None: the endpoint's default).
        dimensions: ``endpoint.dimensions`` as sent, if any.
        input_type: ``endpoint.input_type`` as sent, if any.
        key_env: the env var holding the API key (``auth.key_env``).
        url: ``endpoint.url``, to tell a retired route from a wrong one.
    """
    if _route_retired(error, url):
        said = _label(error).rstrip(". ")
        return EndpointConfigError(f"{said}. Fix: {RETIRED_ROUTE_FIX}.", status=error.status)
    fix = _fix_for(error, model=model, dimensions=dimensions, input_type=input_type, key_env=key_env)
    said = _label(error).rstrip(". ")
    return EndpointConfigError(f"{said}. Fix: {fix}.", status=error.status)


RETIRED_ROUTE_FIX = (
    "Azure retired the /models inference route (and the azure-ai-inference SDK) on 2026-08-26: "
    "use the OpenAI-compatible v1 route, endpoint.url https://<resource>.openai.azure.com/openai/v1 "
    "with endpoint.model the deployment name. Tables made on the old route keep their rows"
)


def _route_retired(error: ServiceError, url: str | None) -> bool:
    """A 404 on a ``/models`` URL, or any refusal that says the route or API is retired."""
    said = f"{error.code or ''} {error.message}".lower()
    if "retired" in said or "retirement" in said:
        return True
    return error.status == 404 and (url or "").rstrip("/").endswith("/models")


def _fix_for(
    error: ServiceError,
    *,
    model: str | None,
    dimensions: int | None,
    input_type: str | None,
    key_env: str,
) -> str:
    if error.status in (401, 403):
        return (
            f"check the API key in ${key_env} (auth.key_env); with auth.mode: entra, check "
            "that the identity holds the 'Cognitive Services User' role on the resource and "
            f"that auth.scope is {COGNITIVE_SERVICES_SCOPE}"
        )
    if error.status == 404:
        name = f"endpoint.model: {model}" if model else "endpoint.model is unset"
        return (
            "check endpoint.url (the v1 route: https://<resource>.openai.azure.com/openai/v1) "
            f"and the deployment or model name ({name})"
        )
    if error.status == 422:
        return _parameter_fix(error, model=model, dimensions=dimensions, input_type=input_type)
    return "check the endpoint section of the config"


def _parameter_fix(
    error: ServiceError, *, model: str | None, dimensions: int | None, input_type: str | None
) -> str:
    who = f"model {model}" if model else "this model"
    said = f"{error.code or ''} {error.message}".lower()
    fixes = []
    if "dimension" in said:
        fixes.append(f"{who} does not support `dimensions`; remove endpoint.dimensions")
    if "input_type" in said or "input type" in said:
        fixes.append(f"{who} does not support `input_type` {input_type!r}; remove endpoint.input_type")
    if fixes:
        return "; and ".join(fixes)
    params = {"endpoint.dimensions": dimensions, "endpoint.input_type": input_type}
    sent = [name for name, value in params.items() if value is not None]
    if sent:
        return f"{who} refused a parameter; try removing {' or '.join(sent)}"
    return "the endpoint refused a request parameter; check the endpoint section of the config"


def _label(error: ServiceError) -> str:
    message = error.message
    if len(message) > MAX_SERVICE_MESSAGE_CHARS:
        message = message[:MAX_SERVICE_MESSAGE_CHARS] + "…"
    code = error.code if error.code and error.code != str(error.status) else "error"  # not "401 401:"
    return f"{error.status} {code}: {message}"
