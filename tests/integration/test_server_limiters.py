"""The local endpoint's three quota models and its wandering TPM limit.

First on a fake clock with exact assertions, then over real sockets with scaled windows.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest

from sparkembed.server.__main__ import build_parser, settings_from_args
from sparkembed.server.meters import FixedWindow, SlidingWindow, TokenBucket
from sparkembed.server.quota import Quota, Wander


class FakeClock:
    """A clock that moves only when told to (seconds); starts on a minute boundary."""

    def __init__(self) -> None:
        self.now = 6000.0

    def __call__(self) -> float:
        return self.now


def words(n: int) -> str:
    """A text of exactly ``n`` tokens (hash model)."""
    return " ".join(["word"] * n)


# ---------------------------------------------------------------- meters on a fake clock


def test_sliding_window_frees_each_charge_a_window_after_it() -> None:
    clock = FakeClock()
    window = SlidingWindow(lambda: 100, 60.0, clock)
    window.take(60)
    clock.now += 20
    window.take(30)
    assert window.remaining() == 10
    assert window.wait_s(20) == 40.0  # the 60 ages out at t=60
    assert window.wait_s(80) == 60.0  # needs the 30 gone too, at t=80
    clock.now += 40
    assert (window.wait_s(20), window.remaining()) == (0.0, 70)


def test_sliding_window_admits_an_oversized_cost_only_into_an_empty_window() -> None:
    clock = FakeClock()
    window = SlidingWindow(lambda: 100, 60.0, clock)
    window.take(10)
    clock.now += 5
    assert window.wait_s(250) == 55.0
    clock.now += 55
    assert window.wait_s(250) == 0.0
    window.take(250)
    assert (window.remaining(), window.wait_s(1)) == (0, 60.0)


def test_fixed_window_resets_at_the_clock_boundary_where_sliding_does_not() -> None:
    clock = FakeClock()  # t = 6000, a multiple of 60
    fixed = FixedWindow(lambda: 100, 60.0, clock)
    sliding = SlidingWindow(lambda: 100, 60.0, clock)
    clock.now += 50
    for meter in (fixed, sliding):
        meter.take(90)
    assert fixed.wait_s(50) == 10.0  # the count resets at t = 6060
    assert sliding.wait_s(50) == 60.0  # the 90 ages out at t = 6110
    clock.now += 10
    assert (fixed.wait_s(50), fixed.remaining()) == (0.0, 100)
    assert (sliding.wait_s(50), sliding.remaining()) == (50.0, 10)


def test_fixed_window_admits_an_oversized_cost_at_the_start_of_a_window() -> None:
    clock = FakeClock()
    fixed = FixedWindow(lambda: 100, 60.0, clock)
    assert fixed.wait_s(500) == 0.0
    fixed.take(500)
    clock.now += 59
    assert (fixed.remaining(), fixed.wait_s(1)) == (0, 1.0)
    clock.now += 1
    assert fixed.wait_s(500) == 0.0


def test_token_bucket_meter_refills_continuously() -> None:
    clock = FakeClock()
    bucket = TokenBucket(lambda: 600, 60.0, clock)
    bucket.take(600)
    assert bucket.wait_s(100) == 10.0
    clock.now += 10
    assert bucket.remaining() == 100


def test_reset_forgets_every_charge() -> None:
    clock = FakeClock()
    for meter in (TokenBucket, SlidingWindow, FixedWindow):
        m = meter(lambda: 100, 60.0, clock)
        m.take(100)
        m.reset()
        assert (m.remaining(), m.wait_s(100)) == (100, 0.0), meter.__name__


# ---------------------------------------------------------------- the quota on a fake clock


@pytest.mark.parametrize("limiter", ["sliding-window", "fixed-window"])
def test_window_models_refuse_what_the_minute_cannot_hold(limiter: Any) -> None:
    clock = FakeClock()
    quota = Quota(tokens_per_minute=600, requests_per_minute=None, clock=clock, limiter=limiter)
    first = quota.admit(500)
    assert (first.admitted, first.remaining_tokens, first.remaining_requests) == (True, 100, None)
    clock.now += 30
    refused = quota.admit(200)  # a token bucket would have refilled 300 by now
    assert (refused.admitted, refused.retry_after_s, refused.remaining_tokens) == (False, 30.0, 100)
    clock.now += 30
    admitted = quota.admit(200)
    assert (admitted.admitted, admitted.remaining_tokens) == (True, 400)


@pytest.mark.parametrize("limiter", ["token-bucket", "sliding-window", "fixed-window"])
def test_every_model_counts_requests_over_ten_second_windows(limiter: Any) -> None:
    clock = FakeClock()
    quota = Quota(tokens_per_minute=None, requests_per_minute=60, clock=clock, limiter=limiter)
    remaining = [quota.admit(1).remaining_requests for _ in range(10)]  # 60 per minute = 10 per 10 s
    assert remaining == list(range(9, -1, -1))
    refused = quota.admit(1)
    assert not refused.admitted
    # The bucket refills one request a second; the windows free all ten at t = 10.
    assert refused.retry_after_s == (1.0 if limiter == "token-bucket" else 10.0)
    clock.now += 10
    assert quota.admit(1).admitted


def test_window_scale_shrinks_the_windows() -> None:
    clock = FakeClock()
    quota = Quota(600, 60, clock, limiter="sliding-window", window_scale=0.05)
    assert quota.admit(600).admitted
    refused = quota.admit(1)
    assert refused.retry_after_s == pytest.approx(3.0)  # a 3 s "minute"
    clock.now += 3
    assert quota.admit(1).admitted


def test_the_wander_stays_within_its_spread_moves_smoothly_and_repeats_with_its_seed() -> None:
    clock = FakeClock()
    wander = Wander(0.05, 10.0, seed=7, clock=clock)
    factors = []
    for _ in range(6000):  # 10 minutes in 0.1 s steps
        factors.append(wander())
        clock.now += 0.1
    assert all(0.95 <= f <= 1.05 for f in factors)
    assert max(factors) > 1.03 and min(factors) < 0.97  # it does wander
    assert max(abs(b - a) for a, b in zip(factors, factors[1:], strict=False)) < 0.002  # no jumps
    clock.now = 6000.0
    again = Wander(0.05, 10.0, seed=7, clock=clock)
    assert again() == factors[0]
    assert Wander(0.05, 10.0, seed=8, clock=clock)() != factors[0]


@pytest.mark.parametrize("limiter", ["sliding-window", "fixed-window"])
def test_a_jittered_quota_admits_within_the_jitter_of_the_limit(limiter: Any) -> None:
    clock = FakeClock()
    quota = Quota(10_000, None, clock, limiter=limiter, tpm_jitter=0.1, seed=3)
    per_minute = []
    for _ in range(20):
        admitted = 0
        while quota.admit(10).admitted:
            admitted += 10
        per_minute.append(admitted)
        clock.now += 60
    assert all(9_000 <= n <= 11_000 for n in per_minute)
    assert len(set(per_minute)) > 5  # the limit moved


def test_the_cli_exposes_the_limiter_options() -> None:
    parser = build_parser()
    settings = settings_from_args(
        parser.parse_args(["--limiter", "fixed-window", "--tpm-jitter", "0.05", "--window-scale", "0.1"])
    )
    assert (settings.limiter, settings.tpm_jitter, settings.window_scale) == ("fixed-window", 0.05, 0.1)
    defaults = settings_from_args(parser.parse_args([]))
    assert (defaults.limiter, defaults.tpm_jitter, defaults.window_scale) == ("token-bucket", 0.0, 1.0)
    for bad in (["--limiter", "leaky"], ["--tpm-jitter", "1.5"], ["--window-scale", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# ---------------------------------------------------------------- over real sockets

SCALE = 0.05
"""A 3 s "minute" and 0.5 s request windows."""


def post(url: str, key: str, tokens: int) -> tuple[int, dict[str, str]]:
    """POST one input of ``tokens`` tokens; return the status and lower-cased headers."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.request("POST", "/embeddings", json.dumps({"input": [words(tokens)]}), {"api-key": key})
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def remaining(headers: dict[str, str]) -> tuple[int, int]:
    return int(headers["x-ratelimit-remaining-tokens"]), int(headers["x-ratelimit-remaining-requests"])


@pytest.mark.integration
@pytest.mark.parametrize("limiter", ["sliding-window", "fixed-window"])
def test_a_window_model_over_http_refuses_then_admits_when_retry_after_says(
    start_endpoint: Any, endpoint_key: str, limiter: str
) -> None:
    endpoint = start_endpoint(
        "--model", "hash", "--tpm", "600", "--rpm", "6000", "--limiter", limiter, "--window-scale", str(SCALE)
    )
    status, headers = post(endpoint.url, endpoint_key, 400)
    assert status == 200
    assert remaining(headers) == (200, 999)  # 6000 RPM: 1000 requests a window
    status, headers = post(endpoint.url, endpoint_key, 400)
    if status == 200:  # a fixed window reset in between: fill it again
        assert limiter == "fixed-window"
        status, headers = post(endpoint.url, endpoint_key, 400)
    assert status == 429
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 3_000  # the 3 s window frees the first charge
    assert headers["retry-after"] == str(max(1, -(-wait_ms // 1000)))
    assert remaining(headers)[0] <= 200
    time.sleep(wait_ms / 1000 + 0.05)
    status, headers = post(endpoint.url, endpoint_key, 400)
    assert status == 200
    assert remaining(headers)[0] == 200
    assert endpoint.stats()["responses"]["429"] >= 1


@pytest.mark.integration
def test_the_default_model_is_still_a_token_bucket_over_http(start_endpoint: Any, endpoint_key: str) -> None:
    endpoint = start_endpoint("--model", "hash", "--tpm", "600", "--window-scale", str(SCALE))
    assert post(endpoint.url, endpoint_key, 600)[0] == 200
    status, headers = post(endpoint.url, endpoint_key, 100)
    # 600 tokens per 3 s refill 200 a second: 100 tokens come back within half a second.
    assert status == 429 and int(headers["retry-after-ms"]) <= 500
    time.sleep(int(headers["retry-after-ms"]) / 1000 + 0.05)
    assert post(endpoint.url, endpoint_key, 100)[0] == 200


@pytest.mark.integration
def test_an_oversized_request_goes_into_an_empty_sliding_window(
    start_endpoint: Any, endpoint_key: str
) -> None:
    endpoint = start_endpoint(
        "--model", "hash", "--tpm", "300", "--limiter", "sliding-window", "--window-scale", str(SCALE)
    )
    assert post(endpoint.url, endpoint_key, 100)[0] == 200
    status, headers = post(endpoint.url, endpoint_key, 1000)  # more than a whole minute
    assert status == 429 and int(headers["retry-after-ms"]) <= 3_000
    time.sleep(int(headers["retry-after-ms"]) / 1000 + 0.05)
    status, headers = post(endpoint.url, endpoint_key, 1000)
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] == "0"
