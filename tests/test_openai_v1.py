"""``endpoint.api: openai-v1``: the engine's integration scenarios through the ``openai`` SDK.

The same scenarios as ``test_engine_integration.py`` (fault mix, one bad input in 1000,
401 and 422 config errors), sent to the local endpoint's ``/openai/v1`` route over real
HTTP, plus what only this route has: Entra tokens as bearer headers and the SDK's
errors mapped to sparkembed's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from azure.core.credentials import AccessToken
from pydantic import SecretStr
from test_engine_integration import DIMS, MAX_INPUT_TOKENS, corpus, expected, sha256_hex

from sparkembed.backend import AzureInferenceBackend, make_backend
from sparkembed.backend_openai import OpenAIV1Backend
from sparkembed.config import EmbedConfig, validate_config
from sparkembed.engine import Embedder
from sparkembed.errors import ConfigError, EndpointConfigError, ServiceError
from sparkembed.metrics import Metrics
from sparkembed.server.launch import LocalEndpoint

pytestmark = pytest.mark.integration

DEPLOYMENT = "hash-embedding"
"""The v1 route names the deployment in ``model``; the local endpoint echoes it back."""


def v1_config(server: LocalEndpoint, key: str | None, **sections: dict[str, Any]) -> EmbedConfig:
    """Config for ``server``'s ``/openai/v1`` route; ``key=None`` leaves auth as sections say."""
    tree: dict[str, Any] = {
        "endpoint": {"url": f"{server.url}/openai/v1", "api": "openai-v1", "model": DEPLOYMENT},
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


def test_the_config_picks_the_backend(hash_endpoint: LocalEndpoint, endpoint_key: str) -> None:
    config = v1_config(hash_endpoint, endpoint_key)
    assert isinstance(make_backend(config), OpenAIV1Backend)
    default = config.model_copy(
        update={"endpoint": config.endpoint.model_copy(update={"api": "azure-ai-inference"})}
    )
    assert isinstance(make_backend(default), AzureInferenceBackend)
    no_model = config.model_copy(update={"endpoint": config.endpoint.model_copy(update={"model": None})})
    with pytest.raises(ConfigError, match="needs endpoint.model: the deployment name"):
        make_backend(no_model)
    cleartext = config.model_copy(
        update={"endpoint": config.endpoint.model_copy(update={"url": "http://example.com/openai/v1"})}
    )
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        make_backend(cleartext)


def test_fault_mix_gives_every_row_ok_correct_vectors_billed_once(
    start_endpoint: Any, endpoint_key: str
) -> None:
    texts = corpus(1200)
    want, tokens = expected(texts)
    quota = int(tokens / 1.15)  # a minute's quota goes at once; the rest (~15%) waits for refill
    endpoint = start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--shuffle", "--seed", "5"),
        *("--error-rate", "0.05", "--reset-rate", "0.01", "--tpm", str(quota)),
    )
    # The limiter is told 1.5x the real quota, so 429s must come and the engine absorb them.
    config = v1_config(
        endpoint,
        endpoint_key,
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

    assert [s for r in results for s in r.status] == ["ok"] * len(texts)
    np.testing.assert_array_equal(np.concatenate([r.vectors for r in results]), want)
    assert stats["billed"] == {sha256_hex(t): 1 for t in texts}
    prompt_tokens = sum(int(r.prompt_tokens.sum()) for r in results)
    assert prompt_tokens == stats["prompt_tokens"] == metrics.prompt_tokens == tokens
    assert metrics.requests == stats["requests"]
    # Every kind of fault happened and was retried: resets, 5xx and 429s.
    responses = stats["responses"]
    resets = stats["requests"] - sum(responses.values())
    assert resets >= 1 and responses.get("500", 0) + responses.get("503", 0) >= 1
    assert metrics.throttled == responses.get("429", 0) > 0
    assert metrics.retries == metrics.requests - stats["ok_requests"]


def test_one_over_long_input_in_1000_fails_alone(hash_endpoint: LocalEndpoint, endpoint_key: str) -> None:
    hash_endpoint.reset()
    texts = corpus(1000)
    texts[421] = " ".join(["word"] * (MAX_INPUT_TOKENS * 3))
    embedder = Embedder(v1_config(hash_endpoint, endpoint_key))
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


def test_a_bad_key_is_a_config_error_without_the_key(hash_endpoint: LocalEndpoint) -> None:
    hash_endpoint.reset()
    wrong = "wrong-key-4242424242"
    embedder = Embedder(v1_config(hash_endpoint, wrong))
    try:
        with pytest.raises(EndpointConfigError) as caught:
            embedder.preflight()
    finally:
        embedder.close()
    assert caught.value.status == 401
    assert "AZURE_INFERENCE_CREDENTIAL" in str(caught.value)
    assert wrong not in str(caught.value) and wrong not in repr(caught.value)
    assert hash_endpoint.stats()["requests"] == 1  # no retries, in the engine or the SDK


def test_a_422_for_dimensions_names_the_fix(hash_endpoint: LocalEndpoint, endpoint_key: str) -> None:
    hash_endpoint.reset()
    embedder = Embedder(v1_config(hash_endpoint, endpoint_key, endpoint={"dimensions": 20000}))
    try:
        with pytest.raises(EndpointConfigError) as caught:
            embedder.preflight()
        with pytest.raises(EndpointConfigError):
            embedder.embed(["a text"])
    finally:
        embedder.close()
    assert caught.value.status == 422
    assert "does not support dimensions=20000" in str(caught.value)
    assert "remove endpoint.dimensions" in str(caught.value)
    assert hash_endpoint.stats()["requests"] == 2  # one each, no retries


def test_preflight_learns_dimensions_and_model(hash_endpoint: LocalEndpoint, endpoint_key: str) -> None:
    embedder = Embedder(v1_config(hash_endpoint, endpoint_key))
    try:
        assert embedder.preflight() == (DIMS, DEPLOYMENT)
    finally:
        embedder.close()


class CountingCredential:
    """An async Entra credential stand-in: tokens the endpoint accepts (``entra-`` prefix)."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(f"entra-token-{len(self.scopes)}", int(time.time()) + 3600)


def test_entra_sends_one_cached_bearer_token(hash_endpoint: LocalEndpoint) -> None:
    hash_endpoint.reset()
    config = v1_config(hash_endpoint, None, auth={"mode": "entra"}, batching={"max_inputs": 10})
    credential = CountingCredential()
    embedder = Embedder(config, OpenAIV1Backend(config, credential=credential))
    try:
        results = embedder.embed(corpus(95))
    finally:
        embedder.close()
    assert results.status == ["ok"] * 95
    stats = hash_endpoint.stats(billed=False)
    assert stats["ok_requests"] == 10
    assert stats["bearer_tokens_seen"] == 1  # the placeholder key never went out as a bearer
    assert credential.scopes == [("https://cognitiveservices.azure.com/.default",)]


def test_a_429_keeps_the_retry_after(start_endpoint: Any, endpoint_key: str) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--tpm", "60")
    backend = OpenAIV1Backend(v1_config(endpoint, endpoint_key))

    async def twice() -> ServiceError:
        try:
            await backend.embed(["one two three"])  # the bucket starts full
            with pytest.raises(ServiceError) as caught:
                await backend.embed([" ".join(["word"] * 59)])
            return caught.value
        finally:
            await backend.close()

    error = asyncio.run(twice())
    assert error.status == 429
    assert error.retry_after_s is not None and 0 < error.retry_after_s <= 60
    assert endpoint.stats(billed=False)["responses"] == {"200": 1, "429": 1}
