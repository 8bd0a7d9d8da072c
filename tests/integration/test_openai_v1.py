"""``endpoint.api: openai-v1``: what only the ``/openai/v1`` route has.

The engine's scenarios (fault mix, one bad input in 1000, 401 and 422 config errors) run
through both APIs in ``test_engine_integration.py``. Here: picking the backend, Entra tokens
as bearer headers, and a 429's retry-after through the ``openai`` SDK's errors.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from support import DIMS, OPENAI_V1, config_for, corpus

from sparkembed.backends import make_backend
from sparkembed.backends.azure_inference import AzureInferenceBackend
from sparkembed.backends.openai_v1 import OpenAIV1Backend
from sparkembed.core.engine import Embedder
from sparkembed.errors import ConfigError, ServiceError
from sparkembed.server.launch import LocalEndpoint

pytestmark = pytest.mark.integration


def test_the_config_picks_the_backend(hash_endpoint: LocalEndpoint, endpoint_key: str) -> None:
    config = config_for(hash_endpoint, endpoint_key, OPENAI_V1)
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


class CountingCredential:
    """An async Entra credential stand-in: tokens the endpoint accepts (``entra-`` prefix)."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(f"entra-token-{len(self.scopes)}", int(time.time()) + 3600)


def test_entra_sends_one_cached_bearer_token(hash_endpoint: LocalEndpoint) -> None:
    hash_endpoint.reset()
    config = config_for(hash_endpoint, None, OPENAI_V1, auth={"mode": "entra"}, batching={"max_inputs": 10})
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
    backend = OpenAIV1Backend(config_for(endpoint, endpoint_key, OPENAI_V1))

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
