"""The run's cap in core: what it is, the refusal before a run, and one task's guard."""

from __future__ import annotations

import pytest
from support import build_config

from sparkembed.core.budget import BudgetGuard, check_estimate, token_cap
from sparkembed.errors import BudgetError


def test_the_cap_is_the_lower_of_tokens_and_cost_at_the_price() -> None:
    assert token_cap(build_config()) is None
    both = build_config({"run": {"max_tokens": 900_000, "max_cost_usd": 0.01}})  # $0.02 / 1M: 500k
    assert token_cap(both) == 500_000
    free = build_config({"run": {"max_cost_usd": 1.0}, "endpoint": {"price_per_million_tokens": 0}})
    assert token_cap(free) is None


def test_an_estimate_over_the_cap_is_refused_unless_partial_runs_are_allowed() -> None:
    capped = build_config({"run": {"max_tokens": 1000}})
    assert check_estimate(1000, capped)
    said = "estimated at 1,001 tokens .* cap of 1,000 tokens .*--allow-partial"
    with pytest.raises(BudgetError, match=said):
        check_estimate(1001, capped)
    assert not check_estimate(1001, build_config({"run": {"max_tokens": 1000, "allow_partial": True}}))


def test_a_guard_counts_its_own_requests_in_flight_and_the_others_spend() -> None:
    others = [0]
    published: list[int] = []
    guard = BudgetGuard(100, lambda: others[0], on_reserve=lambda: published.append(guard.reserved))
    assert guard.take(40) and guard.take(40) and published == [40, 80]
    assert guard.take(40)  # 80 < 100: the request that crosses the cap still goes
    assert not guard.take(1) and guard.exhausted  # and nothing after it
    fresh = BudgetGuard(100, lambda: others[0])
    others[0] = 60
    assert fresh.take(30) and fresh.reserved == 30
    fresh.settle(30, 25)  # answered: 25 billed, nothing reserved any more
    assert fresh.reserved == 0
    others[0] = 75
    assert not fresh.take(1)  # 75 others + 25 billed = the cap
