"""The OpenAI-compatible v1 route (``endpoint.api: openai-v1``) as a :class:`~sparkembed.core.types.Backend`.

Microsoft deprecated the ``azure-ai-inference`` beta SDK and points to the v1 API,
``https://<resource>.openai.azure.com/openai/v1``; requests go to ``{url}/embeddings``.
This backend sends them with the ``openai`` package (an optional dependency) and
behaves like :class:`~sparkembed.backends.azure_inference.AzureInferenceBackend`: one attempt per call,
the SDK's retries off (the engine owns retries), vectors placed by ``index``, and the
errors of the libraries below translated in one place, :func:`map_openai_error`.

    backend = OpenAIV1Backend(config)        # endpoint.model names the deployment
    response = await backend.embed(["hello", "world"])
    await backend.close()
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
import uuid
from typing import Any

import msgspec

from sparkembed.backends.credentials import build_credential
from sparkembed.backends.http import USER_AGENT, HttpBackend, clean_message, decode_response, map_error
from sparkembed.config import EmbedConfig
from sparkembed.core.retry import remaining_quota, retry_after_s
from sparkembed.core.types import BackendResponse
from sparkembed.errors import ConfigError, ServiceError, TransportError

log = logging.getLogger(__name__)

TOKEN_REFRESH_MARGIN_S = 300.0
"""Fetch a new Entra token when the cached one expires within this many seconds
(azure-core's bearer policy uses the same margin)."""
PLACEHOLDER_KEY = "unused"
"""The SDK insists on an api key; with Entra or no auth the real header is set per request."""


class OpenAIV1Backend(HttpBackend):
    """:class:`~sparkembed.core.types.Backend` over ``openai.AsyncOpenAI`` on the v1 route.

    The client (and, for Entra auth, the credential) is built on first use, on the
    caller's event loop, and lives until :meth:`close`.

    Args:
        config: endpoint (``url`` ending in ``/openai/v1``, ``model`` = the deployment
            name), auth and timeouts; ``endpoint.url`` must be resolved (not ``local``).
        credential: an async Entra credential to use instead of building one (tests).

    Raises:
        ConfigError: the ``openai`` package is missing, ``endpoint.model`` is unset, or
            the URL is still ``local`` or unsafe (see :func:`.transport.check_endpoint_url`).
    """

    def __init__(self, config: EmbedConfig, *, credential: Any = None) -> None:
        super().__init__(config, credential=credential)
        endpoint = config.endpoint
        if importlib.util.find_spec("openai") is None:
            raise ConfigError(
                "endpoint.api 'openai-v1' needs the openai package: pip install openai"
            )
        if not endpoint.model:
            raise ConfigError(
                "endpoint.api 'openai-v1' needs endpoint.model: the deployment name "
                "(the v1 route picks the deployment by model)"
            )
        self._token: Any = None  # the cached Entra AccessToken
        self._token_lock = asyncio.Lock()
        if config.auth.mode == "key" and self._secret is None:
            raise ConfigError("auth.mode is 'key' but no key was resolved (see auth.key_env)")

    async def _send(self, texts: list[str]) -> BackendResponse:
        client = self._client or self._build_client()
        client_request_id = uuid.uuid4().hex
        endpoint = self._config.endpoint
        options: dict[str, Any] = {}
        if endpoint.dimensions is not None:
            options["dimensions"] = endpoint.dimensions
        if endpoint.input_type is not None:
            # Not an OpenAI parameter; some models on the route take it, others answer 400/422.
            options["extra_body"] = {"input_type": endpoint.input_type}
        try:
            headers = {"x-ms-client-request-id": client_request_id, **await self._auth_headers()}
            # The raw response: the SDK's pydantic parsing would only be thrown away, and
            # decode_response checks the body (index, sizes, finiteness) in one place.
            raw = await client.embeddings.with_raw_response.create(
                input=texts,
                model=endpoint.model,
                # Asked for explicitly, so the SDK hands the base64 strings back undecoded.
                encoding_format=self._format,
                extra_headers=headers,
                **options,
            )
            content = raw.content
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_openai_error(exc, secret=self._secret) from exc
        try:
            body = msgspec.json.decode(content)
        except msgspec.DecodeError as exc:
            raise ServiceError(502, "invalid_response", f"undecodable body: {exc}") from exc
        if not isinstance(body, dict):
            raise ServiceError(502, "invalid_response", f"body is a {type(body).__name__}")
        response = decode_response(body, len(texts), fallback_request_id=client_request_id)
        response.remaining_tokens, response.remaining_requests = remaining_quota(dict(raw.headers.items()))
        return response

    async def _auth_headers(self) -> dict[str, str]:
        """Per-request auth for Entra mode: a cached bearer token; key mode is set on the client."""
        if self._config.auth.mode != "entra":
            return {}
        async with self._token_lock:  # one refresh, not one per request in flight
            if self._token is None or self._token.expires_on - time.time() < TOKEN_REFRESH_MARGIN_S:
                if self._credential is None:
                    self._credential = build_credential(self._config.auth)
                self._token = await self._credential.get_token(self._config.auth.scope)
        return {"Authorization": f"Bearer {self._token.token}"}

    def _build_client(self) -> Any:
        import openai

        endpoint, retry = self._config.endpoint, self._config.retry
        headers = {"User-Agent": USER_AGENT}
        if self._secret is not None and self._config.auth.mode == "key":
            # Azure's v1 route takes the key as a bearer token or as api-key: send both,
            # as azure-core's AzureKeyCredential does.
            headers["api-key"] = self._secret
        api_key = self._secret if self._config.auth.mode == "key" else PLACEHOLDER_KEY
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=endpoint.url,
            max_retries=0,  # the engine owns retries; two layers would multiply attempts
            timeout=openai.Timeout(
                connect=retry.connect_timeout_s,
                read=retry.read_timeout_s,
                write=retry.read_timeout_s,
                pool=retry.read_timeout_s,
            ),
            default_headers=headers,
            default_query={"api-version": endpoint.api_version} if endpoint.api_version else None,
        )
        return self._client


def map_openai_error(exc: BaseException, *, secret: str | None = None) -> ServiceError | TransportError:
    """Translate an error of the ``openai`` SDK (or below it) into a sparkembed error.

    Status errors keep the service's code, message and ``retry-after-ms``/``retry-after``;
    connection errors and timeouts become :class:`TransportError`; anything else goes
    to :func:`sparkembed.backends.http.map_error`. ``secret`` is masked in every message.
    """
    import openai

    if isinstance(exc, openai.APIStatusError):
        code, message = _status_detail(exc)
        return ServiceError(
            exc.status_code,
            code,
            clean_message(message, secret),
            retry_after_s=retry_after_s(dict(exc.response.headers.items())),
        )
    if isinstance(exc, openai.APITimeoutError):
        return TransportError("timed out waiting for the service")
    if isinstance(exc, openai.APIConnectionError):
        # The SDK's own message is a bare "Connection error."; the cause says which.
        inner = exc.__cause__ or exc
        if type(inner).__name__ == "ConnectError":  # httpx: no connection at all
            host = getattr(getattr(exc.request, "url", None), "host", "?")
            return TransportError(f"cannot connect to host {host}: {inner}", unreachable=True)
        return TransportError(clean_message(f"{type(inner).__name__}: {inner}", secret))
    return map_error(exc, secret=secret)


def _status_detail(exc: Any) -> tuple[str | None, str]:
    """(code, message) from the ``{"error": {"code", "message"}}`` body, else the reason phrase."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]  # SDK versions differ in whether they unwrap "error"
    if isinstance(body, dict) and (body.get("code") is not None or body.get("message")):
        code = body.get("code")
        return (None if code is None else str(code)), str(body.get("message") or "")
    if isinstance(body, str) and body.strip():
        return None, body.strip()
    return None, str(getattr(exc.response, "reason_phrase", "") or "no error message")
