"""A pool of deployments, without a network: the breaker, the chooser, the preflight's check
that the deployments serve one vector space, and the pool's config. Time is a fake clock."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import build_config

from sparkembed.config import load_config
from sparkembed.core.context import RunContext
from sparkembed.core.pool import (
    COOLDOWN_S,
    PROBE_WAIT_S,
    Breaker,
    Route,
    check_same_space,
    choose,
    ready_in_s,
    verdict,
)
from sparkembed.core.ratelimit import RateLimiter
from sparkembed.errors import ConfigError, ServiceError, TransportError
from sparkembed.spark.secrets import apply_secret


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def done(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """The value of a coroutine that finishes without waiting (the limiter's fast path)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine waited")


# -- the breaker ---------------------------------------------------------------------------


def test_three_strikes_open_the_breaker_and_a_success_between_them_forgives() -> None:
    breaker = Breaker(clock=Clock())
    breaker.failed("strike")
    breaker.failed("strike")
    breaker.succeeded()
    breaker.failed("strike")
    breaker.failed("strike")
    assert breaker.state == "closed"
    breaker.failed("strike")
    assert breaker.state == "open"
    assert breaker.ready_in_s() == COOLDOWN_S


def test_out_opens_at_once_and_after_the_cooldown_one_probe_goes() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)
    breaker.failed("out")
    assert (breaker.state, breaker.admit()) == ("open", False)
    clock.now += COOLDOWN_S
    assert breaker.state == "half-open"
    assert breaker.admit() is True  # the probe
    assert breaker.admit() is False  # the others wait for its answer
    assert breaker.ready_in_s() == PROBE_WAIT_S
    breaker.succeeded()
    assert (breaker.state, breaker.admit()) == ("closed", True)


def test_a_failed_probe_doubles_the_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock, cooldown_s=10.0, max_cooldown_s=25.0)
    breaker.failed("out")
    clock.now += 10.0
    assert breaker.admit()
    breaker.failed("strike")  # one strike is enough for a probe
    assert breaker.ready_in_s() == 20.0
    clock.now += 20.0
    assert breaker.admit()
    breaker.failed("strike")
    assert breaker.ready_in_s() == 25.0  # capped
    clock.now += 25.0
    assert breaker.admit()
    breaker.succeeded()
    breaker.failed("out")
    assert breaker.ready_in_s() == 10.0  # a success resets the cooldown


def test_an_exhausted_quota_keeps_the_deployment_out_until_its_retry_after() -> None:
    breaker = Breaker(clock=Clock(), cooldown_s=10.0)
    breaker.failed("out", hold_s=90.0)
    assert breaker.ready_in_s() == 90.0


def test_failures_of_requests_sent_before_it_opened_change_nothing() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)
    breaker.failed("out")
    clock.now += 4.0
    breaker.failed("strike")
    assert breaker.ready_in_s() == COOLDOWN_S - 4.0
    clock.now += COOLDOWN_S
    breaker.failed("strike")  # half-open, but not the probe's answer
    assert breaker.state == "half-open" and breaker.admit()


def test_a_probe_that_was_never_sent_lets_another_go() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)
    breaker.failed("out")
    clock.now += COOLDOWN_S
    assert breaker.admit()
    breaker.release()
    assert breaker.admit()


@pytest.mark.parametrize(
    ("error", "action", "expected"),
    [
        (TransportError("connection refused", unreachable=True), "retry", "out"),
        (TransportError("connection reset"), "retry", "strike"),
        (ServiceError(503, None, "busy"), "retry", "strike"),
        (ServiceError(500, None, "oops"), "retry", "strike"),
        (ServiceError(408, None, "timeout"), "retry", "strike"),
        (ServiceError(401, None, "bad key"), "config_error", "out"),
        (ServiceError(403, None, "forbidden"), "config_error", "out"),
        (ServiceError(404, None, "no deployment"), "config_error", "out"),
        (ServiceError(429, None, "quota", retry_after_s=3600), "quota_exhausted", "out"),
        (ServiceError(429, None, "slow down", retry_after_s=1), "retry", "alive"),
        (ServiceError(400, None, "bad input"), "give_up", "alive"),
        (ServiceError(422, None, "no dimensions"), "config_error", "alive"),
    ],
)
def test_what_a_failure_says_of_its_deployment(error: Any, action: str, expected: str) -> None:
    assert verdict(error, action) == expected


# -- choosing a deployment -----------------------------------------------------------------


def routes_for(clock: Clock, *tokens_per_minute: float) -> list[Route]:
    config = build_config({"endpoint": {"url": "https://a.example/openai/v1", "model": "m"}})
    return [
        Route(f"d{i}", None, RateLimiter(tpm, None, clock=clock, headroom=0), config, Breaker(clock=clock))  # type: ignore[arg-type]
        for i, tpm in enumerate(tokens_per_minute)
    ]


def test_traffic_follows_the_quota_two_to_one() -> None:
    """Requests as fast as the quotas allow for five minutes: tokens split 2:1."""
    clock = Clock()
    routes = routes_for(clock, 20_000, 10_000)
    sent = {"d0": 0, "d1": 0}
    for _ in range(3000):  # 5 minutes in 0.1 s steps
        clock.now += 0.1
        route = choose(routes, 100)
        assert route is not None
        if route.limiter.load(100) <= 1.0:
            grant = done(route.limiter.acquire(100))
            route.limiter.settle(grant, 100)
            sent[route.name] += 100
    assert 1.9 <= sent["d0"] / sent["d1"] <= 2.1, sent
    assert sum(sent.values()) >= 0.95 * 5 * 30_000


def test_a_paused_deployment_gets_the_next_requests() -> None:
    clock = Clock()
    routes = routes_for(clock, 20_000, 10_000)
    routes[0].limiter.on_throttle(None, 5.0)  # a 429: d0 pauses 5 s
    assert choose(routes, 100) is routes[1]
    clock.now += 5.0
    assert choose(routes, 100) is routes[0]


def test_a_deployment_that_is_out_is_skipped_and_none_when_all_are() -> None:
    clock = Clock()
    routes = routes_for(clock, 20_000, 10_000)
    routes[0].breaker.failed("out")
    assert choose(routes, 100) is routes[1]
    routes[1].breaker.failed("out", hold_s=30.0)
    assert choose(routes, 100) is None
    assert ready_in_s(routes) == COOLDOWN_S
    clock.now += COOLDOWN_S
    assert choose(routes, 100) is routes[0]  # its probe


# -- one vector space ----------------------------------------------------------------------


def unit(seed: int, dims: int = 8) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=dims).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_deployments_answering_the_same_vector_make_a_pool() -> None:
    v = unit(1)
    check_same_space([("a", "m", v), ("b", "m", v + 1e-6), ("c", "m", v.copy())])


@pytest.mark.parametrize(
    ("other", "said"),
    [
        (("b", "other-model", unit(1)), "deployment b serves model 'other-model', but a serves 'm'"),
        (("b", "m", unit(1, dims=16)), "deployment b answers 16 dimensions, but a answers 8"),
        (("b", "m", unit(2)), "deployment b answers another vector than a for the same text"),
    ],
)
def test_a_pool_that_would_mix_vector_spaces_is_refused(other: Any, said: str) -> None:
    with pytest.raises(ConfigError, match="One table must never mix vector spaces") as refused:
        check_same_space([("a", "m", unit(1)), other])
    assert said in str(refused.value)


# -- config --------------------------------------------------------------------------------

A, B = "https://a.openai.azure.com/openai/v1", "https://b.openai.azure.com/openai/v1"
POOL = [
    {"url": A, "tokens_per_minute": 240_000, "requests_per_minute": 1440},
    {"url": B, "tokens_per_minute": 120_000, "key_env": "KEY_B"},
]


def test_url_and_pool_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="endpoint.url and endpoint.pool exclude each other"):
        build_config({"endpoint": {"url": "https://a.example/openai/v1", "pool": POOL}})


def test_a_pool_names_each_deployment_once_and_carries_the_quotas() -> None:
    with pytest.raises(ConfigError, match="lists a.openai.azure.com/openai/v1 twice"):
        build_config({"endpoint": {"pool": [POOL[0], POOL[0]]}})
    with pytest.raises(ConfigError, match="give each endpoint.pool entry its own tokens_per_minute"):
        build_config({"endpoint": {"pool": POOL}, "limits": {"tokens_per_minute": 1000}})
    with pytest.raises(ConfigError, match="tokens_per_minute"):
        build_config({"endpoint": {"pool": [{"url": "https://c.example/openai/v1"}]}})


def test_each_deployment_gets_its_own_url_model_key_and_quota() -> None:
    pool = [*POOL, {"url": A, "tokens_per_minute": 1000, "model": "small-2"}]
    config = build_config(
        {"endpoint": {"model": "small", "pool": pool}, "limits": {"max_share": 0.5}},
        key="shared-key-0123456789",
    )
    config = apply_secret(config, environ={"KEY_B": "key-of-b-0123456789"})
    names = [name for name, _ in config.deployments()]
    assert names == [
        "a.openai.azure.com/openai/v1",
        "b.openai.azure.com/openai/v1",
        "a.openai.azure.com/openai/v1/small-2",
    ]
    (_, a), (_, b), (_, a2) = config.deployments()
    assert (a.endpoint.url, a.endpoint.model, a.endpoint.pool) == (POOL[0]["url"], "small", ())
    limits = a.limits
    assert (limits.tokens_per_minute, limits.requests_per_minute, limits.max_share) == (240_000, 1440, 0.5)
    assert (b.limits.tokens_per_minute, b.limits.requests_per_minute) == (120_000, None)
    assert a2.endpoint.model == "small-2"
    assert a.auth.key is not None and a.auth.key.get_secret_value() == "shared-key-0123456789"
    assert b.auth.key is not None and b.auth.key.get_secret_value() == "key-of-b-0123456789"
    assert b.auth.key_env == "KEY_B"
    assert "key-of-b" not in repr(config) and "key-of-b" not in str(config.model_dump())
    assert config.quota_tokens_per_minute == 361_000


def test_a_pool_key_env_that_is_empty_is_named() -> None:
    config = build_config({"endpoint": {"pool": POOL}}, key="shared-key-0123456789")
    with pytest.raises(ConfigError, match=r"\$KEY_B is empty"):
        apply_secret(config, environ={})


def test_pool_keys_are_never_written_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(f"endpoint:\n  pool:\n    - {{url: '{A}', tokens_per_minute: 5, key: k}}\n")
    with pytest.raises(ConfigError, match="name an env var in key_env"):
        load_config(path)


def test_the_fingerprint_is_the_same_whatever_the_pool() -> None:
    """A rerun through another pool of the same model skips the rows already done."""
    served = RunContext(served_model="text-embedding-3-small", served_dimensions=1536)
    one = build_config({"endpoint": {"url": "https://a.openai.azure.com/openai/v1", "model": "small"}})
    pool = build_config({"endpoint": {"model": "small", "pool": POOL}})
    other = build_config({"endpoint": {"model": "small", "pool": POOL[1:]}})
    assert one.fingerprint(served) == pool.fingerprint(served) == other.fingerprint(served)
    assert one.fingerprint() == pool.fingerprint() == other.fingerprint()
