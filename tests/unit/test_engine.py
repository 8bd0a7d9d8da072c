"""The engine against a fake backend: packing, order, retries, bisection, quota, streaming.

The fake answers in-process (no HTTP); retry waits go to a fake ``sleep`` that
records them, and a recording limiter stands in for the rate limiter, so nothing
here sleeps for real.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import aiohttp
import numpy as np
import pytest
from azure.core.exceptions import HttpResponseError, ServiceResponseError
from support import build_config

from sparkembed.backends.azure_inference import AzureInferenceBackend
from sparkembed.backends.http import decode_response, map_error
from sparkembed.config import EmbedConfig
from sparkembed.core.engine import Embedder, get_embedder, request_token_cap
from sparkembed.core.metrics import Metrics
from sparkembed.core.ratelimit import HEADROOM, Grant
from sparkembed.core.streaming import ChunkAssembly
from sparkembed.core.tokens import estimate_tokens
from sparkembed.core.types import BackendResponse
from sparkembed.errors import (
    ConfigError,
    EndpointConfigError,
    QuotaExhaustedError,
    ServiceError,
    TransportError,
)

DIMS = 8
Script = Callable[[list[str], int], "Exception | None"]


def vector_for(text: str) -> np.ndarray:
    """The fake model: a deterministic vector per text."""
    return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(DIMS, np.float32)


class FakeBackend:
    """Answers like the service; ``script(texts, call_number)`` may return an error to raise."""

    def __init__(self, script: Script | None = None, delay_s: Callable[[int], float] = None):
        self.calls: list[list[str]] = []
        self.ok_calls: list[list[str]] = []
        self._script = script
        self._delay_s = delay_s
        self.closed = False

    async def embed(self, texts: list[str]) -> BackendResponse:
        self.calls.append(list(texts))
        number = len(self.calls)
        if self._delay_s:
            await asyncio.sleep(self._delay_s(number))
        error = self._script(texts, number) if self._script else None
        if error is not None:
            raise error
        self.ok_calls.append(list(texts))
        tokens = sum(len(t.split()) for t in texts)
        return BackendResponse(
            vectors=np.stack([vector_for(t) for t in texts]),
            prompt_tokens=tokens,
            total_tokens=tokens + 1,
            model="fake-model",
            request_id=f"req-{number}",
        )

    async def close(self) -> None:
        self.closed = True


class RecordingLimiter:
    """Admits everything at once and records what the engine told it."""

    def __init__(self) -> None:
        self.acquired: list[int] = []
        self.settled: list[tuple[int, int]] = []
        self.withdrawn: list[int] = []
        self.throttles: list[float | None] = []
        self.successes = 0
        self.cap: float | None = None
        self.room: int | None = None  # the limiter has room for this many tokens now, once

    async def acquire(self, tokens: int, *, retry: bool = False, cuts: Sequence[int] = ()) -> Grant | None:
        if cuts and self.cap is not None and tokens > self.cap:
            return None
        if self.room is not None and tokens > self.room and (fitting := [c for c in cuts if c <= self.room]):
            tokens = fitting[-1]  # a first part fits the room now
        self.acquired.append(tokens)
        if self.room is not None:
            self.room = None  # the room is spent; later requests go whole
        return Grant(tokens, waited_s=0.25, estimate=tokens)

    def settle(self, grant: Grant, actual_tokens: int) -> None:
        self.settled.append((grant.tokens, actual_tokens))

    def withdraw(self, grant: Grant) -> None:
        self.withdrawn.append(grant.tokens)

    def on_throttle(self, grant: Grant | None, retry_after_s: float | None) -> None:
        self.throttles.append(retry_after_s)

    def on_success(self, grant: Grant, remaining_tokens: int | None, remaining_requests: int | None) -> None:
        self.successes += 1

    def request_cap(self) -> float | None:
        return self.cap


def make_config(**sections: dict) -> EmbedConfig:
    retry = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "max_attempts": 4}
    return build_config({"endpoint": {"url": "http://127.0.0.1:9"}, "retry": retry}, sections)


class Rig:
    """An embedder over a fake backend, a recording limiter and a recording sleep."""

    def __init__(
        self, script: Script | None = None, delay_s=None, share: float = 1.0, **sections: dict
    ) -> None:
        self.backend = FakeBackend(script, delay_s)
        self.limiter = RecordingLimiter()
        self.sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.embedder = Embedder(
            make_config(**sections), self.backend, share=share, limiter=self.limiter, sleep=sleep
        )


def texts(n: int, prefix: str = "text") -> list[str]:
    return [f"{prefix} number {i}" for i in range(n)]


def assert_ok_vectors(results, inputs: list[str]) -> None:
    assert results.status == ["ok"] * len(inputs)
    assert results.vectors.dtype == np.float32
    np.testing.assert_array_equal(results.vectors, np.stack([vector_for(t) for t in inputs]))


# -- packing and order ----------------------------------------------------------------


def test_requests_are_packed_across_chunk_boundaries() -> None:
    rig = Rig(batching={"max_inputs": 4})
    chunks = [texts(3, f"chunk{c}") for c in range(5)]
    results = list(rig.embedder.embed_stream(chunks))
    assert [len(call) for call in rig.backend.calls] == [4, 4, 4, 3]
    assert [len(r) for r in results] == [3] * 5
    for result, chunk in zip(results, chunks, strict=True):
        assert_ok_vectors(result, chunk)


def test_requests_stay_under_the_token_cap() -> None:
    inputs = ["word " * 40] * 10  # 201 bytes: 52 estimated tokens each
    rig = Rig(batching={"max_request_tokens": 110})
    rig.embedder.embed(inputs)
    assert [len(call) for call in rig.backend.calls] == [2] * 5
    assert rig.limiter.acquired == [2 * estimate_tokens(inputs[0])] * 5


def test_an_input_over_the_token_cap_goes_alone() -> None:
    inputs = ["short", "long " * 100, "short too"]
    rig = Rig(batching={"max_request_tokens": 50})
    results = rig.embedder.embed(inputs)
    assert rig.backend.calls == [["short"], ["long " * 100], ["short too"]]
    assert_ok_vectors(results, inputs)


def test_with_a_quota_a_request_costs_at_most_a_tenth_of_the_worker_minute() -> None:
    assert request_token_cap(make_config()) == 300_000
    limits = {"tokens_per_minute": 600_000}
    assert request_token_cap(make_config(limits=limits), share=1 / 4) == 15_000
    small = make_config(limits=limits, batching={"max_request_tokens": 5_000})
    assert request_token_cap(small, share=1 / 4) == 5_000
    rig = Rig(share=0.5, limits={"tokens_per_minute": 2_000})  # cap: 100 tokens
    rig.embedder.embed(["word " * 40] * 6)  # 52 estimated tokens each
    assert [len(call) for call in rig.backend.calls] == [1] * 6


def test_chunks_come_back_in_input_order_when_requests_finish_out_of_order() -> None:
    # The first requests are the slowest, so later chunks finish first.
    rig = Rig(delay_s=lambda n: 0.03 * max(0, 4 - n), batching={"max_inputs": 2})
    chunks = [texts(2, f"c{c}") for c in range(6)]
    results = list(rig.embedder.embed_stream(chunks))
    for result, chunk in zip(results, chunks, strict=True):
        assert_ok_vectors(result, chunk)


def test_blank_rows_are_skipped_never_sent_and_non_text_fails() -> None:
    inputs = [None, "", "  \n", float("nan"), "real text", 42]
    rig = Rig()
    results = rig.embedder.embed(inputs)
    assert results.status == ["skipped"] * 4 + ["ok", "failed"]
    assert results.error[:4] == ["skipped: empty text"] * 4
    assert results.error[5] == "input is int, not text"
    assert results.attempts.tolist() == [0, 0, 0, 0, 1, 0]
    assert rig.backend.calls == [["real text"]]
    assert not results.vectors[[0, 1, 2, 3, 5]].any()
    np.testing.assert_array_equal(results.vectors[4], vector_for("real text"))


def test_rows_that_are_not_ok_get_zero_vectors_whatever_the_memory_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_empty = np.empty

    def stale_empty(*args: Any, **kwargs: Any) -> np.ndarray:
        array = real_empty(*args, **kwargs)
        array.fill(7)  # what freed memory may hold
        return array

    monkeypatch.setattr(np, "empty", stale_empty)
    chunk = ChunkAssembly(4)
    ones = np.ones((2, 8), dtype=np.float32)
    tokens = np.zeros(2, dtype=np.int64)
    chunk.fill(np.array([0, 2]), ones, tokens, tokens, attempts=1, request_id="r", model="m")
    chunk.fail(np.array([1]), "boom", attempts=3)
    chunk.finish_rows([3], "skipped", "skipped: empty text")
    results = chunk.results(8)
    assert results.status == ["ok", "failed", "ok", "skipped"]
    np.testing.assert_array_equal(results.vectors[[0, 2]], ones)
    assert not results.vectors[[1, 3]].any()


def test_an_all_blank_chunk_sends_nothing() -> None:
    rig = Rig()
    metrics = Metrics()
    results = rig.embedder.embed([None, " "], metrics)
    assert results.status == ["skipped", "skipped"]
    assert results.vectors.shape == (2, 0)  # no vector size known yet
    assert rig.backend.calls == []
    assert (metrics.skipped_rows, metrics.requests) == (2, 0)


def test_an_empty_chunk_gives_empty_results() -> None:
    rig = Rig()
    assert len(rig.embedder.embed([])) == 0


def test_the_stream_does_not_read_its_input_far_ahead() -> None:
    pulled = 0

    def endless() -> Iterator[list[str]]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield texts(10, f"chunk{i}")

    rig = Rig(batching={"max_inputs": 8}, limits={"concurrency": 2})
    stream = rig.embedder.embed_stream(endless())
    first = list(itertools.islice(stream, 5))
    stream.close()
    assert [len(r) for r in first] == [10] * 5
    # 5 chunks yielded, plus at most (2 in flight + 1 open) requests of 8 rows ahead.
    assert 5 <= pulled <= 5 + 3
    # The rows read ahead were sent or dropped, never embedded into a sixth result.
    assert sum(len(c) for c in rig.backend.calls) <= pulled * 10


# -- usage, metrics, request ids ------------------------------------------------------


def test_usage_is_apportioned_per_request_exactly() -> None:
    inputs = ["one", "two words", "three words here", "four words are here", "x"]
    rig = Rig(batching={"max_inputs": 2})
    metrics = Metrics()
    results = rig.embedder.embed(inputs, metrics)
    requests = [slice(0, 2), slice(2, 4), slice(4, 5)]
    for rows, call in zip(requests, rig.backend.calls, strict=True):
        reported = sum(len(t.split()) for t in call)
        assert results.prompt_tokens[rows].sum() == reported
        assert results.total_tokens[rows].sum() == reported + 1
    assert results.request_id == ["req-1", "req-1", "req-2", "req-2", "req-3"]
    assert results.model == ["fake-model"] * 5
    assert metrics.prompt_tokens == int(results.prompt_tokens.sum()) == 11
    assert metrics.total_tokens == 14
    assert (metrics.requests, metrics.retries, metrics.ok_rows) == (3, 0, 5)
    assert metrics.limiter_wait_s == pytest.approx(0.75)
    assert [r.n_inputs for r in metrics.timeline] == [2, 2, 1]
    assert all(r.status == 200 and r.end_s >= r.start_s for r in metrics.timeline)
    assert rig.limiter.settled == [
        (estimate_tokens("one") + estimate_tokens("two words"), 3),
        (estimate_tokens("three words here") + estimate_tokens("four words are here"), 7),
        (estimate_tokens("x"), 1),
    ]


def test_metrics_merge_and_round_trip() -> None:
    rig = Rig()
    first, second = Metrics(), Metrics()
    rig.embedder.embed(["a b", None], first)
    rig.embedder.embed(["c"], second)
    first.merge(second)
    assert first.to_dict() == {
        "requests": 2,
        "retries": 0,
        "throttled": 0,
        "prompt_tokens": 3,
        "total_tokens": 5,
        "ok_rows": 2,
        "failed_rows": 0,
        "skipped_rows": 1,
        "limiter_wait_s": 0.5,
        "dropped_tokens": 0,
        "reused_tokens": 0,
        "unsent_rows": 0,
        "copied_chunks": 0,
    }
    again = Metrics.from_dict(first.to_dict(timeline=True))
    assert again.to_dict(timeline=True) == first.to_dict(timeline=True)


# -- retries --------------------------------------------------------------------------


def failing_first(n: int, error: Callable[[], Exception]) -> Script:
    return lambda _texts, number: error() if number <= n else None


def test_retryable_errors_are_retried_and_counted_in_attempts() -> None:
    rig = Rig(failing_first(2, lambda: ServiceError(503, None, "busy")))
    metrics = Metrics()
    results = rig.embedder.embed(texts(3), metrics)
    assert_ok_vectors(results, texts(3))
    assert results.attempts.tolist() == [3, 3, 3]
    assert (metrics.requests, metrics.retries) == (3, 2)
    assert [r.status for r in metrics.timeline] == [503, 503, 200]
    assert len(rig.sleeps) == 2 and all(0 < s <= 0.05 for s in rig.sleeps)
    assert rig.limiter.settled[:2] == [(rig.limiter.acquired[0], 0)] * 2  # refused: refunded


def test_a_429_waits_its_retry_after_and_cools_the_limiter() -> None:
    throttled = lambda: ServiceError(429, "RateLimitReached", "slow down", retry_after_s=1.5)  # noqa: E731
    rig = Rig(failing_first(1, throttled))
    metrics = Metrics()
    results = rig.embedder.embed(["a"], metrics)
    assert results.status == ["ok"]
    assert 1.5 <= rig.sleeps[0] <= 1.65  # retry-after plus at most 10% jitter
    assert rig.limiter.throttles == [1.5]
    assert metrics.throttled == 1


def test_a_batch_larger_than_the_limiter_allows_is_split_before_it_is_sent() -> None:
    rig = Rig(batching={"max_inputs": 8})
    rig.limiter.cap = 2 * estimate_tokens("text number 0") + 1  # room for two texts a request
    results = rig.embedder.embed(texts(8))
    assert_ok_vectors(results, texts(8))
    assert sorted(len(call) for call in rig.backend.calls) == [2, 2, 2, 2]  # none sent whole


def test_a_batch_whose_turn_comes_after_a_limit_was_learned_is_split_not_sent() -> None:
    rig = Rig(batching={"max_inputs": 8})
    cap = 2 * estimate_tokens("text number 0") + 1
    acquire = rig.limiter.acquire

    async def learning(tokens: int, *, retry: bool = False, cuts: Sequence[int] = ()) -> Grant | None:
        rig.limiter.cap = cap  # the limit was learned while this request waited
        return await acquire(tokens, retry=retry, cuts=cuts)

    rig.limiter.acquire = learning  # type: ignore[method-assign]
    results = rig.embedder.embed(texts(8))
    assert_ok_vectors(results, texts(8))
    assert sorted(len(call) for call in rig.backend.calls) == [2, 2, 2, 2]
    assert max(rig.limiter.acquired) <= cap  # the whole batch was never charged


def test_a_batch_granted_a_first_part_sends_it_alone_and_then_the_rest() -> None:
    rig = Rig(batching={"max_inputs": 8})
    one = estimate_tokens("text number 0")
    rig.limiter.room = 3 * one + 1  # room for three texts now; the whole would wait
    results = rig.embedder.embed(texts(8))
    assert_ok_vectors(results, texts(8))  # every row, in its place, with its own vector
    assert [len(call) for call in rig.backend.calls] == [3, 5]
    assert rig.backend.calls[0] == texts(8)[:3]
    assert rig.limiter.acquired == [3 * one, 5 * one]
    assert [tokens for tokens, _ in rig.limiter.settled] == [3 * one, 5 * one]  # charged as sent


def test_transport_errors_are_retried() -> None:
    rig = Rig(failing_first(1, lambda: TransportError("connection reset")))
    results = rig.embedder.embed(["a"])
    assert (results.status, results.attempts.tolist()) == (["ok"], [2])


def test_persistent_failures_fail_the_rows_after_max_attempts() -> None:
    rig = Rig(lambda _t, _n: ServiceError(500, "internal", "boom"))
    metrics = Metrics()
    results = rig.embedder.embed(texts(2), metrics)
    assert results.status == ["failed", "failed"]
    assert results.error[0] == "500 internal: boom; gave up after 4 attempts"
    assert results.attempts.tolist() == [4, 4]
    assert (metrics.requests, metrics.failed_rows) == (4, 2)
    assert not results.vectors.any()


def test_a_request_that_never_answers_times_out() -> None:
    never = lambda _t, _n: None  # noqa: E731
    timeouts = {"connect_timeout_s": 0.02, "read_timeout_s": 0.03, "max_attempts": 2}
    rig = Rig(never, delay_s=lambda _n: 3600, retry=timeouts)
    results = rig.embedder.embed(["a"])
    assert results.status == ["failed"]
    assert results.error[0].startswith("transport error: no answer within 0.05 s")
    assert results.attempts.tolist() == [2]


# -- bad inputs: bisection ------------------------------------------------------------


def context_length(texts_: list[str], _n: int) -> Exception | None:
    if any("TOO LONG" in t for t in texts_):
        return ServiceError(400, "context_length_exceeded", "input is too long")
    return None


def test_bisection_isolates_one_bad_input_among_1000() -> None:
    inputs = texts(1000)
    inputs[637] = "TOO LONG " * 10
    rig = Rig(context_length)
    metrics = Metrics()
    results = rig.embedder.embed(inputs, metrics)
    assert results.status.count("ok") == 999
    assert results.status[637] == "failed"
    assert results.error[637] == "400 context_length_exceeded: input is too long"
    assert results.attempts[637] == 1
    good = [t for i, t in enumerate(inputs) if i != 637]
    np.testing.assert_array_equal(np.delete(results.vectors, 637, axis=0), [vector_for(t) for t in good])
    sent_ok = sorted(t for call in rig.backend.ok_calls for t in call)
    assert sent_ok == sorted(good)  # every good text embedded exactly once
    assert len(rig.backend.calls) <= 2 * 10 + 1  # two requests per level of a 10-level split
    assert metrics.failed_rows == 1 and metrics.ok_rows == 999


def test_a_400_on_a_single_input_fails_that_row() -> None:
    rig = Rig(context_length)
    results = rig.embedder.embed(["TOO LONG"])
    assert results.status == ["failed"] and results.attempts.tolist() == [1]
    assert len(rig.backend.calls) == 1


# -- config errors and quota ----------------------------------------------------------


def test_a_config_error_is_raised_at_once_without_retries() -> None:
    rig = Rig(lambda _t, _n: ServiceError(401, "Unauthorized", "bad key"))
    with pytest.raises(EndpointConfigError) as caught:
        rig.embedder.embed(texts(5))
    assert caught.value.status == 401
    assert "AZURE_INFERENCE_CREDENTIAL" in str(caught.value)
    assert len(rig.backend.calls) == 1


def test_a_422_for_dimensions_names_the_fix() -> None:
    error = ServiceError(422, "invalid_parameter", "model does not support dimensions")
    rig = Rig(lambda _t, _n: error, endpoint={"dimensions": 512, "model": "m1"})
    with pytest.raises(EndpointConfigError, match="remove endpoint.dimensions"):
        rig.embedder.embed(["a"])


def quota_gone(_texts: list[str], _n: int) -> Exception:
    return ServiceError(429, "RateLimitReached", "quota used up", retry_after_s=3600)


def test_quota_exhaustion_fails_rows_and_sends_no_more_until_retry_after() -> None:
    rig = Rig(quota_gone, batching={"max_inputs": 2}, limits={"concurrency": 1})
    results = rig.embedder.embed(texts(6))
    assert results.status == ["failed"] * 6
    assert all(e.startswith("quota exhausted: 429 RateLimitReached") for e in results.error)
    assert "retry.max_wait_s=60" in results.error[0]
    assert len(rig.backend.calls) == 1  # the later requests fail without being sent
    assert results.attempts.tolist() == [1, 1, 0, 0, 0, 0]
    assert rig.limiter.throttles == []  # an hour's pause would stall every request


def test_quota_exhaustion_stops_the_run_when_asked() -> None:
    rig = Rig(quota_gone, retry={"on_quota_exhausted": "stop"})
    with pytest.raises(QuotaExhaustedError, match="quota exhausted"):
        rig.embedder.embed(texts(3))


# -- preflight, the per-process embedder ----------------------------------------------


def test_preflight_returns_dimensions_and_model() -> None:
    rig = Rig()
    assert rig.embedder.preflight() == (DIMS, "fake-model")
    assert rig.backend.calls == [["sparkembed preflight"]]


def test_preflight_raises_the_config_error() -> None:
    rig = Rig(lambda _t, _n: ServiceError(404, "DeploymentNotFound", "no such deployment"))
    with pytest.raises(EndpointConfigError, match="endpoint.url"):
        rig.embedder.preflight()


def test_preflight_raises_the_last_error_when_retries_run_out() -> None:
    rig = Rig(lambda _t, _n: ServiceError(503, None, "down"))
    with pytest.raises(ServiceError, match="503"):
        rig.embedder.preflight()


def test_get_embedder_builds_one_per_config_and_process() -> None:
    config = make_config()
    built: list[EmbedConfig] = []

    def make_backend(config: EmbedConfig) -> FakeBackend:
        built.append(config)
        return FakeBackend()

    first = get_embedder(config, make_backend)
    assert get_embedder(make_config(), make_backend) is first
    other = get_embedder(make_config(limits={"concurrency": 3}), make_backend)
    assert other is not first
    first.close()
    assert get_embedder(config, make_backend) is not first  # a closed one is replaced
    assert len(built) == 3


def test_close_closes_the_backend() -> None:
    rig = Rig()
    rig.embedder.close()
    assert rig.backend.closed


# -- the backend's response decoding and error mapping ---------------------------------


def b64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()


def test_decode_places_vectors_by_index_not_position() -> None:
    body = {
        "id": "resp-1",
        "model": "m",
        "data": [
            {"index": 2, "embedding": b64([2, 2])},
            {"index": 0, "embedding": b64([0, 0])},
            {"index": 1, "embedding": [1.0, 1.0]},
        ],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    response = decode_response(body, 3)
    assert response.vectors.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert response.vectors.dtype == np.float32
    assert (response.prompt_tokens, response.request_id, response.model) == (7, "resp-1", "m")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ([{"index": 0, "embedding": [1.0]}], "1 embeddings for 2 inputs"),
        ([{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}], "index 0"),
        ([{"index": 0, "embedding": [1.0]}, {"index": 2, "embedding": [1.0]}], "index 2"),
        ([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}], "2 values"),
        ([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [float("nan")]}], "finite"),
        ([{"index": 0, "embedding": "%%%"}, {"index": 1, "embedding": "%%%"}], "base64"),
    ],
)
def test_decode_refuses_a_wrong_response(data: list, why: str) -> None:
    with pytest.raises(ServiceError, match=why) as caught:
        decode_response({"data": data}, 2)
    assert (caught.value.status, caught.value.code) == (502, "invalid_response")


class FakeHttpResponse:
    def __init__(self, status: int, body: str, headers: dict[str, str]) -> None:
        self.status_code = status
        self.reason = "Too Many Requests"
        self.headers = headers
        self._body = body
        self.content_type = "application/json"

    def text(self, encoding: str | None = None) -> str:
        return self._body

    def body(self) -> bytes:
        return self._body.encode()


def test_map_error_reads_status_code_message_and_retry_after_ms() -> None:
    body = '{"error": {"code": "RateLimitReached", "message": "wait, key sk-secret"}}'
    response = FakeHttpResponse(429, body, {"Retry-After-Ms": "1500", "Retry-After": "2"})
    error = map_error(HttpResponseError(response=response), secret="sk-secret")
    assert isinstance(error, ServiceError)
    assert (error.status, error.code, error.retry_after_s) == (429, "RateLimitReached", 1.5)
    assert error.message == "wait, key ***"


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.TimeoutError(),
        aiohttp.ClientConnectionError("reset"),
        ServiceResponseError("connection broke"),
        ConnectionResetError(104, "reset by peer"),
    ],
)
def test_map_error_turns_connection_trouble_into_transport_errors(exc: Exception) -> None:
    assert isinstance(map_error(exc), TransportError)


class Base64RefusingClient:
    """Stands in for the SDK client: refuses base64 with a 422, answers float."""

    def __init__(self) -> None:
        self.formats: list[str] = []

    async def embed(
        self, *, input: list[str], encoding_format: str, request_id: str, **_options: Any
    ) -> dict:
        self.formats.append(encoding_format)
        if encoding_format == "base64":
            error = {"code": "UnsupportedParameter", "message": "no encoding_format base64"}
            body = json.dumps({"error": error})
            raise HttpResponseError(response=FakeHttpResponse(422, body, {}))
        data = [{"index": i, "embedding": [float(i), 1.0]} for i in range(len(input))]
        return {"data": data, "usage": {"prompt_tokens": 2}}


def test_the_backend_falls_back_to_float_for_good_when_base64_is_refused() -> None:
    backend = AzureInferenceBackend(make_config())
    client = Base64RefusingClient()
    backend._client = client  # as if built; the SDK client itself is exercised over HTTP
    first = asyncio.run(backend.embed(["a", "b"]))
    second = asyncio.run(backend.embed(["c"]))
    assert first.vectors.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert second.vectors.tolist() == [[0.0, 1.0]]
    assert client.formats == ["base64", "float", "float"]
    assert backend.encoding_format == "float"


# -- stopping: no new request once the run is asked to stop -------------------------


def test_after_stop_no_request_is_sent_and_unanswered_rows_are_unsent() -> None:
    rig = Rig(batching={"max_inputs": 10}, limits={"concurrency": 1})

    def stopping() -> bool:  # the stop comes once two requests are answered
        return len(rig.backend.ok_calls) >= 2

    out = list(rig.embedder.embed_stream([texts(25, "a"), texts(5, "b")], stop=stopping))

    sent = [t for call in rig.backend.calls for t in call]
    assert sent == texts(20, "a")  # two full requests went before the stop; nothing after it
    assert out[0].status == ["ok"] * 20 + ["unsent"] * 5
    assert_ok_vectors_prefix(out[0], texts(20, "a"))
    assert out[1].status == ["unsent"] * 5


def test_a_request_waiting_to_retry_is_not_retried_after_stop() -> None:
    stop_now = False

    def fail_then_stop(batch: list[str], call: int) -> Exception | None:
        nonlocal stop_now
        stop_now = True
        return ServiceError(503, "busy", "try later")

    rig = Rig(fail_then_stop)
    results = rig.embedder.embed_stream([texts(3)], stop=lambda: stop_now)
    [only] = list(results)
    assert len(rig.backend.calls) == 1
    assert only.status == ["unsent"] * 3


def assert_ok_vectors_prefix(results, inputs: list[str]) -> None:
    n = len(inputs)
    np.testing.assert_array_equal(results.vectors[:n], np.stack([vector_for(t) for t in inputs]))
    assert not results.vectors[n:].any()


# -- a retried task reuses what its crashed attempt was answered ----------------------


def test_a_retry_sends_only_what_the_crashed_attempt_was_not_answered(tmp_path) -> None:
    from sparkembed.core.answers import AnswerLog

    inputs = texts(30)
    crashed = AnswerLog(tmp_path, "run-1", (0, 0, 0))
    vectors = np.stack([vector_for(t) for t in inputs[:20]])
    shares = np.arange(1, 21, dtype=np.int64)
    crashed.record(inputs[:20], vectors, shares, shares + 1, attempts=1, request_id="req-old", model="m")

    rig = Rig(batching={"max_inputs": 10})
    metrics = Metrics()
    [results] = rig.embedder.embed_stream([inputs], metrics, answers=AnswerLog(tmp_path, "run-1", (0, 0, 1)))

    assert [t for call in rig.backend.calls for t in call] == inputs[20:]
    assert_ok_vectors(results, inputs)
    assert results.request_id[:20] == ["req-old"] * 20 and results.request_id[20] == "req-1"
    assert results.prompt_tokens[:20].tolist() == list(range(1, 21))
    assert metrics.reused_tokens == sum(range(1, 21))
    assert metrics.prompt_tokens == sum(len(t.split()) for t in inputs[20:])  # only what was sent now


def test_max_share_shrinks_the_limits_and_needs_the_quota() -> None:
    config = make_config(limits={"tokens_per_minute": 100_000, "requests_per_minute": 600, "max_share": 0.7})
    assert request_token_cap(config, share=1 / 2) == 3_500  # a tenth of 70,000 / 2
    limiter = Embedder(config, FakeBackend(), share=1 / 2)._limiter
    assert limiter.token_limit == pytest.approx(35_000 * (1 - HEADROOM))
    with pytest.raises(ConfigError, match="max_share needs limits.tokens_per_minute"):
        make_config(limits={"max_share": 0.7})
