"""Retry classification, backoff, retry-after parsing and config-error messages, case by case."""

from __future__ import annotations

import asyncio
from email.utils import format_datetime, parsedate_to_datetime

import pytest
from multidict import CIMultiDict

from sparkembed.config import RetryConfig
from sparkembed.core.retry import Decision, RetryPolicy, config_error_for, remaining_quota, retry_after_s
from sparkembed.errors import ConfigError, EndpointConfigError, ServiceError, TransportError

CONFIG = RetryConfig(
    max_attempts=8, max_wait_s=60.0, total_timeout_s=600.0, backoff_initial_s=0.5, backoff_max_s=20
)


def policy(jitter: float = 0.0, **overrides: float) -> RetryPolicy:
    """A policy whose random() always returns ``jitter``."""
    return RetryPolicy(CONFIG.model_copy(update=overrides), random=lambda: jitter)


def error(status: int, retry_after: float | None = None, code: str | None = None) -> ServiceError:
    return ServiceError(status, code, "it went wrong", retry_after_s=retry_after)


# --- classification ---------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_retry_after_backoff(status: int) -> None:
    decision = policy().decide(error(status), attempt=1, elapsed_s=0.0)
    assert decision == Decision("retry", 0.25, f"{status} error: it went wrong; backoff 0.25 s")


def test_transport_error_retries_after_backoff() -> None:
    decision = policy(jitter=1.0).decide(TransportError("connection reset"), 2, 0.0)
    assert decision == Decision("retry", 1.0, "transport error: connection reset; backoff 1 s")


@pytest.mark.parametrize("status", [401, 403, 404, 422])
def test_setup_statuses_are_config_errors(status: int) -> None:
    decision = policy().decide(error(status, code="bad_setup"), attempt=1, elapsed_s=0.0)
    assert decision == Decision("config_error", 0.0, f"{status} bad_setup: it went wrong")


@pytest.mark.parametrize("status", [400, 405, 409, 413, 415, 418, 501, 505])
def test_other_statuses_give_up(status: int) -> None:
    decision = policy().decide(error(status), attempt=1, elapsed_s=0.0)
    assert decision == Decision("give_up", 0.0, f"{status} error: it went wrong")


def test_400_gives_up_even_with_a_retry_after() -> None:
    decision = policy().decide(error(400, retry_after=1.0), attempt=1, elapsed_s=0.0)
    assert decision.action == "give_up"


@pytest.mark.parametrize(
    "exc", [ValueError("boom"), asyncio.TimeoutError(), KeyboardInterrupt(), ConfigError("x")]
)
def test_unknown_errors_give_up(exc: BaseException) -> None:
    decision = policy().decide(exc, attempt=1, elapsed_s=0.0)
    assert decision.action == "give_up"
    assert decision.reason.startswith(f"unexpected {type(exc).__name__}")


# --- retry-after from the service --------------------------------------------------


def test_429_retry_after_is_honoured_without_jitter() -> None:
    decision = policy(jitter=0.0).decide(error(429, retry_after=1.5), attempt=1, elapsed_s=0.0)
    assert decision == Decision("retry", 1.5, "429 error: it went wrong; retry-after 1.5 s")


def test_retry_after_jitter_is_at_most_a_tenth() -> None:
    decision = policy(jitter=1.0).decide(error(429, retry_after=1.5), attempt=1, elapsed_s=0.0)
    assert decision.delay_s == pytest.approx(1.65)


def test_retry_after_jitter_is_at_most_one_second() -> None:
    decision = policy(jitter=1.0).decide(error(429, retry_after=30.0), attempt=1, elapsed_s=0.0)
    assert decision.delay_s == 31.0


def test_retry_after_zero_retries_at_once() -> None:
    decision = policy(jitter=1.0).decide(error(429, retry_after=0.0), attempt=1, elapsed_s=0.0)
    assert decision == Decision("retry", 0.0, "429 error: it went wrong; retry-after 0 s")


def test_retry_after_wins_over_backoff_on_a_503() -> None:
    decision = policy().decide(error(503, retry_after=2.0), attempt=5, elapsed_s=0.0)
    assert decision.delay_s == 2.0


def test_429_asking_longer_than_max_wait_is_quota_exhausted() -> None:
    decision = policy().decide(error(429, retry_after=61.0), attempt=1, elapsed_s=0.0)
    assert decision == Decision(
        "quota_exhausted",
        0.0,
        "429 error: it went wrong; retry-after 61 s exceeds retry.max_wait_s=60",
    )


def test_429_asking_exactly_max_wait_retries() -> None:
    decision = policy().decide(error(429, retry_after=60.0), attempt=1, elapsed_s=0.0)
    assert decision == Decision("retry", 60.0, "429 error: it went wrong; retry-after 60 s")


def test_quota_exhaustion_is_reported_even_on_the_last_attempt() -> None:
    decision = policy().decide(error(429, retry_after=3600.0), attempt=8, elapsed_s=0.0)
    assert decision.action == "quota_exhausted"


def test_long_retry_after_on_a_503_is_not_quota_but_hits_the_total_timeout() -> None:
    decision = policy().decide(error(503, retry_after=3600.0), attempt=1, elapsed_s=0.0)
    assert decision.action == "give_up"
    assert "retry.total_timeout_s=600" in decision.reason


# --- limits -------------------------------------------------------------------------


def test_attempts_are_limited() -> None:
    p = policy(max_attempts=3)
    assert p.decide(error(500), attempt=2, elapsed_s=0.0).action == "retry"
    assert p.decide(error(500), attempt=3, elapsed_s=0.0) == Decision(
        "give_up", 0.0, "500 error: it went wrong; gave up after 3 attempts"
    )


def test_a_429_is_bounded_by_time_not_by_attempts() -> None:
    # A busy quota is not an error: the 1,024-row request of issue 15 failed on its 8th 429.
    p = policy(max_attempts=3, total_timeout_s=100.0)
    assert p.decide(error(429, retry_after=1.0), attempt=50, elapsed_s=98.0).action == "retry"
    assert p.decide(error(429), attempt=50, elapsed_s=0.0).action == "retry"
    assert p.decide(error(429, retry_after=1.0), attempt=50, elapsed_s=99.5).action == "give_up"


def test_one_attempt_means_no_retry() -> None:
    decision = policy(max_attempts=1).decide(TransportError("reset"), attempt=1, elapsed_s=0.0)
    assert decision == Decision("give_up", 0.0, "transport error: reset; gave up after 1 attempts")


def test_total_timeout_allows_a_wait_ending_exactly_on_it() -> None:
    p = policy(jitter=1.0, total_timeout_s=10.0)
    assert p.decide(error(502), attempt=1, elapsed_s=9.5) == Decision(
        "retry", 0.5, "502 error: it went wrong; backoff 0.5 s"
    )


def test_total_timeout_refuses_a_wait_ending_past_it() -> None:
    p = policy(jitter=1.0, total_timeout_s=10.0)
    assert p.decide(error(502), attempt=1, elapsed_s=9.6) == Decision(
        "give_up",
        0.0,
        "502 error: it went wrong; waiting 0.5 s more would pass retry.total_timeout_s=10",
    )


def test_total_timeout_counts_the_retry_after() -> None:
    p = policy(total_timeout_s=10.0)
    assert p.decide(error(429, retry_after=2.0), attempt=1, elapsed_s=8.0).action == "retry"
    assert p.decide(error(429, retry_after=2.5), attempt=1, elapsed_s=8.0).action == "give_up"


# --- backoff ------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_at_full_jitter() -> None:
    p = policy(jitter=1.0)
    assert [p.backoff_s(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 20, 20]


def test_backoff_is_half_the_cap_at_zero_jitter() -> None:
    p = policy(jitter=0.0)
    assert [p.backoff_s(n) for n in range(1, 9)] == [0.25, 0.5, 1, 2, 4, 8, 10, 10]


def test_backoff_jitter_lies_between_half_and_all_of_the_cap() -> None:
    p = policy(jitter=0.5)
    assert p.backoff_s(3) == 1.5


def test_backoff_for_a_huge_attempt_is_the_cap() -> None:
    assert policy(jitter=1.0).backoff_s(10_000) == 20.0


def test_backoff_uses_the_real_random_within_bounds() -> None:
    p = RetryPolicy(CONFIG)
    delays = [p.backoff_s(4) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 1


# --- retry-after headers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "250"}, 0.25),
        ({"x-ms-retry-after-ms": "40"}, 0.04),
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),
        ({"RETRY-AFTER": "2", "RETRY-AFTER-MS": "1500"}, 1.5),
        ({"retry-after-ms": "-5", "retry-after": "2"}, 2.0),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": " 7 "}, 7.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "whenever"}, None),
        ({"retry-after": ""}, None),
        ({"content-type": "application/json"}, None),
        ({}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-ratelimit-remaining-tokens": "1500", "x-ratelimit-remaining-requests": "9"}, (1500, 9)),
        ({"X-RateLimit-Remaining-Tokens": "0"}, (0, None)),
        ({"x-ratelimit-remaining-tokens": "-1", "x-ratelimit-remaining-requests": "many"}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_remaining_quota_headers(headers: dict[str, str], expected: tuple[int | None, int | None]) -> None:
    assert remaining_quota(headers) == expected


def test_retry_after_http_date_counts_from_now() -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    epoch = parsedate_to_datetime(date).timestamp()
    assert retry_after_s({"Retry-After": date}, now=lambda: epoch - 30) == 30.0


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    epoch = parsedate_to_datetime(date).timestamp()
    assert retry_after_s({"retry-after": date}, now=lambda: epoch + 5) == 0.0


def test_retry_after_http_date_against_the_real_clock() -> None:
    import datetime as dt

    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    wait = retry_after_s({"retry-after": format_datetime(soon, usegmt=True)})
    assert wait is not None and 110 < wait <= 120


def test_retry_after_reads_aiohttp_style_multidict_headers() -> None:
    headers = CIMultiDict([("Retry-After-Ms", "1500"), ("Retry-After", "2")])
    assert retry_after_s(headers) == 1.5


# --- config errors ----------------------------------------------------------------------


def config_error(status: int, code: str, message: str, **kwargs: object) -> EndpointConfigError:
    settings: dict[str, object] = {"model": None, "dimensions": None, "input_type": None}
    settings.update(kwargs)
    return config_error_for(ServiceError(status, code, message), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_name_the_key_variable_role_and_scope(status: int) -> None:
    err = config_error(status, "PermissionDenied", "Access denied due to invalid key.")
    assert isinstance(err, ConfigError)
    assert err.status == status
    assert str(err) == (
        f"{status} PermissionDenied: Access denied due to invalid key. Fix: check the API key "
        "in $AZURE_INFERENCE_CREDENTIAL (auth.key_env); with auth.mode: entra, check that the "
        "identity holds the 'Cognitive Services User' role on the resource and that "
        "auth.scope is https://cognitiveservices.azure.com/.default."
    )


def test_auth_error_names_a_custom_key_variable() -> None:
    err = config_error(401, "Unauthorized", "bad key", key_env="MY_EMBED_KEY")
    assert "check the API key in $MY_EMBED_KEY (auth.key_env)" in str(err)


def test_404_names_the_url_and_the_deployment() -> None:
    err = config_error(404, "DeploymentNotFound", "no such deployment", model="embed-small")
    assert err.status == 404
    assert str(err) == (
        "404 DeploymentNotFound: no such deployment. Fix: check endpoint.url (the v1 route: "
        "https://<resource>.openai.azure.com/openai/v1) and the deployment or model name "
        "(endpoint.model: embed-small)."
    )


@pytest.mark.parametrize(
    ("status", "message", "url"),
    [
        (404, "Resource not found", "https://r.services.ai.azure.com/models"),
        (404, "Resource not found", "https://r.services.ai.azure.com/models/"),
        (410, "This API version has been retired.", "https://r.openai.azure.com/openai/deployments/e"),
    ],
)
def test_a_retired_route_names_the_v1_url_to_use(status: int, message: str, url: str) -> None:
    err = config_error(status, "NotFound", message, model="embed-small", url=url)
    assert str(err).endswith(
        "Fix: Azure retired the /models inference route (and the azure-ai-inference SDK) on "
        "2026-08-26: use the OpenAI-compatible v1 route, endpoint.url "
        "https://<resource>.openai.azure.com/openai/v1 with endpoint.model the deployment name. "
        "Tables made on the old route keep their rows."
    )


def test_a_404_elsewhere_is_not_called_a_retirement() -> None:
    err = config_error(404, "DeploymentNotFound", "no such deployment", url="https://r.openai.azure.com/openai/v1")
    assert "retired" not in str(err)


def test_404_without_a_model_says_it_is_unset() -> None:
    assert "(endpoint.model is unset)" in str(config_error(404, "NotFound", "gone"))


def test_422_dimensions_says_remove_endpoint_dimensions() -> None:
    err = config_error(
        422,
        "unsupported_parameter",
        "This model does not support 'dimensions'.",
        model="text-embedding-ada-002",
        dimensions=256,
    )
    assert err.status == 422
    assert str(err) == (
        "422 unsupported_parameter: This model does not support 'dimensions'. Fix: model "
        "text-embedding-ada-002 does not support `dimensions`; remove endpoint.dimensions."
    )


def test_422_input_type_says_remove_endpoint_input_type() -> None:
    err = config_error(
        422, "invalid_value", "input_type 'query' is not supported", model="m1", input_type="query"
    )
    assert str(err).endswith(
        "Fix: model m1 does not support `input_type` 'query'; remove endpoint.input_type."
    )


def test_422_naming_the_parameter_in_the_code_only() -> None:
    err = config_error(422, "dimensions_not_supported", "Unprocessable", dimensions=64)
    assert str(err).endswith("Fix: this model does not support `dimensions`; remove endpoint.dimensions.")


def test_422_naming_both_parameters_gives_both_fixes() -> None:
    err = config_error(422, "bad", "Unsupported: dimensions, input type", model="m", input_type="document")
    assert str(err).endswith(
        "Fix: model m does not support `dimensions`; remove endpoint.dimensions; and model m "
        "does not support `input_type` 'document'; remove endpoint.input_type."
    )


def test_422_naming_nothing_suggests_the_parameters_that_were_sent() -> None:
    err = config_error(422, "bad", "Unprocessable entity", dimensions=64, input_type="query")
    assert str(err).endswith(
        "Fix: this model refused a parameter; try removing endpoint.dimensions or endpoint.input_type."
    )


def test_422_with_nothing_sent_points_at_the_endpoint_section() -> None:
    err = config_error(422, "bad", "Unprocessable entity")
    assert str(err).endswith(
        "Fix: the endpoint refused a request parameter; check the endpoint section of the config."
    )


def test_config_error_quotes_at_most_500_characters_of_the_service_message() -> None:
    err = config_error(404, "NotFound", "x" * 5000, model="m")
    assert "x" * 500 + "…. Fix:" in str(err)
    assert "x" * 501 not in str(err)


def test_config_error_without_a_service_code() -> None:
    err = config_error_for(ServiceError(401, None, "denied"), model=None, dimensions=None, input_type=None)
    assert str(err).startswith("401 error: denied. Fix: check the API key")
