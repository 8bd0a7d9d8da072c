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
    others = [0, 0]  # billed, reserved
    published: list[int] = []
    guard = BudgetGuard(
        100, lambda: (others[0], others[1]), on_reserve=lambda: published.append(guard.reserved)
    )
    assert guard.take(40) and guard.take(40) and published == [40, 80]
    assert guard.take(40)  # 80 < 100: the request that crosses the cap still goes
    assert guard.take(1) is None and not guard.exhausted  # in flight past the cap: wait for them
    for _ in range(3):
        guard.settle(40, 35)
    assert guard.take(1) is False and guard.exhausted  # 105 billed: nothing more
    assert guard.take(1) is False
    fresh = BudgetGuard(100, lambda: (others[0], others[1]))
    others[0] = 60
    assert fresh.take(30) and fresh.reserved == 30
    fresh.settle(30, 25)  # answered: 25 billed, nothing reserved any more
    assert fresh.reserved == 0
    others[0] = 75
    assert fresh.take(1) is False  # 75 others + 25 billed = the cap


def test_reservations_past_the_cap_that_are_billed_below_it_let_requests_go_on() -> None:
    """Estimates exceed bills: another task's reservations take the total past the cap, but
    once they are answered the bills are below it, and this task goes on."""
    others = [0, 100]
    guard = BudgetGuard(100, lambda: (others[0], others[1]))
    assert guard.take(20) is None and not guard.exhausted
    others[:] = [60, 0]  # the other task's requests were billed 60
    assert guard.take(20) is True


def test_a_reservation_that_never_settles_counts_as_the_cap_once_given_up() -> None:
    guard = BudgetGuard(100, lambda: (0, 100))  # a killed attempt's file keeps its reservation
    assert guard.take(10) is None
    guard.give_up()
    assert guard.take(10) is False and guard.exhausted