"""The engine against the local endpoint over real HTTP, through both APIs.

Each scenario runs through azure-ai-inference's aio client (``endpoint.api:
azure-ai-inference``) and through the ``openai`` SDK on the ``/openai/v1`` route
(``endpoint.api: openai-v1``); ``test_openai_v1.py`` has what only that route has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from sparkembed.config import EmbedConfig, validate_config
from sparkembed.engine import Embedder, get_embedder
from sparkembed.errors import EndpointConfigError
from sparkembed.metrics import Metrics
from sparkembed.server.launch import LocalEndpoint
from sparkembed.server.models import load_model

pytestmark = pytest.mark.integration

DIMS = 64
MAX_INPUT_TOKENS = 64
WORDS = ["spark", "delta", "lake", "vector", "quota", "token", "batch", "retry", "river", "stone"]


def corpus(n: int) -> list[str]:
    """Distinct texts of 8-14 words."""
    return [
        f"row {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6 + i % 7)) for i in range(n)
    ]


def expected(texts: list[str]) -> tuple[np.ndarray, int]:
    """The hash model's vectors and the prompt tokens it bills for ``texts``."""
    model = load_model("hash", DIMS)
    encodings = model.tokenize(texts)
    vectors = model.embed(texts, encodings, DIMS, "text")
    return vectors, sum(len(e.ids) for e in encodings)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


AZURE = "azure-ai-inference"
OPENAI_V1 = "openai-v1"
DEPLOYMENT = "hash-embedding"
"""The v1 route names the deployment in ``model``; the local endpoint echoes it back."""


def config_for(
    server: LocalEndpoint, key: str | None, api: str = AZURE, **sections: dict[str, Any]
) -> EmbedConfig:
    """Config for ``server`` through ``api``; ``key=None`` leaves auth as ``sections`` say."""
    endpoint: dict[str, Any] = {"url": server.url}
    if api == OPENAI_V1:
        endpoint = {"url": f"{server.url}/openai/v1", "api": OPENAI_V1, "model": DEPLOYMENT}
    tree: dict[str, Any] = {
        "endpoint": endpoint,
        "retry": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "max_attempts": 12},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    config = validate_config(tree)
    if key is None:
        return config
    return config.model_copy(update={"auth": config.auth.model_copy(update={"key": SecretStr(key)})})


@pytest.fixture(scope="module")
def hash_endpoint(start_endpoint: Any) -> Iterator[LocalEndpoint]:
    endpoint = start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--max-input-tokens", str(MAX_INPUT_TOKENS)),
        *("--accept-token-prefix", "entra-"),
    )
    yield endpoint
    endpoint.stop()


@pytest.fixture(params=[AZURE, OPENAI_V1])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_fault_mix_gives_every_row_ok_correct_vectors_billed_once(
    start_endpoint: Any, endpoint_key: str, api: str
) -> None:
    texts = corpus(1200)
    want, tokens = expected(texts)
    # The service lets a minute's quota through at once; the rest (~15%) waits for refill.
    quota = int(tokens / 1.15)
    endpoint = start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--shuffle", "--seed", "5"),
        *("--error-rate", "0.05", "--reset-rate", "0.01", "--tpm", str(quota)),
    )
    # The limiter is told 1.5x the real quota (another client on the deployment, say); it
    # learns the real one from the service's answers (any 429s on the way are absorbed).
    config = config_for(
        endpoint,
        endpoint_key,
        api,
        batching={"max_inputs": 16},
        limits={"concurrency": 4, "tokens_per_minute": int(quota * 1.5)},
    )
    embedder = Embedder(config)
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
    # Every kind of fault happened and was retried: resets and 5xx (429s: test_pacer_limiters.py).
    responses = stats["responses"]
    resets = stats["requests"] - sum(responses.values())
    assert resets >= 1 and responses.get("500", 0) + responses.get("503", 0) >= 1
    assert metrics.throttled == responses.get("429", 0)
    assert metrics.retries == metrics.requests - stats["ok_requests"]


def test_one_over_long_input_in_1000_fails_alone(
    hash_endpoint: LocalEndpoint, endpoint_key: str, api: str
) -> None:
    hash_endpoint.reset()
    texts = corpus(1000)
    texts[421] = " ".join(["word"] * (MAX_INPUT_TOKENS * 3))
    embedder = Embedder(config_for(hash_endpoint, endpoint_key, api))
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
    embedder = Embedder(config_for(hash_endpoint, wrong, api))
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
    embedder = Embedder(config_for(hash_endpoint, endpoint_key, api))
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
        embedder = get_embedder(config)
        embedders.add(id(embedder))
        assert embedder.embed(texts[i * 5 : i * 5 + 5] + texts).status.count("ok") == 65
    get_embedder(config).close()
    stats = hash_endpoint.stats(billed=False)
    assert len(embedders) == 1
    assert stats["requests"] == 12 * 9
    assert 1 <= stats["connections"] <= 3


def test_a_422_for_dimensions_names_the_fix(
    hash_endpoint: LocalEndpoint, endpoint_key: str, api: str
) -> None:
    hash_endpoint.reset()
    embedder = Embedder(config_for(hash_endpoint, endpoint_key, api, endpoint={"dimensions": 20000}))
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
