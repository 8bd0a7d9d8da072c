"""The engine's seam to the service, and its azure-ai-inference implementation.

A :class:`Backend` sends one request and returns its vectors placed by response
``index``, or raises :class:`~sparkembed.errors.ServiceError` /
:class:`~sparkembed.errors.TransportError`. It never retries: the engine owns that.
Errors of the libraries below are translated in one place, :func:`map_error`.

    backend = AzureInferenceBackend(config)
    response = await backend.embed(["hello", "world"])   # on one event loop, always
    response.vectors.shape                                 # (2, 1536), float32
    await backend.close()
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import inspect
import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    IncompleteReadError,
)

from sparkembed.config import AuthConfig, EmbedConfig
from sparkembed.errors import ConfigError, ServiceError, TransportError
from sparkembed.retry import retry_after_s
from sparkembed.transport import RedactingTraceLoggingPolicy, check_endpoint_url, hide_bridge_traffic

log = logging.getLogger(__name__)

USER_AGENT = "sparkembed"
MAX_MESSAGE_CHARS = 500
"""Error messages quoted from the service or a library are cut to this length."""


@dataclass
class BackendResponse:
    """One successful response.

    Attributes:
        vectors: float32 ``(n, d)``; row ``i`` is the vector the service gave ``index`` ``i``.
        prompt_tokens: reported ``usage.prompt_tokens``.
        total_tokens: reported ``usage.total_tokens``.
        model: model name as reported by the service.
        request_id: the response ``id``, else the client request id.
    """

    vectors: np.ndarray
    prompt_tokens: int
    total_tokens: int
    model: str | None
    request_id: str | None


class Backend(Protocol):
    """Sends one embeddings request. Raises ServiceError or TransportError, never retries."""

    async def embed(self, texts: list[str]) -> BackendResponse: ...

    async def close(self) -> None: ...


class AzureInferenceBackend:
    """:class:`Backend` over ``azure.ai.inference.aio.EmbeddingsClient``.

    The client (and, for Entra auth, the credential) is built on first use, on the
    caller's event loop, and lives until :meth:`close`. The SDK's retries are off.

    Args:
        config: endpoint, auth and timeouts; ``endpoint.url`` must be resolved (not ``local``).
        credential: use this credential instead of building one from ``config.auth`` (tests).
    """

    def __init__(self, config: EmbedConfig, *, credential: Any = None) -> None:
        if config.endpoint.url == "local":
            raise ConfigError("endpoint.url 'local' must be resolved to the started server's URL")
        check_endpoint_url(config.endpoint.url, allow_insecure_http=config.endpoint.allow_insecure_http)
        hide_bridge_traffic()  # before a closure holding the key goes to the JVM (preflight runs first)
        self._config = config
        self._credential = credential
        self._owns_credential = credential is None
        self._client: Any = None
        self._format = config.endpoint.encoding_format
        self._secret = config.auth.key.get_secret_value() if config.auth.key else None
        # azure-core refuses bearer tokens over http; check_endpoint_url has vetted this URL.
        plain_http = str(config.endpoint.url).lower().startswith("http:")
        self._call_options = {"enforce_https": False} if plain_http and config.auth.mode == "entra" else {}

    @property
    def encoding_format(self) -> str:
        """``base64`` until the model refuses it, then ``float``."""
        return self._format

    async def embed(self, texts: list[str]) -> BackendResponse:
        """Embed ``texts`` in one request (two if the model refuses base64 first)."""
        try:
            return await self._send(texts)
        except ServiceError as error:
            if not (self._format == "base64" and _refuses_base64(error)):
                raise
            log.warning("the model refused encoding_format base64; using float from now on")
            self._format = "float"
            return await self._send(texts)

    async def close(self) -> None:
        """Close the client's connections and the credential this backend built."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        if self._owns_credential and hasattr(self._credential, "close"):
            await self._credential.close()
            self._credential = None

    async def _send(self, texts: list[str]) -> BackendResponse:
        client = self._client or self._build_client()
        client_request_id = uuid.uuid4().hex
        try:
            result = await client.embed(
                input=texts,
                encoding_format=self._format,
                request_id=client_request_id,
                **self._call_options,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc, secret=self._secret) from exc
        return decode_response(result, len(texts), fallback_request_id=client_request_id)

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
        }
        if endpoint.api_version:
            options["api_version"] = endpoint.api_version
        if self._config.auth.mode == "entra":
            options["credential_scopes"] = [self._config.auth.scope]
        self._client = EmbeddingsClient(str(endpoint.url), self._credential, **options)
        return self._client


def build_credential(auth: AuthConfig, *, environ: Mapping[str, str] | None = None) -> Any:
    """The credential for ``auth``: a key, a dummy key for ``none``, or an async Entra credential.

    Entra credentials are built in the process that uses them (each executor's backend),
    since azure-identity caches tokens per instance, in memory.

    Args:
        auth: the auth section.
        environ: where ``client_secret`` reads AZURE_TENANT_ID, AZURE_CLIENT_ID and
            AZURE_CLIENT_SECRET (default ``os.environ``), as azure-identity names them.

    Raises:
        ConfigError: no key resolved, missing environment variables (named, never their
            values), or a ``credential_factory`` that cannot be imported or called.
    """
    from azure.core.credentials import AzureKeyCredential

    if auth.mode == "key":
        if auth.key is None:
            raise ConfigError("auth.mode is 'key' but no key was resolved (see auth.key_env)")
        return AzureKeyCredential(auth.key.get_secret_value())
    if auth.mode == "none":
        return AzureKeyCredential("unused")  # the SDK insists on a credential
    if auth.credential == "custom":
        return load_credential(auth.credential_factory)
    from azure.identity import aio as identity

    env = os.environ if environ is None else environ
    if auth.credential == "managed_identity":
        return identity.ManagedIdentityCredential(client_id=auth.client_id)  # None: system-assigned
    if auth.credential == "workload_identity":
        _require_env(env, "workload_identity", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE")
        if not auth.client_id:
            _require_env(env, "workload_identity", "AZURE_CLIENT_ID")
        return identity.WorkloadIdentityCredential(
            tenant_id=env["AZURE_TENANT_ID"],
            client_id=auth.client_id or env["AZURE_CLIENT_ID"],
            token_file_path=env["AZURE_FEDERATED_TOKEN_FILE"],
        )
    if auth.credential == "client_secret":
        _require_env(env, "client_secret", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET")
        if not auth.client_id:
            _require_env(env, "client_secret", "AZURE_CLIENT_ID")
        return identity.ClientSecretCredential(
            env["AZURE_TENANT_ID"], auth.client_id or env["AZURE_CLIENT_ID"], env["AZURE_CLIENT_SECRET"]
        )
    if auth.client_id:
        return identity.DefaultAzureCredential(managed_identity_client_id=auth.client_id)
    return identity.DefaultAzureCredential()


def load_credential(factory: str | None) -> Any:
    """Call the ``module:function`` named by ``auth.credential_factory``; async-wrap a sync result.

    Raises:
        ConfigError: unset, malformed, not importable, failing, or not a TokenCredential.
    """
    where = f"auth.credential_factory {factory!r}"
    module_name, _, attribute = (factory or "").partition(":")
    if not (module_name and attribute):
        raise ConfigError(
            f"auth.credential is 'custom' but {where} is not 'module:function' "
            "(a zero-argument callable returning a TokenCredential)"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {where} in this process: {exc}") from exc
    try:
        credential = target()
    except Exception as exc:  # the user's code: any failure means no credential
        raise ConfigError(f"{where} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    get_token = getattr(credential, "get_token", None)
    if get_token is None:
        raise ConfigError(f"{where} returned a {type(credential).__name__}, which has no get_token")
    return credential if inspect.iscoroutinefunction(get_token) else SyncCredentialAdapter(credential)


class SyncCredentialAdapter:
    """An async TokenCredential over a sync one, for the aio client.

    ``get_token`` runs in a worker thread, so a slow token endpoint never stalls the
    event loop that carries every request of the process.
    """

    def __init__(self, credential: Any) -> None:
        self._credential = credential

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._credential.get_token, *scopes, **kwargs)

    async def close(self) -> None:
        close = getattr(self._credential, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    async def __aenter__(self) -> SyncCredentialAdapter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _require_env(env: Mapping[str, str], credential: str, *names: str) -> None:
    missing = [name for name in names if not env.get(name)]
    if missing:
        raise ConfigError(
            f"auth.credential is {credential!r} but {', '.join('$' + n for n in missing)} "
            "is not set in this process (executors need it too)"
        )


def decode_response(
    body: Mapping[str, Any], n_inputs: int, *, fallback_request_id: str | None = None
) -> BackendResponse:
    """Validate a response body and place its vectors by ``index``.

    Raises:
        ServiceError: 502 ``invalid_response`` when an index is missing, repeated or out
            of range, sizes differ, or a value is not finite: never a wrong vector.
    """
    data = body.get("data")
    if not isinstance(data, list) or len(data) != n_inputs:
        count = len(data) if isinstance(data, list) else "no"
        raise _invalid(f"{count} embeddings for {n_inputs} inputs")
    vectors: np.ndarray | None = None
    seen = np.zeros(n_inputs, dtype=bool)
    for item in data:
        index = item.get("index")
        if not isinstance(index, int) or not 0 <= index < n_inputs or seen[index]:
            raise _invalid(f"index {index!r} missing, repeated or out of range")
        vector = _vector(item.get("embedding"))
        if vectors is None:
            vectors = np.empty((n_inputs, vector.size), dtype=np.float32)
        if vector.size != vectors.shape[1] or vector.size == 0:
            expected = vectors.shape[1]
            raise _invalid(f"embedding {index} has {vector.size} values, expected {expected}")
        vectors[index] = vector
        seen[index] = True
    if vectors is None or not np.isfinite(vectors).all():
        raise _invalid("non-finite values in embeddings")
    usage = body.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return BackendResponse(
        vectors=vectors,
        prompt_tokens=prompt_tokens,
        total_tokens=int(usage.get("total_tokens") or prompt_tokens),
        model=body.get("model"),
        request_id=body.get("id") or fallback_request_id,
    )


def _vector(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):
        try:
            return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4")
        except (binascii.Error, ValueError) as exc:
            raise _invalid(f"undecodable base64 embedding ({exc})") from exc
    if isinstance(embedding, list):
        return np.asarray(embedding, dtype=np.float32)
    raise _invalid(f"embedding of type {type(embedding).__name__}")


def _invalid(why: str) -> ServiceError:
    return ServiceError(502, "invalid_response", why)


def map_error(exc: BaseException, *, secret: str | None = None) -> ServiceError | TransportError:
    """Translate any error of azure-core, aiohttp or asyncio into a sparkembed error.

    The message is built from the status, the service's code and message, or the
    exception's own text, with ``secret`` masked; request headers never enter it.
    """
    if isinstance(exc, IncompleteReadError):  # the body broke off: the connection, not the data
        return TransportError(_clean(f"incomplete response: {exc}", secret))
    if isinstance(exc, DecodeError):
        return ServiceError(502, "invalid_response", _clean(f"undecodable body: {exc}", secret))
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        code, message = _service_error_detail(exc)
        headers = getattr(exc.response, "headers", None) or {}
        return ServiceError(
            exc.status_code,
            code,
            _clean(message, secret),
            retry_after_s=retry_after_s(dict(headers.items())),
        )
    if isinstance(exc, ClientAuthenticationError):
        # No HTTP answer: the credential could not get a token. As a 401 it stops the
        # preflight at once instead of being retried as a network error.
        message = f"{type(exc).__name__}: {exc.message}"
        return ServiceError(401, "credential_unavailable", _clean(message, secret))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransportError("timed out waiting for the service")
    if isinstance(exc, (AzureError, aiohttp.ClientError, OSError)):
        inner = getattr(exc, "inner_exception", None) or exc
        return TransportError(_clean(f"{type(inner).__name__}: {inner}", secret))
    return TransportError(_clean(f"unexpected {type(exc).__name__}: {exc}", secret))


def _service_error_detail(exc: HttpResponseError) -> tuple[str | None, str]:
    """(code, message) from the ``{"error": {"code", "message"}}`` body, else the reason."""
    if exc.error is not None and (exc.error.code or exc.error.message):
        return exc.error.code, exc.error.message or ""
    try:
        detail = json.loads(exc.response.text()).get("error") or {}  # type: ignore[union-attr]
        return detail.get("code"), str(detail.get("message") or exc.reason or "")
    except Exception:  # no body, not JSON, or not the usual shape
        return None, str(exc.reason or "no error message")


def _clean(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, "***")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    return message


def _refuses_base64(error: ServiceError) -> bool:
    said = f"{error.code or ''} {error.message}".lower()
    return error.status in (400, 422) and "encoding_format" in said


def make_backend(config: EmbedConfig) -> Backend:
    """The backend ``config.endpoint.api`` names: azure-ai-inference (default) or OpenAI v1."""
    if config.endpoint.api == "openai-v1":
        # Imported here: the openai package is an optional dependency.
        from sparkembed.backend_openai import OpenAIV1Backend

        return OpenAIV1Backend(config)
    return AzureInferenceBackend(config)
