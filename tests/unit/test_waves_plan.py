"""Waves bounded by rows, tokens and time: the bucket ranges handed out, exactly."""

from __future__ import annotations

from sparkembed.core.waves_plan import BUCKETS, WaveLimits, WavePlanner


def all_waves(planner: WavePlanner) -> list[tuple[int, int]]:
    out = []
    while (wave := planner.next_wave()) is not None:
        out.append(wave)
    return out


def test_a_small_table_is_one_wave_without_a_filter() -> None:
    planner = WavePlanner(rows=1_000, tokens=20_000, limits=WaveLimits())
    assert planner.whole and planner.waves_planned == 1
    assert all_waves(planner) == [(0, BUCKETS)]


def test_rows_bound_the_wave() -> None:
    planner = WavePlanner(rows=200_000, tokens=1_000, limits=WaveLimits(rows=50_000))
    waves = all_waves(planner)
    assert len(waves) == 4 and waves[0] == (0, BUCKETS // 4) and waves[-1][1] == BUCKETS


def test_tokens_bound_the_wave_when_rows_do_not() -> None:
    planner = WavePlanner(rows=10, tokens=12_000_000, limits=WaveLimits(tokens=5_000_000))
    assert planner.waves_planned == 3


def test_a_low_quota_bounds_the_wave_by_time() -> None:
    # The tester's case: 10,000 rows of ~55 tokens at 2,000 TPM is 275 minutes of work.
    limits = WaveLimits(rows=2_000, seconds=300, tokens_per_minute=2_000)
    planner = WavePlanner(rows=10_000, tokens=550_000, limits=limits)
    assert planner.waves_planned == 55  # 5 minutes each, not 5 waves of 55 minutes


def test_a_wave_that_ran_long_narrows_the_next_ones() -> None:
    planner = WavePlanner(rows=100_000, tokens=1_000_000, limits=WaveLimits(rows=50_000, seconds=300))
    assert planner.next_wave() == (0, BUCKETS // 2)
    planner.record(seconds=1_200, tokens=500_000)  # 4x too long: no quota was given to plan by
    assert planner.next_wave() == (BUCKETS // 2, BUCKETS // 2 + BUCKETS // 8)
    assert planner.waves_planned == 2 + 3  # what is left, at the new width
    planner.record(seconds=10, tokens=1_000)  # a fast wave does not widen them again
    assert planner.next_wave() == (BUCKETS // 2 + BUCKETS // 8, BUCKETS // 2 + 2 * (BUCKETS // 8))


def test_a_wave_that_billed_too_much_narrows_the_next_ones() -> None:
    planner = WavePlanner(rows=100_000, tokens=100, limits=WaveLimits(rows=50_000, tokens=1_000))
    planner.next_wave()
    planner.record(seconds=1, tokens=4_000)  # the estimate was 40x low
    assert planner.next_wave() == (BUCKETS // 2, BUCKETS // 2 + BUCKETS // 8)


def test_every_bucket_is_in_exactly_one_wave() -> None:
    planner = WavePlanner(rows=7, tokens=7, limits=WaveLimits(rows=1))
    waves = all_waves(planner)
    assert waves[0][0] == 0 and waves[-1][1] == BUCKETS
    assert all(a[1] == b[0] for a, b in zip(waves, waves[1:], strict=False))
    assert planner.next_wave() is None
