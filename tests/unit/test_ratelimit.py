"""Pacer arithmetic on virtual time: exact assertions, no real sleeps.

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
    BOUND_HORIZON_WINDOWS,
    DEFAULT_COOLDOWN_S,
    REQUESTS_PER_LIMIT,
    WINDOW_MARGIN,
    PeerView,
    RateLimiter,
    SendWindow,
    equal_part,
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
    """A limiter on the loop's clock with no headroom, so shares are exact, that has heard
    its first answer (the first request goes alone until then)."""
    limiter = RateLimiter(limiter_tpm, limiter_rpm, clock=loop.time, headroom=0.0)
    limiter.settle(limiter._take(0, 0.0, 0), 0)
    return limiter


MINUTE = 60 * (1 + WINDOW_MARGIN)
"""The pacer's token window, in seconds."""


async def acquire_logged(
    limiter: RateLimiter, tokens: int, name: str, log: list[tuple[str, float, float]]
) -> None:
    grant = await limiter.acquire(tokens)
    log.append((name, asyncio.get_running_loop().time(), grant.waited_s))



# --- SendWindow ----------------------------------------------------------------------


def test_window_admits_up_to_its_limit_then_waits_for_the_oldest_to_age_out() -> None:
    clock = FakeClock()
    window = SendWindow(100, 60.0, clock=clock)
    assert window.delay_s(100) == 0.0
    window.take(60)
    clock.now = 20.0
    window.take(30)
    assert window.delay_s(10) == 0.0
    assert window.delay_s(20) == 40.0  # the 60 ages out at t=60
    assert window.delay_s(80) == 60.0  # the 30 too, at t=80
    clock.now = 60.0
    assert (window.used(), window.delay_s(70)) == (30.0, 0.0)


def test_window_lets_an_oversized_cost_into_an_empty_window_only() -> None:
    clock = FakeClock()
    window = SendWindow(100, 60.0, clock=clock)
    window.take(10)
    clock.now = 5.0
    assert window.delay_s(250) == 55.0
    clock.now = 60.0
    assert window.delay_s(250) == 0.0


def test_window_correction_gives_back_what_was_not_billed() -> None:
    clock = FakeClock()
    window = SendWindow(100, 60.0, clock=clock)
    charge = window.take(100)
    assert window.delay_s(50) == 60.0
    window.correct(charge, 40)
    assert (window.used(), window.delay_s(50)) == (40.0, 0.0)


def test_window_without_a_limit_admits_everything_and_still_counts() -> None:
    window = SendWindow(None, 60.0, clock=FakeClock())
    window.take(10**9)
    assert (window.limit, window.delay_s(10**9), window.used()) == (None, 0.0, 10**9)


def test_the_tightest_recent_bound_is_the_limit_until_it_grows_old() -> None:
    clock = FakeClock()
    window = SendWindow(1_000, 60.0, clock=clock)
    window.learn(5_000)
    assert window.limit == 1_000  # never above the quota
    window.learn(700)
    clock.now = 30.0
    window.learn(900)
    assert window.limit == 700
    clock.now = BOUND_HORIZON_WINDOWS * 60.0 + 1
    window.learn(950)
    assert window.limit == 900  # the 700 is too old; the 900 is not yet
    clock.now += 30.0
    window.learn(990)
    assert window.limit == 950


def test_headroom_is_taken_off_limits_and_bounds() -> None:
    window = SendWindow(2_000, 60.0, share=0.5, clock=FakeClock(), headroom=0.1)
    assert window.limit == 900
    window.learn(3_000)
    assert window.limit == 1_350


def test_a_share_may_grow_to_the_whole_quota_but_equal_parts_split_the_bound() -> None:
    window = SendWindow(1_000, 60.0, share=0.25, clock=FakeClock())
    assert window.limit == 250
    window.learn(4_000)  # alone in the tail: what it sent plus a quarter of the room is large
    assert window.limit == 1_000
    window.peers = 2
    assert (window.bound, window.limit) == (1_000, 500)
    window.learn(800)
    window.peers = 4
    assert (window.bound, window.limit) == (800, 200)


def test_with_peers_the_parts_are_cut_in_whole_requests() -> None:
    """A bound of 31.7 requests over four workers: equal parts of 7.9 would send 7 each (28);
    cut in whole requests, the first three by rank send 8 and the last 7, within the bound.
    Those that sent their 8 hold more than 7.9: the others share what is left, and still by
    rank among themselves."""
    sent: list[int] = []
    for rank in range(4):
        window = SendWindow(None, 60.0, clock=FakeClock())
        window.learn(114_000)
        window.peers, window.rank = 4, rank
        window.peer_used = tuple(count * 3_600.0 for count in sent)  # those before it, by rank
        count = 0
        while window.delay_s(3_600) == 0:
            window.take(3_600)
            count += 1
        sent.append(count)
    assert sent == [8, 8, 8, 7]
    assert sum(sent) * 3_600 <= 114_000


def test_an_equal_part_leaves_what_one_worker_holds_past_it_to_that_worker() -> None:
    assert equal_part(240, [0, 0, 0, 0]) == (60, (True, True, True, True))
    assert equal_part(240, [50, 60, 0, 10]) == (60, (True, True, True, True))  # all within their part
    assert equal_part(240, [0, 190, 0, 0]) == (pytest.approx(50 / 3), (True, False, True, True))
    # The second is over only once the first keeps its 150.
    assert equal_part(240, [0, 70, 150, 0]) == (10, (True, False, False, True))
    assert equal_part(100, [120, 0]) == (-20, (False, True))  # more than the bound is held: none left


def test_with_peers_one_that_spent_past_its_part_leaves_the_others_only_the_rest() -> None:
    """One of four workers spent 190,000 of a 240,000 bound (room a fixed window reported
    just after it reset, say). When the job's older sends age out, the other three each have
    nothing in their window: with a part of a quarter each, all three would send up to
    the 50,000 left at once. They share it: a third of it each, in whole requests."""
    sent = []
    for rank in (1, 2, 3):
        window = SendWindow(None, 60.0, clock=FakeClock())
        window.learn(240_000)
        window.peers, window.rank = 4, rank
        window.peer_used = (190_000.0, *sent)  # and what those before it sent
        count = 0
        while window.delay_s(8_000) == 0:
            window.take(8_000)
            count += 1
        sent.append(float(count * 8_000))
    assert window.part == 60_000  # a request's size still follows the equal part
    assert sent == [16_000] * 3  # a third of the 50,000 each, in whole requests (7 without peer_used)


# --- pacing -------------------------------------------------------------------------------


def test_the_first_request_goes_alone_until_it_is_answered(loop: VirtualTimeLoop) -> None:
    limiter = RateLimiter(None, None, clock=loop.time)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        first = await limiter.acquire(100)
        second = asyncio.ensure_future(acquire_logged(limiter, 100, "second", log))
        await asyncio.sleep(0.3)
        assert log == []
        limiter.settle(first, 100)
        await second

    run(loop, main)
    assert log == [("second", 0.3, 0.3)]


def test_a_withdrawn_request_is_not_an_answer_so_the_first_still_goes_alone(loop: VirtualTimeLoop) -> None:
    limiter = RateLimiter(None, None, clock=loop.time)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        first = await limiter.acquire(100)
        split = limiter._take(5_000, 0.0, 5_000)  # admitted, then split unsent
        limiter.withdraw(split)
        assert limiter._tokens.used() == 100  # its charge is handed back
        third = asyncio.ensure_future(acquire_logged(limiter, 100, "third", log))
        await asyncio.sleep(0.3)
        assert log == []  # the first request is still unanswered
        limiter.settle(first, 100)
        await third

    run(loop, main)
    assert log == [("third", 0.3, 0.3)]


def test_a_request_too_large_for_a_limit_learned_while_it_waited_is_handed_back_to_split(
    loop: VirtualTimeLoop,
) -> None:
    """Sized before any limit was known, it must not wait a window for a room of its own."""
    limiter = RateLimiter(None, None, clock=loop.time, headroom=0.0)

    async def main() -> tuple[float | None, float]:
        first = await limiter.acquire(50_000)
        waiting = asyncio.ensure_future(limiter.acquire(50_000, cuts=[25_000]))
        await asyncio.sleep(0.2)
        limiter.settle(first, 50_000)
        limiter.on_success(first, remaining_tokens=50_000)  # a limit of 100,000: requests of 20,000
        return await waiting, loop.time()

    assert run(loop, main) == (None, 0.2)


def test_a_request_that_would_wait_a_window_sends_the_longest_first_part_that_fits(
    loop: VirtualTimeLoop,
) -> None:
    """The room a burst leaves under one request never carries over: spend it on a first part."""
    limiter = exact(30_000, None, loop)
    cuts = [1_000, 2_000, 3_000, 4_000]  # a request of 5,000 in five texts

    async def main() -> list[tuple[int, float]]:
        burst = await limiter.acquire(27_000)
        await asyncio.sleep(0.05)  # its round trip
        limiter.settle(burst, 27_000)
        limiter.on_success(burst, remaining_tokens=3_000)
        part = await limiter.acquire(5_000, cuts=cuts)
        sent = [(part.estimate, loop.time())]
        limiter.settle(part, 3_000)
        rest = await limiter.acquire(2_000, cuts=[1_000])
        return [*sent, (rest.estimate, loop.time())]

    assert run(loop, main) == [(3_000, pytest.approx(0.05)), (2_000, pytest.approx(MINUTE))]


@pytest.mark.parametrize(
    ("quota", "sent"),
    [(30_000, (4_000, 0.05)), (31_000, (4_000, 0.05)), (None, (5_000, MINUTE)), (60_000, (5_000, MINUTE))],
)
def test_a_first_part_on_a_bound_no_quota_confirms_needs_room_the_service_reported(
    loop: VirtualTimeLoop, quota: int | None, sent: tuple[int, float]
) -> None:
    """A bound of sends plus room may be loose (a bucket that refilled, a clock minute that
    reset): with no request's slack left, a first part goes only into room the service said it
    has just now, less what went since (here it said nothing), unless the bound learned is
    near the configured quota, which then caps it: the part goes. With no quota, or one twice
    the bound learned (set too high), it does not."""
    limiter = exact(quota, None, loop)
    limiter._tokens.learn(30_000)  # the bound, as if a reading gave it

    async def main() -> tuple[int, float]:
        burst = await limiter.acquire(26_000)
        await asyncio.sleep(0.05)
        limiter.settle(burst, 26_000)  # no x-ratelimit-remaining-tokens
        whole = await limiter.acquire(5_000, cuts=[1_000, 2_000, 3_000, 4_000])  # 4,000 fit the bound
        return whole.estimate, loop.time()

    assert run(loop, main) == (sent[0], pytest.approx(sent[1]))


def test_with_peers_a_first_part_spends_its_equal_part_of_the_room_reported(loop: VirtualTimeLoop) -> None:
    """Every worker reads the room the service reports; each spends only its equal part of it
    on a first part, so two spending all of it at once are not refused. Here the peer sent
    30,000 and this worker 26,000 of a bound of 60,000: 4,000 fit its part, but 2,000 its half
    of the room."""
    peers = Peers(2, tokens=((0.0, 30_000.0),), each_tokens=(((0.0, 30_000.0),),))
    limiter = peered(loop, peers)
    limiter._tokens.learn(60_000)

    async def main() -> tuple[int, float]:
        await asyncio.sleep(1.0)
        burst = await limiter.acquire(26_000)
        await asyncio.sleep(0.05)
        limiter.settle(burst, 26_000)
        limiter.on_success(burst, remaining_tokens=4_000)
        part = await limiter.acquire(5_000, cuts=[1_000, 2_000, 3_000, 4_000])
        return part.estimate, loop.time()

    assert run(loop, main) == (2_000, pytest.approx(1.05))


def test_a_request_is_not_cut_for_a_short_wait_or_into_crumbs(loop: VirtualTimeLoop) -> None:
    limiter = exact(30_000, None, loop)

    async def main() -> list[tuple[int, float]]:
        limiter.settle(await limiter.acquire(27_000), 27_000)
        await asyncio.sleep(MINUTE - 5)  # the window frees in 5 s: the whole request waits
        whole = await limiter.acquire(5_000, cuts=[1_000, 2_000, 3_000, 4_000])
        sent = [(whole.estimate, loop.time() - MINUTE)]
        limiter.settle(whole, 5_000)
        limiter.settle(await limiter.acquire(24_900), 24_900)  # 100 left: under a tenth of the next
        crumbs = await limiter.acquire(5_000, cuts=list(range(50, 5_000, 50)))
        return [*sent, (crumbs.estimate, loop.time() - 2 * MINUTE)]

    assert run(loop, main) == [(5_000, pytest.approx(0.0)), (5_000, pytest.approx(0.0))]


def test_a_window_holding_only_refused_charges_is_empty(loop: VirtualTimeLoop) -> None:
    window = SendWindow(1_000, 60.0, clock=loop.time)
    window.correct(window.take(900), 0)  # refused: nothing counted
    assert window.delay_s(5_000) == 0.0  # an oversized cost goes at once, as in an empty window


def test_no_quota_admits_everything_at_once(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)

    async def main() -> list[float]:
        return [(await limiter.acquire(1_000_000)).waited_s for _ in range(100)]

    assert run(loop, main) == [0.0] * 100


def test_a_minute_of_quota_goes_at_once_then_waits_for_it_to_age_out(loop: VirtualTimeLoop) -> None:
    # Safe under every model: a bucket would refill sooner, but a window would not.
    limiter = exact(60_000, None, loop)

    async def main() -> list[float]:
        waits = [(await limiter.acquire(1_000)).waited_s for _ in range(60)]
        return waits + [(await limiter.acquire(1_000)).waited_s]

    assert run(loop, main) == [0.0] * 60 + [pytest.approx(MINUTE)]


def test_rpm_is_paced_over_a_sixth_of_the_minute(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, 600, loop)

    async def main() -> list[float]:
        return [(await limiter.acquire(1)).waited_s for _ in range(101)]

    waits = run(loop, main)
    assert waits[:100] == [0.0] * 100
    assert waits[100] == pytest.approx(MINUTE / 6)


def test_waiters_are_served_in_order_so_a_large_request_is_not_starved(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        for _ in range(6):
            await limiter.acquire(10_000)
            await asyncio.sleep(1.0)
        big = asyncio.ensure_future(acquire_logged(limiter, 30_000, "big", log))
        await asyncio.sleep(0)
        await asyncio.gather(big, *(acquire_logged(limiter, 1_000, f"small{i}", log) for i in range(2)))

    run(loop, main)
    # The 30,000 need the first three sends gone (t = 2 + MINUTE); the small ones go after it.
    assert [name for name, _, _ in log] == ["big", "small0", "small1"]
    assert log[0][1] == pytest.approx(2 + MINUTE)
    assert log[1][1] == pytest.approx(3 + MINUTE)


def test_a_request_retried_after_a_429_goes_ahead_of_new_ones(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def retried() -> None:
        grant = await limiter.acquire(20_000, retry=True)
        log.append(("retried", loop.time(), grant.waited_s))

    async def main() -> None:
        await limiter.acquire(52_000)
        new = [asyncio.ensure_future(acquire_logged(limiter, 5_000, f"new{i}", log)) for i in range(3)]
        await asyncio.sleep(1.0)  # new0 went; new1 heads the queue, napping
        await asyncio.gather(retried(), *new)

    run(loop, main)
    assert [name for name, _, _ in log] == ["new0", "retried", "new1", "new2"]


def test_an_overestimate_is_refunded_and_wakes_the_waiter(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)

    async def main() -> float:
        grant = await limiter.acquire(60_000)
        waiter = asyncio.ensure_future(limiter.acquire(10_000))
        await asyncio.sleep(2.0)
        limiter.settle(grant, 45_000)
        return (await waiter).waited_s

    assert run(loop, main) == 2.0


def test_a_cancelled_head_waiter_hands_its_turn_to_the_next(loop: VirtualTimeLoop) -> None:
    limiter = exact(60_000, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await limiter.acquire(59_000)
        big = asyncio.ensure_future(acquire_logged(limiter, 30_000, "big", log))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(acquire_logged(limiter, 1_000, "small", log))
        await asyncio.sleep(0.5)
        big.cancel()
        await small

    run(loop, main)
    assert log == [("small", 0.5, 0.5)]


# --- learning from the service ------------------------------------------------------------


def test_the_room_reported_after_a_success_bounds_the_limit(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)

    async def main() -> None:
        grant = await limiter.acquire(4_000)
        limiter.settle(grant, 4_200)
        limiter.on_success(grant, remaining_tokens=15_800, remaining_requests=99)

    run(loop, main)
    assert (limiter.token_limit, limiter.request_limit) == (20_000, 100)
    # In estimated tokens: the service billed 4,200 for an estimate of 4,000.
    assert limiter.request_cap() == pytest.approx(20_000 / REQUESTS_PER_LIMIT / 1.05)


def test_requests_in_flight_count_until_settled_then_the_refused_drop_out(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)

    async def main() -> list[float | None]:
        first = await limiter.acquire(4_000)
        second = await limiter.acquire(4_000)  # in flight: the service may have counted it
        limiter.settle(first, 4_000)
        limiter.on_success(first, remaining_tokens=16_000)
        loose = limiter.token_limit
        limiter.settle(second, 0)  # refused: it was never counted
        return [loose, limiter.token_limit]

    assert run(loop, main) == [24_000, 20_000]


def test_workers_count_their_share_of_the_room(loop: VirtualTimeLoop) -> None:
    limiter = RateLimiter(10_000, None, share=1 / 4, clock=loop.time, headroom=0.0)

    async def main() -> None:
        grant = await limiter.acquire(1_000)
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=20_000)

    run(loop, main)
    assert limiter.token_limit == 6_000  # 1,000 sent + a quarter of the 20,000 left


def test_the_limit_never_passes_the_configured_quota(loop: VirtualTimeLoop) -> None:
    limiter = RateLimiter(10_000, None, share=1 / 2, clock=loop.time, headroom=0.0)

    async def main() -> None:
        grant = await limiter.acquire(1_000)
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=100_000)

    run(loop, main)
    assert limiter.token_limit == 20_000  # a tail task may take the whole quota, no more


def test_max_share_caps_the_job_and_busy_others_shrink_it(loop: VirtualTimeLoop) -> None:
    """limits.max_share 0.7 of 10,000: the job never goes past 7,000 a minute, even when the
    deployment's other clients are idle; when they take more than their 3,000, the room the
    service reports is smaller and the job's bound follows it down. That room already leaves
    out what the others sent, so it is not cut again (a double count kept the job at 40 %)."""
    limiter = RateLimiter(7_000 / 2, None, share=1 / 2, clock=loop.time, headroom=0.0, keep_share=True)

    async def main() -> list[float | None]:
        grant = await limiter.acquire(1_000)
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=8_000)  # the others idle: room to spare
        idle = limiter.token_limit
        grant = await limiter.acquire(1_000)
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=2_000)  # they sent their 3,000
        steady = limiter.token_limit
        grant = await limiter.acquire(500)
        limiter.settle(grant, 500)
        limiter.on_success(grant, remaining_tokens=0)  # they sent 5,000
        return [idle, steady, limiter.token_limit]

    # Each worker counts the other as having sent what it did: 2 x its sends + the room.
    # 2,000 + 8,000 is over the 7,000 cap: half of 7,000 (not the whole, as a lone tail
    # worker would take: the room may be the others' part). Then 4,000 + 2,000 = 6,000: 3,000
    # each. Then 5,000 + 0: 2,500 each.
    assert run(loop, main) == [3_500, 3_000, 2_500]


def test_a_429_pauses_all_pending_acquirers_until_its_retry_after(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        refused = await limiter.acquire(100)
        limiter.settle(refused, 0)
        limiter.on_throttle(refused, 1.5)
        await asyncio.gather(*(acquire_logged(limiter, 10, f"r{i}", log) for i in range(3)))

    run(loop, main)
    assert [(name, t) for name, t, _ in log] == [("r0", 1.5), ("r1", 1.5), ("r2", 1.5)]


def test_a_429_without_retry_after_pauses_the_default_cooldown(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)

    async def main() -> float:
        limiter.on_throttle(None, None)
        return (await limiter.acquire(1)).waited_s

    assert run(loop, main) == DEFAULT_COOLDOWN_S


def test_a_longer_retry_after_extends_the_pause_and_a_shorter_one_does_not(loop: VirtualTimeLoop) -> None:
    limiter = exact(None, None, loop)

    async def main() -> list[float]:
        limiter.on_throttle(None, 5.0)
        limiter.on_throttle(None, 1.0)
        return [(await limiter.acquire(1)).waited_s]

    assert run(loop, main) == [5.0]


def test_a_429_lowers_the_limit_only_from_a_service_that_reports_no_room(loop: VirtualTimeLoop) -> None:
    silent, telling = exact(None, None, loop), exact(None, None, loop)

    async def main() -> None:
        for limiter, room in ((silent, None), (telling, 50_000)):
            ok = await limiter.acquire(10_000)
            limiter.settle(ok, 10_000)
            limiter.on_success(ok, remaining_tokens=room)
            refused = await limiter.acquire(8_000)
            limiter.settle(refused, 0)
            limiter.on_throttle(refused, 0.0)

    run(loop, main)
    assert silent.token_limit == 18_000  # below what was sent plus the refused cost
    assert telling.token_limit == 60_000  # the 429 may have been for requests


def test_estimates_are_charged_at_the_rate_the_service_bills_them(loop: VirtualTimeLoop) -> None:
    """The job's estimate undercounts the service's tokens by a fifth: after one answer the
    pacer charges estimates at the billed rate, so a burst stays within the window's limit."""
    limiter = RateLimiter(12_000, None, clock=loop.time, headroom=0.0)
    admitted: list[float] = []

    async def main() -> None:
        first = await limiter.acquire(1_000)
        limiter.settle(first, 1_200)
        admitted.append(loop.time())
        for _ in range(12):
            grant = await limiter.acquire(1_000)
            admitted.append(loop.time())
            limiter.settle(grant, 1_200)

    run(loop, main)
    assert limiter.ratio == pytest.approx(1.2)
    # 10 requests of 1,200 billed tokens fill the 12,000 window; the 11th waits for it to pass.
    in_first_window = [t for t in admitted if t < MINUTE]
    assert len(in_first_window) == 10
    assert admitted[10] == pytest.approx(MINUTE, abs=0.01)


def test_a_byte_bound_estimate_far_above_the_bill_paces_by_the_bill(loop: VirtualTimeLoop) -> None:
    """Estimates five times the billed tokens: once learned, the window holds five times the requests."""
    limiter = RateLimiter(10_000, None, clock=loop.time, headroom=0.0)
    admitted: list[float] = []

    async def main() -> None:
        for _ in range(30):
            grant = await limiter.acquire(2_000)
            admitted.append(loop.time())
            limiter.settle(grant, 400)

    run(loop, main)
    assert limiter.ratio == pytest.approx(0.2)
    assert limiter.request_cap() == pytest.approx(10_000 / REQUESTS_PER_LIMIT / 0.2)
    assert len([t for t in admitted if t < MINUTE]) == 25


def test_after_a_quiet_spell_one_request_goes_first_and_its_answer_sets_the_burst(
    loop: VirtualTimeLoop,
) -> None:
    """A burst after a quiet spell waits for one answer: the limit wandered down meanwhile,
    and the rest of the burst must be sized by the fresh reading, not the stale one."""
    limiter = RateLimiter(None, None, clock=loop.time, headroom=0.0)
    second_at: list[float] = []

    async def main() -> None:
        first = await limiter.acquire(1_000)
        limiter.settle(first, 1_000)
        limiter.on_success(first, remaining_tokens=9_000)  # a limit of 10,000 a window
        await asyncio.sleep(2 * MINUTE)  # quiet: the window emptied, the reading is old
        probe = await limiter.acquire(1_000)
        burst = asyncio.ensure_future(limiter.acquire(1_000))
        await asyncio.sleep(0.05)  # the probe's answer: the service has room for 6,000 now
        assert not burst.done()
        limiter.settle(probe, 1_000)
        limiter.on_success(probe, remaining_tokens=5_000)
        await burst
        second_at.append(loop.time())

    run(loop, main)
    assert second_at[0] == pytest.approx(2 * MINUTE + 0.05, abs=0.01)
    assert limiter.token_limit == pytest.approx(6_000)


# --- peers: what the other workers sent, from their spend files ---------------------------


class Peers:
    """A settable :class:`PeerView` source on the loop's clock (wall time = loop time)."""

    def __init__(self, workers: int, **charges: Any) -> None:
        self.view = PeerView(workers, **charges)

    def __call__(self) -> PeerView:
        return self.view


def peered(
    loop: VirtualTimeLoop, peers: Peers, quota: float | None = None, *, keep_share: bool = False
) -> RateLimiter:
    """A limiter told a quarter of ``quota`` (per minute), with ``peers``."""
    share = 1 / 4
    limiter = RateLimiter(
        quota and quota * share,
        None,
        share=share,
        clock=loop.time,
        wall=loop.time,
        headroom=0.0,
        keep_share=keep_share,
    )
    limiter.settle(limiter._take(0, 0.0, 0), 0)
    limiter.peers = peers
    return limiter


def test_with_peers_each_sender_takes_an_equal_part_and_the_tail_takes_more_at_once(
    loop: VirtualTimeLoop,
) -> None:
    peers = Peers(4)
    limiter = peered(loop, peers, 20_000)
    limiter._view()
    assert limiter.token_limit == 5_000
    peers.view = PeerView(2)  # two tasks ended: no bound has to age out first
    limiter._view()
    assert limiter.token_limit == 10_000
    # What an ended task sent in the window is still counted by the service: no one's part.
    peers.view = PeerView(2, tokens=((0.0, 4_000.0),), ended_tokens=((0.0, 4_000.0),))
    limiter._view()
    assert limiter.token_limit == 8_000
    assert limiter.request_cap() == 10_000 / REQUESTS_PER_LIMIT  # sized for when it has aged out


def test_with_peers_a_reading_waits_for_their_charges_until_then(loop: VirtualTimeLoop) -> None:
    """Without peers the others are taken to have sent what this worker did (a share's guess);
    with them, the bound is what all sent plus the room, once their files show it all."""
    peers = Peers(2, tokens=((0.0, 9_000.0),), as_of=0.0)
    limiter = peered(loop, peers)

    async def main() -> list[float | None]:
        await asyncio.sleep(1.0)
        grant = await limiter.acquire(1_000)
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=10_000)
        before = limiter.token_limit  # their file is older than the answer: not learned yet
        peers.view = PeerView(2, tokens=((0.0, 9_000.0), (1.0, 2_000.0)), as_of=1.5)
        limiter._view()
        return [before, limiter.token_limit]

    # 1,000 mine + 11,000 theirs + 10,000 room = 22,000 for the job, half of it this worker's.
    assert run(loop, main) == [None, 11_000]


def test_a_reading_counts_the_window_the_service_saw_not_the_one_at_the_answer(
    loop: VirtualTimeLoop,
) -> None:
    """Sends that age out of the window between a request and its answer were in the window
    the service counted: the reading keeps them, and so do the peers' files (two windows)."""
    limiter = peered(loop, Peers(2))

    async def main() -> float | None:
        first = await limiter.acquire(5_000)
        limiter.settle(first, 5_000)
        await asyncio.sleep(MINUTE - 0.5)
        grant = await limiter.acquire(1_000)
        await asyncio.sleep(1.0)  # answered once the first 5,000 aged out of the window
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=10_000)
        assert [amount for _, amount in limiter.sent()["tokens"] if amount] == [5_000, 1_000]
        return limiter.token_limit

    # 5,000 + 1,000 sent + 10,000 room = 16,000 for the job, half of it this worker's.
    assert run(loop, main) == 8_000


def test_with_peers_nothing_is_sent_past_the_bound_counting_what_they_sent(loop: VirtualTimeLoop) -> None:
    """A worker that joins late has an equal part, yet waits while the others' earlier sends
    fill the window: the service counts them."""
    peers = Peers(2, tokens=((0.0, 18_000.0),))
    limiter = peered(loop, peers, 20_000)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await asyncio.sleep(10.0)
        await acquire_logged(limiter, 1_000, "fits", log)
        await acquire_logged(limiter, 5_000, "waits", log)

    run(loop, main)
    assert limiter.token_limit == 10_000
    assert log[0] == ("fits", 10.0, 0.0)
    assert log[1][0] == "waits" and log[1][1] == pytest.approx(MINUTE)  # the 18,000 age out


@pytest.mark.parametrize("quota", [None, 80_000])
def test_with_peers_nothing_more_is_sent_until_the_first_room_is_learned(
    loop: VirtualTimeLoop, quota: float | None
) -> None:
    """The first answer's room is completed by the peers' files a moment later; until then
    no limit is known, or only a configured quota that may be too high (here four times),
    and a burst could go past the real limit."""
    peers = Peers(2, as_of=0.0)
    limiter = peered(loop, peers, quota)
    log: list[tuple[str, float, float]] = []

    async def fresh_files_at(when: float) -> None:
        await asyncio.sleep(when - loop.time())
        peers.view = PeerView(2, as_of=when)

    async def main() -> None:
        await asyncio.sleep(1.0)
        grant = await limiter.acquire(1_000)
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=19_000)
        files = asyncio.ensure_future(fresh_files_at(2.0))
        await acquire_logged(limiter, 1_000, "next", log)
        await files

    run(loop, main)
    assert log[0][0] == "next" and log[0][1] >= 2.0  # waited for the files, not the window
    assert limiter.token_limit == 10_000  # 1,000 sent + 19,000 room, for two


def test_with_peers_a_429_teaches_a_bound_only_once_their_sends_are_known(loop: VirtualTimeLoop) -> None:
    """A task whose first answer is a 429 learns what the job sent plus the refused cost; with
    peers whose files are older than its request (or not all there), it waits: its own sends
    alone would make a bound of one request, and a part a quarter of that."""
    peers = Peers(4, tokens=((0.0, 50_000.0),), as_of=0.0)
    limiter = peered(loop, peers)

    async def main() -> list[float | None]:
        await asyncio.sleep(1.0)
        refused = await limiter.acquire(20_000)
        limiter.settle(refused, 0)
        limiter.on_throttle(refused, 1.0)
        stale = limiter.token_limit
        peers.view = PeerView(4, tokens=((0.0, 50_000.0), (1.0, 30_000.0)), as_of=1.5)
        limiter._view()  # their files caught up with the refused request
        return [stale, limiter.token_limit]

    # 80,000 sent by the others + the 20,000 refused: the job may send less than 100,000.
    assert run(loop, main) == [None, 25_000]


def test_a_429_while_the_wave_starts_counts_the_others_as_trying_the_same(loop: VirtualTimeLoop) -> None:
    """Before every task of the wave has published, a task whose first request is refused
    takes each other task to have tried as much: a bound of four requests, not one."""
    limiter = peered(loop, Peers(4))
    limiter.peers = lambda: None  # not all the wave's files are there yet

    async def main() -> float | None:
        refused = await limiter.acquire(20_000)
        limiter.settle(refused, 0)
        limiter.on_throttle(refused, 1.0)
        return limiter.token_limit

    assert run(loop, main) == 20_000  # a quarter of the 80,000 the job may not reach


@pytest.mark.parametrize("keep_share", [False, True])
def test_a_reading_with_nothing_in_the_window_follows_a_limit_that_rose(
    loop: VirtualTimeLoop, keep_share: bool
) -> None:
    """The room read when the job had sent nothing for a window is the whole limit now,
    whatever the metering: it replaces the tighter bound of a minute ago. A reading with
    sends in the window may be loose (a clock minute that reset) and only tightens. With
    limits.max_share, other clients' traffic shares the room: the job rises only as the
    tight bound ages out."""
    peers = Peers(2)
    limiter = peered(loop, peers, 100_000 if keep_share else None, keep_share=keep_share)

    async def send(room: int) -> float | None:
        grant = await limiter.acquire(1_000)
        limiter.settle(grant, 1_000)
        limiter.on_success(grant, remaining_tokens=room)
        return limiter.token_limit

    async def main() -> list[float | None]:
        first = await send(9_000)  # the job's 1,000 + 9,000: 10,000, half each
        loose = await send(20_000)  # 2,000 sent + 20,000: looser, the 10,000 stays
        await asyncio.sleep(MINUTE + 1)  # the window empties
        return [first, loose, await send(14_000)]

    assert run(loop, main) == [5_000, 5_000, 5_000 if keep_share else 7_500]


def test_a_pacer_joining_a_busy_job_starts_from_the_bound_its_peers_learned(loop: VirtualTimeLoop) -> None:
    """A task that starts while the others fill the window knows no limit of its own (none
    configured); from their files it takes the bound they learned and waits for room,
    instead of probing into a full window for a 429."""
    peers = Peers(2, tokens=((0.0, 19_000.0),), tokens_bound=20_000.0)
    limiter = peered(loop, peers)
    log: list[tuple[str, float, float]] = []

    async def main() -> None:
        await asyncio.sleep(1.0)
        await acquire_logged(limiter, 4_000, "first", log)

    run(loop, main)
    assert limiter.token_limit == 10_000
    assert log[0][0] == "first" and log[0][1] == pytest.approx(MINUTE)  # the 19,000 aged out


def test_with_max_share_the_job_spends_its_first_window_at_once_then_evenly(loop: VirtualTimeLoop) -> None:
    """limits.max_share: others' traffic shares the window, so after the first window's burst
    the job sends at an even rate (bursts of at most SMOOTH_BURST of its limit), not a whole
    window at once each time the last burst ages out: a limit that dips after such a burst
    would leave the others no room for a minute. Alone, the job bursts each window."""

    def sends(keep_share: bool) -> list[float]:
        limiter = RateLimiter(6_000, None, clock=loop.time, headroom=0.0, keep_share=keep_share)
        times: list[float] = []

        async def main() -> None:
            for _ in range(20):
                grant = await limiter.acquire(600)
                times.append(loop.time() - start)
                limiter.settle(grant, 600)

        start = loop.time()
        run(loop, main)
        return times

    assert sends(keep_share=False) == pytest.approx([0.0] * 10 + [MINUTE] * 10, abs=1e-6)
    # 10 x 600 at once; then the first window's 6,000 age out together, and 600 a tenth of a window.
    evenly = [MINUTE * (1 + k / 10) for k in range(10)]
    assert sends(keep_share=True) == pytest.approx([0.0] * 10 + evenly, abs=1e-6)


def test_the_first_worker_spends_past_the_bound_the_room_a_success_just_reported(
    loop: VirtualTimeLoop,
) -> None:
    """The bound is the tightest reading of the last windows; a success's room is what the
    service would admit right then, whatever its metering (here the limit rose from 9,000 to
    10,000). Within a second of the request that read it, once the job is at its bound, one
    worker spends it: never past the configured quota, never a room another worker may
    spend too (a peer ranked first spends it), and not once a 429 said otherwise."""

    def waits(
        quota: float, late_s: float = 0.0, rank: int | None = None, refused: bool = False
    ) -> list[float]:
        limiter = RateLimiter(quota, None, clock=loop.time, wall=loop.time, headroom=0.0)
        limiter.settle(limiter._take(0, 0.0, 0), 0)  # heard: the first request need not go alone
        theirs = 0.0
        if rank is not None:  # a peer sent 5,000 just now
            theirs = 5_000.0
            peer = PeerView(2, tokens=((loop.time(), theirs),), rank=rank)
            limiter.peers = lambda: peer
        waited: list[float] = []

        async def send(room: float) -> None:
            grant = await limiter.acquire(1_000)
            waited.append(grant.waited_s)
            limiter.settle(grant, 1_000)
            limiter.on_success(grant, remaining_tokens=room)

        async def main() -> None:
            await send(8_000 - theirs)  # the job's 1,000 + the room + theirs: the bound is 9,000
            for k in range(2, int(9_000 - theirs) // 1_000 + 1):
                await send(10_000 - theirs - k * 1_000)  # the limit rose to 10,000: a looser reading
            await asyncio.sleep(late_s)
            if refused:
                limiter.on_throttle(None, 0.0)  # another request (a retry, say) was refused
            await send(0)

        run(loop, main)
        return waited

    assert waits(20_000) == [0.0] * 10  # the tenth fits in the room the ninth's answer reported
    assert waits(9_500)[-1] > 50  # past the configured quota: it waits for the first to age out
    assert waits(20_000, late_s=1.5)[-1] > 50  # a stale room
    assert waits(20_000, refused=True)[-1] > 50
    # A peer sent 5,000: at 9,000 the job is at its bound, and the first by rank spends the room.
    assert waits(20_000, rank=0) == [0.0] * 5
    assert waits(20_000, rank=1)[-1] > 50
