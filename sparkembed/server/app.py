"""The local embeddings endpoint as an aiohttp application.

Routes (all POST, same handler):

- ``/embeddings`` and ``/models/embeddings`` (Azure AI model inference; any ``api-version``),
- ``/openai/deployments/{deployment}/embeddings`` (Azure OpenAI),
- ``/openai/v1/embeddings`` (OpenAI-compatible v1; the ``openai`` SDK works unchanged).

Test accounting: ``GET /_stats`` (``?billed=0`` omits the per-text dict) and ``POST /_reset``,
both without auth and from loopback only.

One request goes through: latency → auth → deployment → connection-reset fault → 5xx fault →
validation → ``--fail-text`` → token limit → quota (charged at admission) → embed → billing →
slow fault → answer. Resets happen before billing; slow answers after it, as in reality,
so a client that times out on a slow answer pays twice.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import socket
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web

from sparkembed.server.faults import Faults
from sparkembed.server.models import EmbeddingModel, load_model
from sparkembed.server.protocol import (
    ApiError,
    check_fail_texts,
    check_token_counts,
    parse_request,
    response_body,
)
from sparkembed.server.quota import Admission, Quota
from sparkembed.server.settings import ServerSettings
from sparkembed.server.stats import Stats

# 2048 inputs of 8191 tokens are up to ~64 MiB of JSON; leave room for escapes.
MAX_BODY_BYTES = 256 * 1024 * 1024
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
UNAUTHORIZED_MESSAGE = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API endpoint "
    "for your resource."
)
EMBEDDING_ROUTES = (
    "/embeddings",
    "/models/embeddings",
    "/openai/deployments/{deployment}/embeddings",
    "/openai/v1/embeddings",
)


@dataclass
class EndpointState:
    """Everything the handlers share within one server process."""

    settings: ServerSettings
    model: EmbeddingModel
    quota: Quota
    faults: Faults
    stats: Stats


STATE = web.AppKey("state", EndpointState)


def create_app(
    settings: ServerSettings,
    model: EmbeddingModel | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """Build the application.

    Args:
        settings: server settings.
        model: the model to serve; built from ``settings.model`` when None.
        clock: monotonic clock in seconds, for the quota (fixed windows start at its
            multiples of the window length).
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = EndpointState(
        settings=settings,
        model=model or load_model(settings.model, settings.dimensions),
        quota=Quota(
            settings.tokens_per_minute,
            settings.requests_per_minute,
            clock,
            limiter=settings.limiter,
            window_scale=settings.window_scale,
            tpm_jitter=settings.tpm_jitter,
            report_remaining=settings.quota_headers,
            seed=settings.seed,
        ),
        faults=Faults(settings),
        stats=Stats(),
    )
    for path in EMBEDDING_ROUTES:
        app.router.add_post(path, handle_embeddings)
    app.router.add_get("/_stats", handle_stats)
    app.router.add_post("/_reset", handle_reset)
    app.router.add_post("/_outage", handle_outage)
    return app


async def handle_embeddings(request: web.Request) -> web.StreamResponse:
    """Answer one embeddings request on any of the embedding routes."""
    state = request.app[STATE]
    state.stats.request_started()
    state.stats.saw_connection(request.transport)
    request_id = str(uuid.uuid4())
    try:
        await request.read()
        if state.settings.latency_ms:
            await asyncio.sleep(state.settings.latency_ms / 1000.0)
        response = await _answer(state, request, request_id)
    except ApiError as error:
        state.stats.responded(error.status)
        response = error.to_response()
    finally:
        state.stats.request_finished()
    response.headers.update(_id_headers(request, request_id))
    body = response.body if isinstance(response, web.Response) else None
    if isinstance(body, bytes) and len(body) > _CHUNK:
        return await _send_in_chunks(request, response.status, response.headers, body)
    return response


_CHUNK = 1 << 18


async def _send_in_chunks(
    request: web.Request, status: int, headers: Mapping[str, str], body: bytes
) -> web.StreamResponse:
    """Send a large answer a slice at a time, as the socket takes it.

    Written whole, an 8 MB answer is copied three times on Python 3.11 (aiohttp joins it to
    the headers; asyncio slices off what the socket took and buffers the rest), and the
    buffer is shifted after every send: about 6 ms of CPU an answer. Slices of a memoryview
    cost no copy, and the buffer stays small.
    """
    stream = web.StreamResponse(status=status, headers=headers)
    stream.content_length = len(body)
    await stream.prepare(request)
    view = memoryview(body)
    for start in range(0, len(body), _CHUNK):
        await stream.write(view[start : start + _CHUNK])  # waits while the socket is full
    await stream.write_eof()
    return stream


async def _answer(state: EndpointState, request: web.Request, request_id: str) -> web.Response:
    settings = state.settings
    if state.faults.in_outage():
        return _drop_connection(request)
    _authorize(state, request)
    _check_deployment(settings, request)
    if state.faults.drop_connection():
        return _drop_connection(request)
    status = state.faults.error_status()
    if status is not None:
        code = "InternalServerError" if status == 500 else "ServiceUnavailable"
        raise ApiError(status, code, "The server had an error processing your request.")

    embed_request = parse_request(
        await request.read(),
        request.headers.get("extra-parameters"),
        state.model,
        settings.max_inputs,
    )
    check_fail_texts(embed_request.texts, settings.fail_texts)
    prepared = state.model.prepare(embed_request.texts)
    check_token_counts(prepared.token_counts, settings.max_input_tokens)
    prompt_tokens = sum(prepared.token_counts)
    admission = state.quota.admit(prompt_tokens)
    if not admission.admitted:
        raise _rate_limited(admission)

    vectors = state.model.embed(
        embed_request.texts,
        prepared.encodings,
        embed_request.dimensions,
        embed_request.input_type,
        digests=prepared.digests,
    )
    state.stats.billed_ok(prepared.digests, prompt_tokens)
    delay_s = state.faults.slow_delay_s()
    if delay_s:
        await asyncio.sleep(delay_s)
    order = state.faults.order(list(range(len(embed_request.texts))))
    body = response_body(request_id, embed_request, vectors, order, prompt_tokens)
    return web.Response(body=body, content_type="application/json", headers=_quota_headers(admission))


def _authorize(state: EndpointState, request: web.Request) -> None:
    settings = state.settings
    bearer = _bearer_token(request.headers.get("Authorization"))
    if bearer is not None:
        state.stats.saw_bearer_token(bearer)
    if settings.no_auth:
        return
    if settings.key and (
        _same_secret(request.headers.get("api-key"), settings.key) or _same_secret(bearer, settings.key)
    ):
        return
    prefix = settings.accept_token_prefix
    if prefix and bearer is not None and bearer.startswith(prefix):
        return
    raise ApiError(401, "401", UNAUTHORIZED_MESSAGE)


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same_secret(offered: str | None, expected: str) -> bool:
    # Constant-time comparison so response timing does not leak the key.
    return offered is not None and hmac.compare_digest(offered.encode(), expected.encode())


def _check_deployment(settings: ServerSettings, request: web.Request) -> None:
    deployment = request.match_info.get("deployment")
    if deployment is not None and settings.deployments and deployment not in settings.deployments:
        raise ApiError(
            404,
            "DeploymentNotFound",
            f"The API deployment {deployment!r} for this resource does not exist.",
        )


def _drop_connection(request: web.Request) -> web.Response:
    """Drop the connection with a TCP reset and no HTTP answer (nothing is billed)."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close() send RST, as a crashed proxy would, rather than FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp fails to write this to the closed transport and drops it quietly.
    return web.Response(status=599)


def _rate_limited(admission: Admission) -> ApiError:
    retry_after_ms = max(1, math.ceil(admission.retry_after_s * 1000))
    seconds = math.ceil(retry_after_ms / 1000)
    return ApiError(
        429,
        "429",
        "Requests to the Embeddings operation have exceeded the rate limit of this deployment. "
        f"Please retry after {seconds} second{'s' if seconds != 1 else ''}.",
        headers={
            "retry-after-ms": str(retry_after_ms),
            "retry-after": str(seconds),
            **_quota_headers(admission),
        },
    )


def _quota_headers(admission: Admission) -> dict[str, str]:
    headers = {}
    if admission.remaining_tokens is not None:
        headers["x-ratelimit-remaining-tokens"] = str(admission.remaining_tokens)
    if admission.remaining_requests is not None:
        headers["x-ratelimit-remaining-requests"] = str(admission.remaining_requests)
    return headers


def _id_headers(request: web.Request, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id, "apim-request-id": request_id}
    client_request_id = request.headers.get("x-ms-client-request-id")
    if client_request_id:
        headers["x-ms-client-request-id"] = client_request_id
    return headers


def _require_loopback(request: web.Request) -> None:
    if request.remote not in LOOPBACK_ADDRESSES:
        raise web.HTTPForbidden(text="/_stats and /_reset answer loopback clients only")


async def handle_stats(request: web.Request) -> web.Response:
    """``GET /_stats``: the accounting document (see :class:`Stats`)."""
    _require_loopback(request)
    include_billed = request.query.get("billed", "1") not in ("0", "false", "no")
    document = request.app[STATE].stats.to_json(include_billed=include_billed)
    return web.Response(body=orjson.dumps(document), content_type="application/json")


async def handle_outage(request: web.Request) -> web.Response:
    """``POST /_outage?seconds=S``: for S seconds every embeddings request loses its connection."""
    _require_loopback(request)
    try:
        seconds = float(request.query["seconds"])
    except (KeyError, ValueError):
        raise web.HTTPBadRequest(text="give ?seconds=S") from None
    request.app[STATE].faults.start_outage(seconds)
    return web.json_response({"outage_s": seconds})


async def handle_reset(request: web.Request) -> web.Response:
    """``POST /_reset``: zero the stats, refill the quota and restart the fault streams (and
    end an outage)."""
    _require_loopback(request)
    state = request.app[STATE]
    state.stats.reset()
    state.quota.reset()
    state.faults.reseed()
    return web.json_response({"reset": True})
