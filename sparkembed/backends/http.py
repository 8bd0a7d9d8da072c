"""What the HTTP backends share: the base class, response decoding and error translation.

Errors of the libraries below (azure-core, aiohttp, asyncio) become sparkembed errors in
one place, :func:`map_error`; the OpenAI SDK's in :func:`sparkembed.backends.openai_v1.map_openai_error`.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import socket
from collections.abc import Mapping
from typing import Any

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
)

from sparkembed.backends.transport import check_endpoint_url, hide_bridge_traffic
from sparkembed.config import EmbedConfig
from sparkembed.core.retry import retry_after_s
from sparkembed.core.types import BackendResponse
from sparkembed.errors import ConfigError, ServiceError, TransportError

log = logging.getLogger(__name__)

USER_AGENT = "sparkembed"
MAX_MESSAGE_CHARS = 500
"""Error messages quoted from the service or a library are cut to this length."""


class HttpBackend:
    """What the HTTP backends share: a lazily built client and credential, closed
    together, and the switch to ``float`` when a model refuses base64.

    Subclasses implement ``_send(texts)``.

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
            if not (self._format == "base64" and refuses_base64(error)):
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
        return TransportError(clean_message(f"incomplete response: {exc}", secret))
    if isinstance(exc, (DecodeError, msgspec.DecodeError)):
        return ServiceError(502, "invalid_response", clean_message(f"undecodable body: {exc}", secret))
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        code, message = _service_error_detail(exc)
        headers = getattr(exc.response, "headers", None) or {}
        return ServiceError(
            exc.status_code,
            code,
            clean_message(message, secret),
            retry_after_s=retry_after_s(dict(headers.items())),
        )
    if isinstance(exc, ClientAuthenticationError):
        # No HTTP answer: the credential could not get a token. As a 401 it stops the
        # preflight at once instead of being retried as a network error.
        message = f"{type(exc).__name__}: {exc.message}"
        return ServiceError(401, "credential_unavailable", clean_message(message, secret))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransportError("timed out waiting for the service")
    if isinstance(exc, (AzureError, aiohttp.ClientError, OSError)):
        inner = getattr(exc, "inner_exception", None) or exc
        if isinstance(inner, aiohttp.ClientConnectorError):
            return unreachable(inner)
        return TransportError(clean_message(f"{type(inner).__name__}: {inner}", secret))
    return TransportError(clean_message(f"unexpected {type(exc).__name__}: {exc}", secret))


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


def clean_message(message: str, secret: str | None) -> str:
    if secret and len(secret) >= MIN_MASKED_SECRET:
        message = message.replace(secret, "***")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    return message


def refuses_base64(error: ServiceError) -> bool:
    said = f"{error.code or ''} {error.message}".lower()
    return error.status in (400, 422) and "encoding_format" in said

