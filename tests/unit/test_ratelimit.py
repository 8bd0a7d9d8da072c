"""Rate limiter arithmetic on virtual time: exact assertions, no real sleeps.

The limiter runs on :class:`VirtualTimeLoop`, an asyncio loop whose clock jumps
straight to the next timer instead of sleeping, so ``await asyncio.sleep(30)``
takes no real time and every wake-up happens at an exact virtual instant.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from sparkembed.core.ratelimit import (
    DECREASE,
    DEFAULT_COOLDOWN_S,
    HOLDOFF_S,
    MIN_RATE_FACTOR,
    RECOVERY_PER_S,
    RateLimiter,
    TokenBucket,
)

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Instead of blocking until the next timer, move the loop's clock to it."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("deadlock: every task waits and no timer is set")
        self._loop.now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        self.timers = 0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now

    def call_at(  # type: ignore[override]
        self, when: float, callback: Any, *args: Any, context: Any = None
    ) -> Any:
        self.timers += 1
        return super().call_at(when, callback, *args, context=context)


@pytest.fixture
def loop() -> Iterator[VirtualTimeLoop]:
    virtual = VirtualTimeLoop()
    yield virtual
    virtual.close()


def run(loop: VirtualTimeLoop, main: Callable[[], Awaitable[T]]) -> T:
    return loop.run_until_complete(main())  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def exact(limiter_tpm: float | None, limiter_rpm: float | None, loop: VirtualTimeLoop):
    """A limiter on the loop's clock with no headroom, so shares are exact."""
    return RateLimiter(limiter_tpm, limiter_rpm, clock=loop.time, headroom=0.0)


async def acquire_logged(
    limiter: RateLimiter, tokens: int, name: str, log: list[tuple[str, float, float]]
) -> None:
    waited = await limiter.acquire(tokens)
    log.append((name, asyncio.get_running_loop().time(), waited))


# --- TokenBucket ----------------------------------------------------------------------


def test_bucket_starts_full() -> None:
    bucket = TokenBucket(60_000, 1_000, clock=FakeClock())
    assert bucket.level == 60_000
    assert bucket.delay_s(60_000) == 0.0


def test_bucket_delay_is_the_missing_units_over_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60_000, 1_000, clock=clock)
    bucket.take(60_000)
    assert bucket.delay_s(1_000) == 1.0
    clock.now = 0.25
    assert bucket.delay_s(1_000) == 0.75
    clock.now = 1.0
    assert bucket.delay_s(1_000) == 0.0


def test_bucket_refill_stops_at_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 10, clock=clock)
    bucket.take(50)
    clock.now = 60.0
    assert bucket.level == 100


def test_bucket_lets_an_oversized_take_go_when_full_and_keeps_the_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60_000, 1_000, clock=clock)
    assert bucket.delay_s(90_000) == 0.0
    bucket.take(90_000)
    assert bucket.level == -30_000
    assert bucket.delay_s(1_000) == 31.0
    assert bucket.delay_s(90_000) == 90.0  # until full again


def test_bucket_refund_stops_at_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 10, clock=clock)
    bucket.take(30)
    bucket.give(50)
    assert bucket.level == 100


def test_bucket_drain_empties_but_keeps_debt() -> None:
    bucket = TokenBucket(100, 10, clock=FakeClock())
    bucket.drain()
    assert bucket.level == 0
    bucket.take(40)
    bucket.drain()
    assert bucket.level == -40


def test_bucket_rate_change_applies_from_now_on() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 10, clock=clock)
    bucket.take(100)
    clock.now = 2.0
    bucket.set_rate(5)
    clock.now = 4.0
    assert bucket.level == 30  # 2 s at 10/s, then 2 s at 5/s


@pytest.mark.parametrize(("capacity", "rate"), [(0, 1), (1, 0), (-1, 1)])
def test_bucket_refuses_a_non_positive_shape(capacity: float, rate: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(capacity, rate)


# --- unlimited ----------------------------------------------------------------------------


def test_no_quota_admits_everything_at_once(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)

    async def main() -> list[float]:
        return [await limiter.acquire(1_000_000) for _ in range(100)]

    assert run(loop, main) == [0.0] * 100
    assert loop.now == 0.0
    assert limiter.waited_s == 0.0


def test_no_quota_still_pauses_everyone_on_a_429(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        limiter.on_throttle(1.5)
        await asyncio.gather(*(acquire_logged(limiter, 10, f"r{i}", log) for i in range(3)))

    run(loop, main)
    assert log == [("r0", 1.5, 1.5), ("r1", 1.5, 1.5), ("r2", 1.5, 1.5)]
    assert limiter.waited_s == 4.5


# --- tokens per minute --------------------------------------------------------------------


def test_a_fresh_minute_of_quota_goes_at_once(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> list[float]:
        return [await limiter.acquire(1_000) for _ in range(60)]

    assert run(loop, main) == [0.0] * 60
    assert loop.now == 0.0


def test_after_the_burst_1000_tokens_wait_exactly_one_second(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        await limiter.acquire(60_000)
        return await limiter.acquire(1_000)

    assert run(loop, main) == 1.0
    assert loop.now == 1.0
    assert limiter.waited_s == 1.0


def test_after_the_burst_requests_are_paced_at_the_share_rate(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await limiter.acquire(60_000)
        await asyncio.gather(*(acquire_logged(limiter, 500, f"r{i}", log) for i in range(6)))

    run(loop, main)
    assert [(name, t) for name, t, _ in log] == [
        ("r0", 0.5),
        ("r1", 1.0),
        ("r2", 1.5),
        ("r3", 2.0),
        ("r4", 2.5),
        ("r5", 3.0),
    ]
    assert limiter.waited_s == 0.5 + 1.0 + 1.5 + 2.0 + 2.5 + 3.0


def test_only_the_head_waiter_sleeps_once_per_admission(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> None:
        await limiter.acquire(60_000)
        loop.timers = 0
        await asyncio.gather(*(limiter.acquire(1_000) for _ in range(10)))

    run(loop, main)
    assert loop.now == 10.0
    assert loop.timers == 10  # one timer per admission: nobody polls


def test_the_default_headroom_keeps_one_percent_of_the_share(loop: VirtualTimeLoop) -> None:
    limiter = RateLimiter(60_000, None, clock=loop.time)

    async def main() -> float:
        await limiter.acquire(59_400)
        return await limiter.acquire(990)

    assert run(loop, main) == 1.0


def test_a_request_larger_than_the_bucket_goes_when_full(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await acquire_logged(limiter, 90_000, "huge", log)
        await acquire_logged(limiter, 1_000, "next", log)

    run(loop, main)
    assert log == [("huge", 0.0, 0.0), ("next", 31.0, 31.0)]


def test_an_oversized_request_behind_traffic_waits_for_a_full_bucket(
    loop: VirtualTimeLoop,
) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        await limiter.acquire(30_000)
        return await limiter.acquire(100_000)

    assert run(loop, main) == 30.0


def test_waiters_are_served_in_order_so_a_large_request_is_not_starved(
    loop: VirtualTimeLoop,
) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await limiter.acquire(60_000)
        big = asyncio.ensure_future(acquire_logged(limiter, 30_000, "big", log))
        await asyncio.sleep(0)
        smalls = [acquire_logged(limiter, 1_000, f"small{i}", log) for i in range(3)]
        await asyncio.gather(big, *smalls)

    run(loop, main)
    assert [(name, t) for name, t, _ in log] == [
        ("big", 30.0),
        ("small0", 31.0),
        ("small1", 32.0),
        ("small2", 33.0),
    ]


def test_a_newcomer_queues_behind_waiters_even_if_its_cost_fits(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await limiter.acquire(55_000)  # 5_000 left
        first = asyncio.ensure_future(acquire_logged(limiter, 10_000, "first", log))
        await asyncio.sleep(0)
        await acquire_logged(limiter, 1_000, "newcomer", log)
        await first

    run(loop, main)
    assert log == [("first", 5.0, 5.0), ("newcomer", 6.0, 6.0)]


# --- requests per minute ------------------------------------------------------------------


def test_rpm_allows_a_ten_second_window_then_paces(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, 600, loop)  # bucket of 100 requests, 10 per second

    async def main() -> list[float]:
        return [await limiter.acquire(1) for _ in range(102)]

    waits = run(loop, main)
    assert waits[:100] == [0.0] * 100
    assert waits[100:] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert loop.now == pytest.approx(0.2)


def test_the_stricter_bucket_sets_the_wait(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, 60, loop)  # 10 requests per 10 s, 1 per second; 1000 tokens/s

    async def main() -> list[float]:
        await limiter.acquire(59_990)  # 9 requests left, 10 tokens
        waits = [await limiter.acquire(1) for _ in range(9)]
        waits.append(await limiter.acquire(1))  # requests bucket empty: 1 s
        waits.append(await limiter.acquire(5_000))  # tokens: 5 s
        return waits

    assert run(loop, main) == [0.0] * 9 + [1.0, pytest.approx(4.0)]
    assert loop.now == pytest.approx(5.0)


# --- settling from reported usage ------------------------------------------------------------


def test_an_overestimate_is_refunded_and_wakes_the_waiter_early(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        await limiter.acquire(60_000)
        waiter = asyncio.ensure_future(limiter.acquire(10_000))  # due at t=10
        await asyncio.sleep(2.0)
        limiter.settle(estimated_tokens=5_000, actual_tokens=1_000)  # 2_000 + 4_000 now
        return await waiter

    assert run(loop, main) == 6.0


def test_an_underestimate_is_charged(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        await limiter.acquire(60_000)
        limiter.settle(estimated_tokens=1_000, actual_tokens=3_000)
        return await limiter.acquire(1_000)

    assert run(loop, main) == 3.0


def test_a_refund_never_overfills_the_bucket(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        await limiter.acquire(1_000)
        limiter.settle(estimated_tokens=50_000, actual_tokens=0)
        await limiter.acquire(60_000)
        return await limiter.acquire(1_000)

    assert run(loop, main) == 1.0


@pytest.mark.parametrize("settle_first", [True, False])
def test_a_refused_request_refunds_nothing_into_a_cooldown(loop: VirtualTimeLoop, settle_first: bool) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        await limiter.acquire(10_000)
        # Either order leaves the bucket empty, refilling at 700/s from t=0.
        if settle_first:
            limiter.settle(estimated_tokens=10_000, actual_tokens=0)
        limiter.on_throttle(1.0)
        if not settle_first:
            limiter.settle(estimated_tokens=10_000, actual_tokens=0)
        return await limiter.acquire(1_400)

    assert run(loop, main) == pytest.approx(2.0)


def test_settle_without_a_token_limit_changes_nothing(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, 600, loop)

    async def main() -> float:
        limiter.settle(estimated_tokens=1_000, actual_tokens=90_000)
        return await limiter.acquire(1_000)

    assert run(loop, main) == 0.0


# --- 429 feedback -------------------------------------------------------------------------


def test_a_429_pauses_all_pending_acquirers_until_its_retry_after(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await limiter.acquire(60_000)
        pending = [asyncio.ensure_future(acquire_logged(limiter, 100, f"r{i}", log)) for i in range(3)]
        await asyncio.sleep(0.05)  # due at 0.1, 0.2, 0.3
        limiter.on_throttle(1.5)
        await asyncio.gather(*pending)

    run(loop, main)
    # Paused until 1.55; by then 1.5 s at the lowered rate (700/s) refilled 1050 tokens.
    assert [name for name, _, _ in log] == ["r0", "r1", "r2"]
    assert [t for _, t, _ in log] == [pytest.approx(1.55)] * 3


def test_a_429_without_retry_after_pauses_the_default_cooldown(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)

    async def main() -> float:
        limiter.on_throttle(None)
        return await limiter.acquire(1)

    assert run(loop, main) == DEFAULT_COOLDOWN_S


def test_a_429_empties_the_buckets_so_traffic_restarts_paced(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> list[float]:
        limiter.on_throttle(1.0)  # bucket was full; now empty, refilling at 700/s
        return [await limiter.acquire(700) for _ in range(3)]

    assert run(loop, main) == [1.0, pytest.approx(1.0), pytest.approx(1.0)]
    assert loop.now == pytest.approx(3.0)


def test_a_429_cuts_the_rate_multiplicatively(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    limiter.on_throttle(1.0)
    assert limiter.rate_factor == DECREASE


def test_429s_of_one_congestion_event_cut_the_rate_once(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> list[float]:
        factors = []
        limiter.on_throttle(1.0)  # paused until 1, hold-off until 3
        await asyncio.sleep(0.5)
        limiter.on_throttle(1.0)  # during the pause: extends it to 1.5
        factors.append(limiter.rate_factor)
        await asyncio.sleep(2.0)  # t=2.5, within the hold-off
        limiter.on_throttle(0.1)
        factors.append(limiter.rate_factor)
        await asyncio.sleep(0.5)  # t=3.0: a new event
        limiter.on_throttle(0.1)
        factors.append(limiter.rate_factor)
        return factors

    assert run(loop, main) == [DECREASE, DECREASE, pytest.approx(DECREASE**2)]


def test_a_longer_retry_after_extends_the_pause_and_a_shorter_one_does_not(
    loop: VirtualTimeLoop,
) -> None:
    limiter = exact(None, None, loop)

    async def main() -> list[float]:
        limiter.on_throttle(5.0)
        limiter.on_throttle(1.0)
        first = await limiter.acquire(1)
        limiter.on_throttle(2.0)
        limiter.on_throttle(3.0)
        return [first, await limiter.acquire(1)]

    assert run(loop, main) == [5.0, 3.0]
    assert loop.now == 8.0


def test_the_rate_factor_never_falls_below_its_floor(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        for _ in range(20):
            limiter.on_throttle(0.0)
            await asyncio.sleep(HOLDOFF_S)
        return limiter.rate_factor

    assert run(loop, main) == MIN_RATE_FACTOR


def test_success_climbs_back_linearly_after_the_holdoff(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> list[float]:
        factors = []
        limiter.on_throttle(1.0)  # factor 0.7; paused until 1; recovery from 3
        for t in (2.0, 5.0, 7.0, 20.0):
            await asyncio.sleep(t - loop.time())
            limiter.on_success()
            factors.append(limiter.rate_factor)
        return factors

    assert run(loop, main) == [
        DECREASE,
        pytest.approx(DECREASE + 2 * RECOVERY_PER_S),
        pytest.approx(DECREASE + 4 * RECOVERY_PER_S),
        1.0,
    ]


def test_success_without_throttling_keeps_the_full_rate(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    limiter.on_success()
    assert limiter.rate_factor == 1.0


def test_the_lowered_rate_paces_admissions(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        limiter.on_throttle(0.0)  # 700 tokens/s from an empty bucket
        return await limiter.acquire(1_400)

    assert run(loop, main) == pytest.approx(2.0)


def test_recovery_wakes_the_waiter_at_the_higher_rate(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        limiter.on_throttle(0.0)  # 700/s; recovery starts at t=2 (hold-off)
        waiter = asyncio.ensure_future(limiter.acquire(7_000))  # due at t=10 at 700/s
        await asyncio.sleep(4.0)
        limiter.on_success()  # factor 0.7 + 2 s of recovery
        return await waiter

    # 2_800 tokens by t=4, then 4_200 more at the raised rate
    raised = 1_000 * (DECREASE + 2 * RECOVERY_PER_S)
    assert run(loop, main) == pytest.approx(4.0 + 4_200 / raised)


# --- cancellation ---------------------------------------------------------------------------


def test_a_cancelled_head_waiter_hands_its_turn_to_the_next(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await limiter.acquire(60_000)
        big = asyncio.ensure_future(acquire_logged(limiter, 30_000, "big", log))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(acquire_logged(limiter, 1_000, "small", log))
        await asyncio.sleep(0.5)
        big.cancel()
        await small

    run(loop, main)
    assert log == [("small", 1.0, 1.0)]


def test_a_cancelled_queued_waiter_leaves_the_queue(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await limiter.acquire(60_000)
        tasks = [asyncio.ensure_future(acquire_logged(limiter, 1_000, name, log)) for name in ("a", "b", "c")]
        await asyncio.sleep(0.5)
        tasks[1].cancel()
        await asyncio.gather(tasks[0], tasks[2])

    run(loop, main)
    assert log == [("a", 1.0, 1.0), ("c", 2.0, 2.0)]
    assert limiter.waited_s == 3.0
