"""The engine against the local endpoint over real HTTP, through both APIs.

Each scenario runs through azure-ai-inference's aio client (``endpoint.api:
azure-ai-inference``) and through the ``openai`` SDK on the ``/openai/v1`` route
(``endpoint.api: openai-v1``); ``test_openai_v1.py`` has what only that route has.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from support import AZURE, DIMS, MAX_INPUT_TOKENS, OPENAI_V1, config_for, corpus, expected, sha256_hex

from sparkembed.backends import make_backend
from sparkembed.core.engine import Embedder, get_embedder
from sparkembed.core.metrics import Metrics
from sparkembed.core.ratelimit import RateLimiter
from sparkembed.errors import EndpointConfigError
from sparkembed.server.launch import LocalEndpoint

pytestmark = pytest.mark.integration

@pytest.fixture(params=[AZURE, OPENAI_V1])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_fault_mix_gives_every_row_ok_correct_vectors_billed_once(
    start_endpoint: Any, endpoint_key: str, api: str
) -> None:
    texts = corpus(1200)
    want, tokens = expected(texts)
    # The service lets a minute's quota through at once; the rest (~15%) waits for refill.
    # Its minute is scaled to 12 s, as is the limiter's, so the wait takes seconds.
    quota = int(tokens / 1.15)
    endpoint = start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--shuffle", "--seed", "5", "--window-scale", "0.2"),
        *("--error-rate", "0.05", "--reset-rate", "0.01", "--tpm", str(quota), "--no-quota-headers"),
    )
    # The limiter is told 1.5x the real quota (another client on the deployment, say), and
    # the service never says what is left: 429s must come, and the engine must absorb them.
    config = config_for(
        endpoint,
        endpoint_key,
        api,
        batching={"max_inputs": 16},
        limits={"concurrency": 4, "tokens_per_minute": int(quota * 1.5)},
    )
    limiter = RateLimiter(int(quota * 1.5), None, minute_s=12.0)
    embedder = Embedder(config, make_backend(config), limiter=limiter)
    metrics = Metrics()
    chunks = [texts[i : i + 100] for i in range(0, len(texts), 100)]
    try:
        results = list(embedder.embed_stream(chunks, metrics))
        assert embedder._backend.encoding_format == "base64"  # asked for, and never refused
    finally:
        embedder.close()
    stats = endpoint.stats()

    status = [s for r in results for s in r.status]
    assert status == ["ok"] * len(texts)
    np.testing.assert_array_equal(np.concatenate([r.vectors for r in results]), want)
    assert stats["billed"] == {sha256_hex(t): 1 for t in texts}
    assert stats["texts_billed"] == len(texts)
    prompt_tokens = sum(int(r.prompt_tokens.sum()) for r in results)
    assert prompt_tokens == stats["prompt_tokens"] == metrics.prompt_tokens == tokens
    assert metrics.requests == stats["requests"]
    # Every kind of fault happened and was retried: resets, 5xx and 429s.
    responses = stats["responses"]
    resets = stats["requests"] - sum(responses.values())
    assert resets >= 1 and responses.get("500", 0) + responses.get("503", 0) >= 1
    assert metrics.throttled == responses.get("429", 0) > 0
    assert metrics.retries == metrics.requests - stats["ok_requests"]


def test_one_over_long_input_in_1000_fails_alone(
    hash_endpoint: LocalEndpoint, endpoint_key: str, api: str
) -> None:
    hash_endpoint.reset()
    texts = corpus(1000)
    texts[421] = " ".join(["word"] * (MAX_INPUT_TOKENS * 3))
    cfg = config_for(hash_endpoint, endpoint_key, api)
    embedder = Embedder(cfg, make_backend(cfg))
    try:
        results = embedder.embed(texts)
    finally:
        embedder.close()
    assert results.status.count("ok") == 999
    assert results.status[421] == "failed"
    assert results.error[421].startswith("400 context_length_exceeded: ")
    assert "input[0] has 192 tokens" in results.error[421]
    good = texts[:421] + texts[422:]
    want, _ = expected(good)
    np.testing.assert_array_equal(np.delete(results.vectors, 421, axis=0), want)
    assert hash_endpoint.stats()["billed"] == {sha256_hex(t): 1 for t in good}


def test_a_bad_key_is_a_config_error_without_the_key(hash_endpoint: LocalEndpoint, api: str) -> None:
    hash_endpoint.reset()
    wrong = "wrong-key-4242424242"
    cfg = config_for(hash_endpoint, wrong, api)
    embedder = Embedder(cfg, make_backend(cfg))
    try:
        with pytest.raises(EndpointConfigError) as caught:
            embedder.preflight()
    finally:
        embedder.close()
    assert caught.value.status == 401
    assert "AZURE_INFERENCE_CREDENTIAL" in str(caught.value)
    assert wrong not in str(caught.value) and wrong not in repr(caught.value)
    assert hash_endpoint.stats()["requests"] == 1  # no retries, in the engine or the SDK


def test_preflight_learns_dimensions_and_model(
    hash_endpoint: LocalEndpoint, endpoint_key: str, api: str
) -> None:
    cfg = config_for(hash_endpoint, endpoint_key, api)
    embedder = Embedder(cfg, make_backend(cfg))
    try:
        assert embedder.preflight() == (DIMS, "hash-embedding")
    finally:
        embedder.close()


def test_one_client_per_process_reuses_its_connections(
    hash_endpoint: LocalEndpoint, endpoint_key: str
) -> None:
    hash_endpoint.reset()
    config = config_for(hash_endpoint, endpoint_key, batching={"max_inputs": 8}, limits={"concurrency": 3})
    texts = corpus(60)
    embedders = set()
    for i in range(12):  # twelve "tasks" in one worker process
        embedder = get_embedder(config, make_backend)
        embedders.add(id(embedder))
        assert embedder.embed(texts[i * 5 : i * 5 + 5] + texts).status.count("ok") == 65
    get_embedder(config, make_backend).close()
    stats = hash_endpoint.stats(billed=False)
    assert len(embedders) == 1
    assert stats["requests"] == 12 * 9
    assert 1 <= stats["connections"] <= 3


def test_a_422_for_dimensions_names_the_fix(
    hash_endpoint: LocalEndpoint, endpoint_key: str, api: str
) -> None:
    hash_endpoint.reset()
    cfg = config_for(hash_endpoint, endpoint_key, api, endpoint={"dimensions": 20000})
    embedder = Embedder(cfg, make_backend(cfg))
    try:
        with pytest.raises(EndpointConfigError) as caught:
            embedder.preflight()
        with pytest.raises(EndpointConfigError):
            embedder.embed(["a text"])
    finally:
        embedder.close()
    assert caught.value.status == 422
    message = str(caught.value)
    assert "does not support dimensions=20000" in message
    assert "does not support `dimensions`; remove endpoint.dimensions" in message
    assert hash_endpoint.stats()["requests"] == 2  # one each, no retries
