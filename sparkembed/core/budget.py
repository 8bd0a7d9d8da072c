"""A run's token cap (``run.max_tokens``, ``run.max_cost_usd``): checked before, kept during.

Before any money is spent, the driver compares the run's estimate (after dedup) with the
cap and refuses the run unless ``run.allow_partial`` is on (:func:`check_estimate`).
During the run, every task attempt keeps a :class:`BudgetGuard`: before each request it
reserves the request's estimated tokens against the cap, counting what every other task
attempt of the wave has billed or reserved (their spend files, :mod:`sparkembed.core.runlog`).
Once the billed tokens reach the cap no task sends again. While requests in flight (any
task's reservations) would take the total past the cap, a request waits for them to be
answered, since estimates exceed bills and the cap may not be reached after all; a
reservation that stays (a killed attempt's file) stops the wait after :data:`WAIT_S`.
A task's own requests in flight count as reserved at once; another task's as soon as its
spend file is rewritten (milliseconds). So only requests checked at the same moment in two
tasks overshoot: about one request per task slot beyond the cap.

    def others() -> tuple[int, int]:
        spend = read_spend(run_dir, wave=3)
        return spend.tokens_billed, spend.tokens_reserved

    guard = BudgetGuard(cap=1_000_000, others=others)
    if guard.take(estimated):          # before sending; None: ask again shortly
        ...                            # send
        guard.settle(estimated, billed)  # the answer's usage (0 if none)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sparkembed.config import EmbedConfig
from sparkembed.errors import BudgetError

WAIT_S = 60.0
"""Longest wait for other requests in flight to be answered before a request counts the cap
as reached (seconds)."""
POLL_S = 0.05
"""How often a waiting request asks again (seconds)."""


def token_cap(config: EmbedConfig) -> int | None:
    """The run's cap in prompt tokens: ``run.max_tokens``, or ``run.max_cost_usd`` at the
    endpoint's price, whichever is lower; None when neither is set (or the price is 0)."""
    caps = []
    if config.run.max_tokens is not None:
        caps.append(config.run.max_tokens)
    price = config.endpoint.price_per_million_tokens
    if config.run.max_cost_usd is not None and price > 0:
        caps.append(int(config.run.max_cost_usd / price * 1_000_000))
    return min(caps) if caps else None


def cost_usd(tokens: int, config: EmbedConfig) -> float:
    """``tokens`` at ``endpoint.price_per_million_tokens``."""
    return round(tokens * config.endpoint.price_per_million_tokens / 1e6, 6)


def check_estimate(estimated_tokens: int, config: EmbedConfig) -> bool:
    """Whether the run fits its cap; refuse it, before any request, when it does not.

    Returns:
        True when the estimate is within the cap (or there is none); False when it is over
        and ``run.allow_partial`` lets the run start anyway.

    Raises:
        BudgetError: over the cap without ``run.allow_partial``; names the estimate and the cap.
    """
    cap = token_cap(config)
    if cap is None or estimated_tokens <= cap:
        return True
    if config.run.allow_partial:
        return False
    limits = []
    if config.run.max_tokens is not None:
        limits.append(f"run.max_tokens {config.run.max_tokens:,}")
    if config.run.max_cost_usd is not None:
        limits.append(f"run.max_cost_usd {config.run.max_cost_usd:g}")
    raise BudgetError(
        f"the run is estimated at {estimated_tokens:,} tokens (${cost_usd(estimated_tokens, config):,.4f}), "
        f"over its cap of {cap:,} tokens (${cost_usd(cap, config):,.4f}; {', '.join(limits)}): "
        "nothing was sent. Raise the cap, or pass --allow-partial to embed up to the cap and "
        "continue in a later run"
    )


class BudgetGuard:
    """One task attempt's view of the run's cap: reserve before sending, settle on the answer.

    Args:
        cap: tokens the task attempts of this wave may bill together.
        others: tokens every other attempt of the wave has billed, and has reserved for
            requests in flight (their spend files), read before each request.
        on_reserve: called after each reservation, to publish it (the task's spend file).
        exclusive: holds the other attempts off from reading and reserving meanwhile (a
            lock on the wave's folder), so two never reserve the last room at once.
    """

    __slots__ = (
        "_cap", "_others", "_on_reserve", "_exclusive", "_lock", "_reserved", "_billed", "_exhausted",
    )  # fmt: skip

    def __init__(
        self,
        cap: int,
        others: Callable[[], tuple[int, int]],
        on_reserve: Callable[[], None] | None = None,
        exclusive: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self._cap = cap
        self._others = others
        self._on_reserve = on_reserve
        self._exclusive = exclusive
        self._lock = threading.Lock()
        self._reserved = 0
        self._billed = 0
        self._exhausted = cap <= 0

    @property
    def exhausted(self) -> bool:
        """The cap was reached: send nothing more."""
        return self._exhausted

    @property
    def reserved(self) -> int:
        """Estimated tokens of this attempt's requests in flight."""
        return self._reserved

    def take(self, tokens: int) -> bool | None:
        """Reserve ``tokens`` for one request: True. False (and exhausted from now on) when the
        bills reached the cap; None while requests in flight would take it past the cap: they
        may be billed less than reserved, so ask again once they are answered."""
        with self._lock, self._exclusive():
            if self._exhausted:
                return False
            others_billed, others_reserved = self._others()
            billed = others_billed + self._billed
            if billed >= self._cap:
                self._exhausted = True
                return False
            if billed + others_reserved + self._reserved >= self._cap:
                return None
            self._reserved += tokens
            if self._on_reserve is not None:
                self._on_reserve()  # before the others may look again
        return True

    def give_up(self) -> None:
        """Waiting for requests in flight took too long (a killed attempt's reservation stays):
        count the cap as reached."""
        with self._lock:
            self._exhausted = True

    def settle(self, reserved: int, billed: int) -> None:
        """A request reserved with ``reserved`` ended, billed ``billed`` (0 without an answer)."""
        with self._lock:
            self._reserved -= reserved
            self._billed += billed
