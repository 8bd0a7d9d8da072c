"""The Azure AI model inference API (``/models``, ``azure-ai-inference``) as a backend.

Azure retired the ``/models`` route on 2026-08-26; this backend stays for endpoints that
still serve the inference API (self-hosted, partner and older resources).

    backend = AzureInferenceBackend(config)
    response = await backend.embed(["hello", "world"])   # on one event loop, always
    response.vectors.shape                                 # (2, 1536), float32
    await backend.close()
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import msgspec
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ResourceNotModifiedError,
)
from azure.core.exceptions import map_error as azure_map_error

from sparkembed.backends.credentials import build_credential
from sparkembed.backends.http import USER_AGENT, HttpBackend, decode_response, map_error
from sparkembed.backends.transport import RedactingTraceLoggingPolicy, env_proxies
from sparkembed.config import EmbedConfig
from sparkembed.core.retry import remaining_quota
from sparkembed.core.types import BackendResponse

_SDK_ERROR_MAP = {
    401: ClientAuthenticationError,
    404: ResourceNotFoundError,
    409: ResourceExistsError,
    304: ResourceNotModifiedError,
}
"""The error classes ``EmbeddingsClient.embed`` raises per status (azure-ai-inference 1.0.0b9)."""


class AzureInferenceBackend(HttpBackend):
    """:class:`Backend` over ``azure.ai.inference.aio.EmbeddingsClient``.

    The client (and, for Entra auth, the credential) is built on first use, on the
    caller's event loop, and lives until :meth:`close`. The SDK's retries are off.

    Args:
        config: endpoint, auth and timeouts; ``endpoint.url`` must be resolved (not ``local``).
        credential: use this credential instead of building one from ``config.auth`` (tests).
    """

    def __init__(self, config: EmbedConfig, *, credential: Any = None) -> None:
        super().__init__(config, credential=credential)
        # azure-core refuses bearer tokens over http; check_endpoint_url has vetted this URL.
        plain_http = str(config.endpoint.url).lower().startswith("http:")
        self._call_options = {"enforce_https": False} if plain_http and config.auth.mode == "entra" else {}

    async def _send(self, texts: list[str]) -> BackendResponse:
        client = self._client or self._build_client()
        client_request_id = uuid.uuid4().hex
        headers: dict[str, str] = {}
        try:
            body = await client.embed(
                input=texts,
                encoding_format=self._format,
                request_id=client_request_id,
                response_headers=headers,
                **self._call_options,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, secret=self._secret) from exc
        response = decode_response(body, len(texts), fallback_request_id=client_request_id)
        response.remaining_tokens, response.remaining_requests = remaining_quota(headers)
        return response

    def _build_client(self) -> Any:
        from azure.ai.inference.aio import EmbeddingsClient

        endpoint, retry = self._config.endpoint, self._config.retry
        if self._credential is None:
            self._credential = build_credential(self._config.auth)
        options: dict[str, Any] = {
            "model": endpoint.model,
            "dimensions": endpoint.dimensions,
            "input_type": endpoint.input_type,
            "retry_total": 0,  # the engine owns retries; two layers would multiply attempts
            "connection_timeout": retry.connect_timeout_s,
            "read_timeout": retry.read_timeout_s,
            "user_agent": USER_AGENT,
            # With logging_enable and DEBUG, azure-core would print the api-key and bearer token.
            "logging_policy": RedactingTraceLoggingPolicy(),
            # The environment's proxy, read once here: with use_env_settings on, aiohttp looks
            # up proxies and ~/.netrc in a worker thread for every request.
            "use_env_settings": False,
            "proxies": env_proxies(str(endpoint.url)),
        }
        if endpoint.api_version:
            options["api_version"] = endpoint.api_version
        if self._config.auth.mode == "entra":
            options["credential_scopes"] = [self._config.auth.scope]
        client = EmbeddingsClient(str(endpoint.url), self._credential, **options)
        self._client = RawEmbeddingsClient(
            client, model=endpoint.model, dimensions=endpoint.dimensions, input_type=endpoint.input_type
        )
        return self._client


class RawEmbeddingsClient:
    """``EmbeddingsClient.embed`` answering the parsed JSON body instead of SDK model objects.

    The request is the one the SDK's ``embed`` builds (1.0.0b9: ``POST {endpoint}/embeddings``
    with the client's ``api-version``, ``Content-Type`` and ``Accept: application/json``, and
    the same JSON body), and it runs through the client's own pipeline: auth and ``api-key``
    headers, request id, the redacting logging policy, timeouts, and retries (off). A non-200
    answer raises what the SDK raises (``HttpResponseError``; ``ClientAuthenticationError`` for
    401, ``ResourceNotFoundError`` for 404).

    Why: the SDK parses each body twice (azure-core's ContentDecodePolicy, then ``embed``) and
    turns every item into model objects, about 60 µs a row in all. msgspec parses the body once,
    in about 2 µs a row (orjson takes 9 on these 8 KB base64 strings), and
    :func:`decode_response` checks it.

    Args:
        client: an ``azure.ai.inference.aio.EmbeddingsClient``.
        model, dimensions, input_type: body fields; None leaves a field out, as the SDK does.
    """

    def __init__(
        self, client: Any, *, model: str | None, dimensions: int | None, input_type: str | None
    ) -> None:
        self._client = client
        self._model = model
        self._dimensions = dimensions
        self._input_type = input_type

    async def embed(
        self,
        *,
        input: list[str],
        encoding_format: str,
        response_headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """POST one embeddings request; return the parsed body of the 200 answer.

        Args:
            input: the texts.
            encoding_format: ``base64`` or ``float``.
            response_headers: if given, filled with the answer's headers (for the quota left).
            kwargs: pipeline options, as ``EmbeddingsClient.embed`` takes them (``request_id``).

        Raises:
            HttpResponseError: any answer but 200, as the SDK raises it.
            msgspec.DecodeError: the 200 answer's body is not JSON.
        """
        from azure.core.rest import HttpRequest

        body = {
            "input": input,
            "dimensions": self._dimensions,
            "encoding_format": encoding_format,
            "input_type": self._input_type,
            "model": self._model,
        }
        # stdlib json, as the SDK uses: ASCII, so lone surrogates travel escaped.
        content = json.dumps({key: value for key, value in body.items() if value is not None})
        request = HttpRequest(
            "POST",
            "/embeddings",
            params={"api-version": self._client._config.api_version},
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            content=content,
        )
        # stream=True, then read here: otherwise azure-core's ContentDecodePolicy would parse
        # every body with stdlib json too, only for it to be thrown away.
        response = await self._client.send_request(request, stream=True, **kwargs)
        try:
            answer = await response.read()
        finally:
            await response.close()
        if response.status_code != 200:
            _raise_as_the_sdk(response)
        if response_headers is not None:
            response_headers.update(response.headers.items())
        return msgspec.json.decode(answer)

    async def close(self) -> None:
        await self._client.close()


def _raise_as_the_sdk(response: Any) -> None:
    """Raise for a non-200 answer exactly as ``EmbeddingsClient.embed`` does."""
    azure_map_error(status_code=response.status_code, response=response, error_map=_SDK_ERROR_MAP)
    raise HttpResponseError(response=response)

