"""The azure-ai-inference backend's fast path: the SDK's own request, the raw body, bulk decoding.

A recording aiohttp server on loopback answers both the unchanged SDK ``embed`` and
:class:`RawEmbeddingsClient` built on the same SDK client, so the two are compared request for
request and error for error over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from azure.ai.inference.aio import EmbeddingsClient
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from pydantic import SecretStr

from sparkembed.backends.azure_inference import AzureInferenceBackend, RawEmbeddingsClient
from sparkembed.backends.http import decode_response, map_error
from sparkembed.config import validate_config
from sparkembed.core import wordllama
from sparkembed.errors import ServiceError
from sparkembed.server.models import HashModel

KEY = "fast-path-key-0123"
TEXTS = ["hello world", "émigré café", "lone \ud800 surrogate", 'quote " and \\ backslash']
DIMS = 8


def b64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()


VECTORS = np.arange(len(TEXTS) * DIMS, dtype=np.float32).reshape(len(TEXTS), DIMS) / 10
OK_BODY = json.dumps(
    {
        "id": "resp-7",
        "object": "list",
        "model": "m",
        # Shuffled on purpose: vectors are placed by index.
        "data": [{"index": i, "object": "embedding", "embedding": b64(VECTORS[i])} for i in (2, 0, 3, 1)],
        "usage": {"prompt_tokens": 11, "total_tokens": 11},
    }
).encode()


@dataclass
class Recorder:
    """Answers every POST with ``answer`` and keeps what it was sent."""

    answer: tuple[int, bytes, dict[str, str]] = (200, OK_BODY, {})
    content_type: str = "application/json"
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": await request.read(),
            }
        )
        status, body, headers = self.answer
        return web.Response(status=status, body=body, headers=headers, content_type=self.content_type)


@asynccontextmanager
async def recording_server(recorder: Recorder) -> AsyncIterator[str]:
    """``http://127.0.0.1:PORT`` of a server answering with ``recorder``."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def sdk_client(url: str) -> EmbeddingsClient:
    return EmbeddingsClient(
        f"{url}/models",
        AzureKeyCredential(KEY),
        model="m",
        dimensions=DIMS,
        input_type="query",
        retry_total=0,
    )


def raw_client(client: EmbeddingsClient) -> RawEmbeddingsClient:
    return RawEmbeddingsClient(client, model="m", dimensions=DIMS, input_type="query")


async def both_calls(recorder: Recorder, call: Callable[[Any, Any], Any]) -> list[Any]:
    """``call(sdk, raw)`` results, with one SDK client under both, against ``recorder``."""
    async with recording_server(recorder) as url:
        client = sdk_client(url)
        try:
            return await call(client, raw_client(client))
        finally:
            await client.close()


def test_the_raw_client_sends_the_request_the_sdk_sends() -> None:
    recorder = Recorder()

    async def call(sdk: Any, raw: Any) -> list[Any]:
        return [
            await sdk.embed(input=TEXTS, encoding_format="base64", request_id="r-1"),
            await raw.embed(input=TEXTS, encoding_format="base64", request_id="r-1"),
        ]

    sdk_result, raw_body = asyncio.run(both_calls(recorder, call))
    by_sdk, by_raw = recorder.requests
    assert by_raw["body"] == by_sdk["body"]  # byte for byte: same keys, order and escapes
    assert json.loads(by_raw["body"])["input"] == TEXTS
    for key in ("method", "path", "query"):
        assert by_raw[key] == by_sdk[key], key
    assert (by_raw["path"], by_raw["query"]) == ("/models/embeddings", {"api-version": "2024-05-01-preview"})
    # Same headers; the SDK's user agent names the calling operation, so compare its start.
    assert by_raw["headers"].keys() == by_sdk["headers"].keys()
    for name, value in by_sdk["headers"].items():
        if name != "user-agent":
            assert by_raw["headers"][name] == value, name
    assert by_raw["headers"]["user-agent"].split()[0] == by_sdk["headers"]["user-agent"].split()[0]
    assert (by_raw["headers"]["api-key"], by_raw["headers"]["authorization"]) == (KEY, f"Bearer {KEY}")
    assert by_raw["headers"]["x-ms-client-request-id"] == "r-1"
    # The same answer, read both ways.
    decoded = decode_response(raw_body, len(TEXTS))
    assert decoded.vectors.tolist() == VECTORS.tolist()
    from_sdk = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in sdk_result.data])
    assert from_sdk[np.argsort([d.index for d in sdk_result.data])].tolist() == VECTORS.tolist()
    assert (decoded.prompt_tokens, decoded.model, decoded.request_id) == (11, "m", "resp-7")


ERROR_ANSWERS = [
    (
        429,
        b'{"error": {"code": "RateLimitReached", "message": "Please retry after 2 seconds."}}',
        {"retry-after-ms": "1500", "retry-after": "2"},
    ),
    (401, b'{"error": {"code": "401", "message": "Access denied due to invalid key."}}', {}),
    (404, b'{"error": {"code": "DeploymentNotFound", "message": "No such deployment."}}', {}),
    (400, b'{"error": {"code": "context_length_exceeded", "message": "input[3] too long"}}', {}),
    (500, b"<html>upstream broke</html>", {"content-type": "text/html"}),
    (503, b"", {"retry-after": "7"}),
]


@pytest.mark.parametrize(("status", "body", "headers"), ERROR_ANSWERS, ids=[str(a[0]) for a in ERROR_ANSWERS])
def test_error_answers_raise_and_map_exactly_as_through_the_sdk(
    status: int, body: bytes, headers: dict[str, str]
) -> None:
    content_type = headers.pop("content-type", "application/json")
    recorder = Recorder(answer=(status, body, headers), content_type=content_type)

    async def call(sdk: Any, raw: Any) -> list[Any]:
        raised = []
        for client in (sdk, raw):
            with pytest.raises(HttpResponseError) as caught:
                await client.embed(input=TEXTS, encoding_format="base64")
            raised.append(caught.value)
        return raised

    by_sdk, by_raw = asyncio.run(both_calls(recorder, call))
    assert type(by_raw) is type(by_sdk)
    mapped_sdk, mapped_raw = map_error(by_sdk), map_error(by_raw)
    assert isinstance(mapped_raw, ServiceError)
    assert vars(mapped_raw) == vars(mapped_sdk)
    assert mapped_raw.status == status


def raw_error(recorder: Recorder) -> Any:
    """What the raw client raises for ``recorder``'s answer, as :func:`map_error` maps it."""

    async def call(sdk: Any, raw: Any) -> list[Any]:
        with pytest.raises(HttpResponseError) as caught:
            await raw.embed(input=TEXTS, encoding_format="base64")
        return [caught.value]

    (raised,) = asyncio.run(both_calls(recorder, call))
    return map_error(raised)


def test_an_error_answer_maps_to_its_status_code_message_and_retry_after() -> None:
    error = raw_error(Recorder(answer=ERROR_ANSWERS[0]))
    assert isinstance(error, ServiceError)
    assert (error.status, error.code, error.message, error.retry_after_s) == (
        429,
        "RateLimitReached",
        "Please retry after 2 seconds.",
        1.5,
    )


def test_an_error_whose_body_claims_json_but_is_not_keeps_its_status() -> None:
    # Through the SDK, azure-core parsed the body before looking at the status, so this 503
    # became a DecodeError (502 invalid_response) and lost its retry-after.
    error = raw_error(Recorder(answer=(503, b"<html>busy</html>", {"retry-after": "3"})))
    assert isinstance(error, ServiceError)
    assert (error.status, error.retry_after_s) == (503, 3.0)


@pytest.mark.parametrize(("status", "kind"), [(401, ClientAuthenticationError), (404, ResourceNotFoundError)])
def test_401_and_404_raise_the_sdks_classes(status: int, kind: type) -> None:
    recorder = Recorder(answer=(status, b'{"error": {"code": "x", "message": "y"}}', {}))

    async def call(sdk: Any, raw: Any) -> list[Any]:
        with pytest.raises(kind):
            await raw.embed(input=TEXTS, encoding_format="base64")
        return []

    asyncio.run(both_calls(recorder, call))


def backend_for(url: str) -> AzureInferenceBackend:
    config = validate_config(
        {"endpoint": {"url": f"{url}/models", "model": "m", "dimensions": DIMS}, "auth": {"mode": "none"}}
    )
    return AzureInferenceBackend(config)


def test_a_200_that_is_not_json_is_an_invalid_response() -> None:
    recorder = Recorder(answer=(200, b"<html>a proxy page</html>", {}))

    async def go() -> ServiceError:
        async with recording_server(recorder) as url:
            backend = backend_for(url)
            try:
                with pytest.raises(ServiceError) as caught:
                    await backend.embed(TEXTS)
                return caught.value
            finally:
                await backend.close()

    error = asyncio.run(go())
    assert (error.status, error.code) == (502, "invalid_response")
    assert error.message.startswith("undecodable body")


def test_the_backend_embeds_through_the_fast_path_and_places_by_index() -> None:
    recorder = Recorder()

    async def go() -> Any:
        async with recording_server(recorder) as url:
            backend = backend_for(url)
            try:
                return await backend.embed(TEXTS)
            finally:
                await backend.close()

    response = asyncio.run(go())
    assert response.vectors.tolist() == VECTORS.tolist()
    assert response.vectors.flags.writeable
    (sent,) = recorder.requests
    assert json.loads(sent["body"]) == {
        "input": TEXTS,
        "dimensions": DIMS,
        "encoding_format": "base64",
        "model": "m",
    }


def test_the_local_endpoint_s_shuffled_answers_decode_to_the_hash_model_s_vectors(
    start_endpoint: Any, endpoint_key: str
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", "32", "--shuffle", "--seed", "4")
    texts = [f"text {i}: " + " ".join(["river", "stone", "lake"][: 1 + i % 3]) for i in range(40)]
    config = validate_config({"endpoint": {"url": endpoint.url}, "auth": {"mode": "key"}})
    config = config.model_copy(
        update={"auth": config.auth.model_copy(update={"key": SecretStr(endpoint_key)})}
    )
    backend = AzureInferenceBackend(config)

    async def go() -> Any:
        try:
            return await backend.embed(texts)
        finally:
            await backend.close()

    response = asyncio.run(go())
    np.testing.assert_array_equal(response.vectors, HashModel(32).embed(texts, [], 32, "text"))
    assert response.prompt_tokens == sum(wordllama.count_tokens(texts))


# -- decode_response on its own ----------------------------------------------------------------


def body_of(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"data": data, "usage": {"prompt_tokens": 2}}


def test_decode_places_base64_vectors_by_index_in_one_pass() -> None:
    order = [3, 1, 0, 2]
    data = [{"index": i, "embedding": b64(VECTORS[i])} for i in order]
    response = decode_response(body_of(data), 4)
    assert response.vectors.tolist() == VECTORS.tolist()
    assert response.vectors.dtype == np.float32 and response.vectors.flags.writeable


FIRST = {"index": 0, "embedding": b64(VECTORS[0])}
SECOND = b64(VECTORS[1])


def after_first(item: Any) -> dict[str, Any]:
    """A two-item body: a good first item, then ``item``."""
    return body_of([FIRST, item])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (["not", "an", "object"], "body is a list"),
        ({"data": [FIRST, "x"]}, "not an object"),
        (after_first({"index": 0, "embedding": SECOND}), "index 0"),
        (after_first({"index": 2, "embedding": SECOND}), "index 2"),
        (after_first({"index": True, "embedding": SECOND}), "True"),
        (after_first({"index": 1.0, "embedding": SECOND}), "1.0"),
        (after_first({"embedding": SECOND}), "None"),
        (after_first({"index": 1, "embedding": b64(VECTORS[1][:5])}), "5 values"),
        (after_first({"index": 1, "embedding": "%%%%"}), "base64"),
        (after_first({"index": 1, "embedding": [[1.0, 2.0]]}), "flat list"),
        (body_of([{"index": 0, "embedding": ""}, {"index": 1, "embedding": ""}]), "0 values"),
        (
            body_of([{"index": 0, "embedding": "AAAAAAA="}, {"index": 1, "embedding": "AAAAAAA="}]),
            "not float32",
        ),
        (
            body_of([{"index": 0, "embedding": b64([np.inf] * DIMS)}, {"index": 1, "embedding": SECOND}]),
            "finite",
        ),
        (
            body_of([{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": SECOND}]),
            "8 values, expected 1",
        ),
    ],
)
def test_decode_refuses_what_is_not_one_vector_per_index(body: Any, why: str) -> None:
    with pytest.raises(ServiceError, match=why) as caught:
        decode_response(body, 2)
    assert (caught.value.status, caught.value.code) == (502, "invalid_response")


def test_decode_takes_float_lists_and_base64_mixed() -> None:
    data = [{"index": 1, "embedding": VECTORS[1].tolist()}, {"index": 0, "embedding": b64(VECTORS[0])}]
    response = decode_response(body_of(data), 2)
    np.testing.assert_array_equal(response.vectors, VECTORS[:2])


@pytest.mark.parametrize(("no_proxy", "via_proxy"), [("", True), ("127.0.0.1", False)])
def test_the_backend_takes_the_environment_s_proxy_unless_no_proxy_names_the_host(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, via_proxy: bool
) -> None:
    """aiohttp's per-request environment lookup is off; the backend reads the proxy once."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    target, proxy = Recorder(), Recorder()  # the "proxy" answers by itself

    async def go() -> Any:
        async with recording_server(target) as url, recording_server(proxy) as proxy_url:
            monkeypatch.setenv("HTTP_PROXY", proxy_url)
            monkeypatch.setenv("NO_PROXY", no_proxy)
            backend = backend_for(url)
            try:
                return await backend.embed(TEXTS)
            finally:
                await backend.close()

    assert asyncio.run(go()).vectors.tolist() == VECTORS.tolist()
    assert (len(proxy.requests), len(target.requests)) == ((1, 0) if via_proxy else (0, 1))
