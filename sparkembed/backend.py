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
import binascii
import importlib
import inspect
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import msgspec
import numpy as np
import pybase64
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    IncompleteReadError,
    ResourceExistsError,
    ResourceNotFoundError,
    ResourceNotModifiedError,
)
from azure.core.exceptions import map_error as azure_map_error

from sparkembed.config import AuthConfig, EmbedConfig
from sparkembed.errors import ConfigError, ServiceError, TransportError
from sparkembed.retry import remaining_quota, retry_after_s
from sparkembed.transport import (
    RedactingTraceLoggingPolicy,
    check_endpoint_url,
    env_proxies,
    hide_bridge_traffic,
)

log = logging.getLogger(__name__)

USER_AGENT = "sparkembed"
MAX_MESSAGE_CHARS = 500
"""Error messages quoted from the service or a library are cut to this length."""
_SDK_ERROR_MAP = {
    401: ClientAuthenticationError,
    404: ResourceNotFoundError,
    409: ResourceExistsError,
    304: ResourceNotModifiedError,
}
"""The error classes ``EmbeddingsClient.embed`` raises per status (azure-ai-inference 1.0.0b9)."""


@dataclass
class BackendResponse:
    """One successful response.

    Attributes:
        vectors: float32 ``(n, d)``; row ``i`` is the vector the service gave ``index`` ``i``.
        prompt_tokens: reported ``usage.prompt_tokens``.
        total_tokens: reported ``usage.total_tokens``.
        model: model name as reported by the service.
        request_id: the response ``id``, else the client request id.
        remaining_tokens: ``x-ratelimit-remaining-tokens``, if the service sent it.
        remaining_requests: ``x-ratelimit-remaining-requests``, likewise.
    """

    vectors: np.ndarray
    prompt_tokens: int
    total_tokens: int
    model: str | None
    request_id: str | None
    remaining_tokens: int | None = None
    remaining_requests: int | None = None


class Backend(Protocol):
    """Sends one embeddings request. Raises ServiceError or TransportError, never retries."""

    async def embed(self, texts: list[str]) -> BackendResponse: ...

    async def close(self) -> None: ...


class HttpBackend:
    """What the HTTP backends share: a lazily built client and credential, closed
    together, and the switch to ``float`` when a model refuses base64.

    Subclasses set ``_config``, ``_client``, ``_credential``, ``_owns_credential`` and
    ``_format``, and implement ``_send(texts)``.
    """

    _config: EmbedConfig
    _client: Any
    _credential: Any
    _owns_credential: bool
    _format: str

    async def _send(self, texts: list[str]) -> BackendResponse:
        raise NotImplementedError

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


class AzureInferenceBackend(HttpBackend):
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


def decode_response(body: Any, n_inputs: int, *, fallback_request_id: str | None = None) -> BackendResponse:
    """Validate a response body and place its vectors by ``index``.

    Base64 vectors (the usual answer) are decoded and checked for the whole response at once,
    a few µs a row; float lists, or a mix, one by one.

    Raises:
        ServiceError: 502 ``invalid_response`` when the body is not an object, an index is
            missing, repeated or out of range, sizes differ, or a value is not finite: never a
            wrong vector.
    """
    if not isinstance(body, Mapping):
        raise _invalid(f"body is a {type(body).__name__}, not an object")
    data = body.get("data")
    if not isinstance(data, list) or len(data) != n_inputs:
        count = len(data) if isinstance(data, list) else "no"
        raise _invalid(f"{count} embeddings for {n_inputs} inputs")
    if not all(isinstance(item, dict) for item in data):
        raise _invalid("a data item is not an object")
    indices = [item.get("index") for item in data]
    positions = _positions(indices, n_inputs)
    embeddings = [item.get("embedding") for item in data]
    if all(isinstance(embedding, str) for embedding in embeddings):
        received = _decode_base64_rows(embeddings, indices)
    else:
        received = _stack_rows([_vector(embedding) for embedding in embeddings], indices)
    if not np.isfinite(received).all():
        raise _invalid("non-finite values in embeddings")
    if np.array_equal(positions, np.arange(n_inputs)):
        vectors = received  # in order, as services usually answer: no copy
    else:
        vectors = np.empty_like(received)
        vectors[positions] = received
    usage = body.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return BackendResponse(
        vectors=vectors,
        prompt_tokens=prompt_tokens,
        total_tokens=int(usage.get("total_tokens") or prompt_tokens),
        model=body.get("model"),
        request_id=body.get("id") or fallback_request_id,
    )


def _positions(indices: list[Any], n_inputs: int) -> np.ndarray:
    """The ``index`` of each data item as int64, checked to hold each of ``0..n-1`` once."""
    # JSON integers only: numpy would also take true, 1.0 or "1" for 1.
    if indices and all(type(index) is int for index in indices):
        positions = np.fromiter(indices, dtype=np.int64, count=len(indices))
        in_range = positions.min() >= 0 and positions.max() < n_inputs
        if in_range and np.bincount(positions, minlength=n_inputs).max() == 1:
            return positions
    seen: set[int] = set()
    for index in indices:  # name the first bad one
        if type(index) is not int or not 0 <= index < n_inputs or index in seen:
            raise _invalid(f"index {index!r} missing, repeated or out of range")
        seen.add(index)
    raise _invalid("no embeddings in the response")  # the only case left: no items at all


def _decode_base64_rows(embeddings: list[str], indices: list[Any]) -> np.ndarray:
    """Little-endian float32 rows from base64 strings, in the order given."""
    try:
        # pybase64 validates and decodes with SIMD: ~15x the stdlib's speed on 8 KB vectors.
        raw = [pybase64.b64decode(embedding, validate=True) for embedding in embeddings]
    except (binascii.Error, ValueError) as exc:
        raise _invalid(f"undecodable base64 embedding ({exc})") from exc
    sizes = [len(row) for row in raw]
    _check_sizes(sizes, indices, unit=4)
    # A bytearray, so the vectors are writable like any other result.
    return (
        np.frombuffer(bytearray().join(raw), dtype="<f4").astype(np.float32, copy=False).reshape(len(raw), -1)
    )


def _stack_rows(rows: list[np.ndarray], indices: list[Any]) -> np.ndarray:
    _check_sizes([row.size for row in rows], indices, unit=1)
    return np.stack(rows)


def _check_sizes(sizes: list[int], indices: list[Any], *, unit: int) -> None:
    """Every row the same non-zero size, a whole number of ``unit`` (bytes per value)."""
    expected = sizes[0]
    if expected and expected % unit == 0 and min(sizes) == max(sizes):
        return
    for size, index in zip(sizes, indices, strict=True):  # name the first bad one
        if size % unit:
            raise _invalid(f"undecodable base64 embedding {index}: {size} bytes are not float32 values")
        if size != expected or size == 0:
            raise _invalid(f"embedding {index} has {size // unit} values, expected {expected // unit}")


def _vector(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):
        try:
            return np.frombuffer(pybase64.b64decode(embedding, validate=True), dtype="<f4")
        except (binascii.Error, ValueError) as exc:
            raise _invalid(f"undecodable base64 embedding ({exc})") from exc
    if isinstance(embedding, list):
        try:
            vector = np.asarray(embedding, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise _invalid(f"embedding is not a list of numbers ({exc})") from exc
        if vector.ndim != 1:
            raise _invalid("embedding is not a flat list of numbers")
        return vector
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
    if isinstance(exc, (DecodeError, msgspec.DecodeError)):
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
        if isinstance(inner, aiohttp.ClientConnectorError):
            return unreachable(inner)
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


def unreachable(error: aiohttp.ClientConnectorError) -> TransportError:
    """No connection to the host at all: the words a user needs, and no retry in the preflight."""
    why = "not found (DNS)" if isinstance(error.os_error, socket.gaierror) else "refused or unreachable"
    return TransportError(f"cannot connect to host {error.host} port {error.port}: {why}", unreachable=True)


MIN_MASKED_SECRET = 8
"""A shorter "secret" is no real key, and masking it would mangle any word holding it."""


def _clean(message: str, secret: str | None) -> str:
    if secret and len(secret) >= MIN_MASKED_SECRET:
        message = message.replace(secret, "***")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    return message


def _refuses_base64(error: ServiceError) -> bool:
    said = f"{error.code or ''} {error.message}".lower()
    return error.status in (400, 422) and "encoding_format" in said


def make_backend(config: EmbedConfig) -> Backend:
    """The backend for ``config.endpoint.route``: the Azure AI model inference API or OpenAI v1."""
    if config.endpoint.route == "openai-v1":
        # Imported here: the openai package is an optional dependency.
        from sparkembed.backend_openai import OpenAIV1Backend

        return OpenAIV1Backend(config)
    return AzureInferenceBackend(config)
