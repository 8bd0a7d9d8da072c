"""The local endpoint: pure parts on a fake clock, then the unchanged SDKs over real sockets."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from pydoc_data.topics import topics
from typing import Any

import numpy as np
import pytest
from azure.ai.inference import EmbeddingsClient
from azure.ai.inference.models import EmbeddingEncodingFormat, EmbeddingInputType
from azure.core.credentials import AccessToken, AzureKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from sparkembed.core import wordllama as wordllama_local
from sparkembed.server.launch import start_local_endpoint
from sparkembed.server.models import HashModel, hash_vectors
from sparkembed.server.quota import Quota

TEXTS = ["the first text", "a second, longer text about sparks", "third", "naïve café ☃"]


class FakeClock:
    """A monotonic clock that moves only when told to (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def words(n: int) -> str:
    """A text of exactly ``n`` tokens."""
    return " ".join(["word"] * n)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def decode_base64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def by_index(result: Any) -> list[Any]:
    """Vectors placed by ``index``, never by list position."""
    placed: list[Any] = [None] * len(result.data)
    for item in result.data:
        placed[item.index] = item.embedding
    return placed


def service_error(error: HttpResponseError) -> tuple[int | None, str | None, str]:
    """(HTTP status, service error code, service message) as the SDK parsed them."""
    assert error.error is not None, "the body was not an Azure error document"
    return error.status_code, error.error.code, error.error.message or ""


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST JSON with urllib; return (status, decoded body) for any status."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---------------------------------------------------------------- pure parts, no server


def test_token_quota_refills_tpm_over_a_minute() -> None:
    clock = FakeClock()
    quota = Quota(tokens_per_minute=600, requests_per_minute=None, clock=clock)
    first = quota.admit(500)
    assert (first.admitted, first.remaining_tokens, first.remaining_requests) == (True, 100, None)
    refused = quota.admit(200)  # 100 missing at 10 tokens/s
    assert (refused.admitted, refused.retry_after_s) == (False, pytest.approx(10.0))
    clock.now += 9.9
    assert not quota.admit(200).admitted
    clock.now += 0.1
    assert quota.admit(200).admitted


def test_request_quota_is_checked_over_ten_second_windows() -> None:
    clock = FakeClock()
    quota = Quota(tokens_per_minute=None, requests_per_minute=60, clock=clock)
    assert all(quota.admit(1).admitted for _ in range(10))  # 60 per minute = 10 per 10 s
    refused = quota.admit(1)
    assert (refused.admitted, refused.retry_after_s) == (False, pytest.approx(1.0))
    clock.now += 1.0
    assert quota.admit(1).remaining_requests == 0


def test_request_larger_than_the_quota_waits_for_a_full_bucket_then_leaves_a_debt() -> None:
    clock = FakeClock()
    quota = Quota(tokens_per_minute=60, requests_per_minute=None, clock=clock)
    assert quota.admit(100).admitted
    refused = quota.admit(1)  # level is -40 at 1 token/s
    assert refused.retry_after_s == pytest.approx(41.0)
    quota.reset()
    assert quota.admit(60).remaining_tokens == 0


def test_hash_vectors_are_deterministic_unit_and_share_prefixes() -> None:
    model = HashModel()
    texts = ["alpha", "beta", "alpha"]
    full = model.embed(texts, [], 1536, "text")
    assert full.shape == (3, 1536) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(full[0], full[2])
    assert abs(float(full[0] @ full[1])) < 0.2
    small = model.embed(texts, [], 7, "text")
    np.testing.assert_allclose(small[0], full[0, :7] / np.linalg.norm(full[0, :7]), rtol=1e-5)
    query = model.embed(texts, [], 1536, "query")
    assert abs(float(query[0] @ full[0])) < 0.2
    assert hash_vectors(np.array([1, 2], dtype=np.uint64), 3).shape == (2, 3)
    # The endpoint hands over the digests it bills under; the vectors are the same.
    digests = model.prepare(texts).digests
    assert digests == [hashlib.sha256(t.encode()).digest() for t in texts]
    np.testing.assert_array_equal(model.embed(texts, [], 1536, "text", digests=digests), full)


def test_wordllama_local_matches_the_wordllama_library() -> None:
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    tokenizer = Tokenizer.from_file(str(wordllama_local.package_dir() / wordllama_local.TOKENIZER_FILE))
    library = WordLlamaInference(wordllama_local.load_matrix(), tokenizer)
    texts = ["The cat sat on the mat.", "Quantum electrodynamics", words(9000)]
    np.testing.assert_allclose(wordllama_local.embed(texts), library.embed(texts, norm=True), atol=1e-4)
    assert wordllama_local.count_tokens(["", "hello world", words(9000)]) == [0, 2, 9000]
    assert not wordllama_local.embed([""]).any()


# ---------------------------------------------------------------- over real sockets


@pytest.fixture(scope="module")
def hash_endpoint(start_endpoint: Any) -> Any:
    return start_endpoint(
        "--model", "hash", "--shuffle", "--seed", "7", "--max-inputs", "16",
        "--max-input-tokens", "50", "--fail-text", "POISON", "--accept-token-prefix", "entra-",
        "--deployment", "emb-small",
    )  # fmt: skip


@pytest.fixture(scope="module")
def wordllama_endpoint(start_endpoint: Any) -> Any:
    return start_endpoint("--model", "wordllama")


@pytest.fixture()
def client(hash_endpoint: Any, endpoint_key: str) -> EmbeddingsClient:
    hash_endpoint.reset()
    return EmbeddingsClient(f"{hash_endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0)


@pytest.mark.integration
def test_float_and_base64_carry_the_same_vectors_placed_by_index(
    client: EmbeddingsClient,
) -> None:
    floats = client.embed(input=TEXTS)
    packed = client.embed(input=TEXTS, encoding_format=EmbeddingEncodingFormat.BASE64)
    assert [item.index for item in floats.data] != [0, 1, 2, 3]  # --shuffle, seed 7
    from_floats = np.array(by_index(floats), dtype=np.float32)
    from_base64 = np.stack([decode_base64(s) for s in by_index(packed)])
    np.testing.assert_array_equal(from_floats, from_base64)
    expected = HashModel().embed(TEXTS, [], 1536, "text")
    np.testing.assert_array_equal(from_base64, expected)
    tokens = sum(wordllama_local.count_tokens(TEXTS))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    assert floats.model == "hash-embedding"


@pytest.mark.integration
def test_an_answer_of_many_megabytes_arrives_whole_in_both_encodings(
    start_endpoint: Any, endpoint_key: str
) -> None:
    """Answers over 256 KiB go out slice by slice: 512 vectors of 1536 floats are 4 MB in base64."""
    endpoint = start_endpoint("--model", "hash", "--shuffle", "--seed", "3")
    client = EmbeddingsClient(f"{endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0)
    texts = [f"text {i} " + words(i % 30 + 1) for i in range(512)]
    packed = client.embed(input=texts, encoding_format=EmbeddingEncodingFormat.BASE64)
    floats = client.embed(input=texts)
    expected = HashModel().embed(texts, [], 1536, "text")
    np.testing.assert_array_equal(np.stack([decode_base64(s) for s in by_index(packed)]), expected)
    np.testing.assert_array_equal(np.array(by_index(floats), dtype=np.float32), expected)


@pytest.mark.integration
def test_dimensions_and_input_type_shape_the_vectors(client: EmbeddingsClient) -> None:
    result = client.embed(input=["hello"], dimensions=64, model="text-embedding-3-small")
    vector = np.array(result.data[0].embedding)
    assert vector.shape == (64,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
    assert result.model == "text-embedding-3-small"
    query = client.embed(input=["hello"], input_type=EmbeddingInputType.QUERY)
    document = client.embed(input=["hello"], input_type=EmbeddingInputType.DOCUMENT)
    assert query.data[0].embedding != document.data[0].embedding


@pytest.mark.integration
@pytest.mark.parametrize(
    ("inputs", "code", "in_message"),
    [
        ([f"t{i}" for i in range(17)], "too_many_inputs", "max number of inputs is 16"),
        (["fine", ""], "invalid_input", "input[1] is an empty string"),
        (["ok", words(60)], "context_length_exceeded", "is 50 tokens, however input[1] has 60"),
        (["ok", "a POISON pill"], "invalid_input", "input[1] contains the rejected text 'POISON'"),
    ],
)
def test_bad_inputs_get_400(client: EmbeddingsClient, inputs: list[str], code: str, in_message: str) -> None:
    with pytest.raises(HttpResponseError) as caught:
        client.embed(input=inputs)
    status, error_code, message = service_error(caught.value)
    assert (status, error_code) == (400, code)
    assert in_message in message


@pytest.mark.integration
def test_unsupported_values_get_422_and_unknown_fields_400(
    hash_endpoint: Any, endpoint_key: str, wordllama_endpoint: Any
) -> None:
    wordllama = EmbeddingsClient(
        f"{wordllama_endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0
    )
    with pytest.raises(HttpResponseError) as caught:
        wordllama.embed(input=["x"], dimensions=257)
    assert service_error(caught.value)[:2] == (422, "UnsupportedParameter")
    url, key = f"{hash_endpoint.url}/embeddings?api-version=2024-05-01-preview", endpoint_key
    status, body = post(url, {"input": ["x"], "input_type": "passage"}, {"api-key": key})
    assert (status, body["error"]["code"]) == (422, "UnsupportedParameter")
    status, _ = post(url, {"input": ["x"], "encoding_format": "int8"}, {"api-key": key})
    assert status == 422
    status, body = post(url, {"input": ["x"], "temperature": 1}, {"api-key": key})
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    headers = {"api-key": key, "extra-parameters": "drop"}
    assert post(url, {"input": ["x"], "temperature": 1}, headers)[0] == 200


@pytest.mark.integration
def test_bad_or_missing_credentials_get_401(hash_endpoint: Any) -> None:
    bad = EmbeddingsClient(f"{hash_endpoint.url}/models", AzureKeyCredential("wrong"), retry_total=0)
    with pytest.raises(ClientAuthenticationError) as caught:
        bad.embed(input=["x"])
    assert service_error(caught.value)[:2] == (401, "401")
    status, body = post(f"{hash_endpoint.url}/embeddings", {"input": ["x"]}, {})
    assert (status, body["error"]["code"]) == (401, "401")


class FakeEntraCredential:
    """A TokenCredential handing out a new token on each call (as a refresh would)."""

    def __init__(self) -> None:
        self.calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        # Expiring within the refresh margin makes the SDK fetch a new token per request.
        return AccessToken(f"entra-token-{self.calls}", int(time.time()) + 60)


@pytest.mark.integration
def test_bearer_tokens_with_the_accepted_prefix_pass_and_are_counted(hash_endpoint: Any) -> None:
    hash_endpoint.reset()
    client = EmbeddingsClient(
        f"{hash_endpoint.url}/models",
        FakeEntraCredential(),
        credential_scopes=["https://cognitiveservices.azure.com/.default"],
        retry_total=0,
    )
    for _ in range(2):
        assert len(client.embed(input=["x"], enforce_https=False).data) == 1
    assert hash_endpoint.stats(billed=False)["bearer_tokens_seen"] == 2


@pytest.mark.integration
def test_deployment_routes_and_the_openai_sdk(hash_endpoint: Any, endpoint_key: str) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url=f"{hash_endpoint.url}/openai/v1", api_key=endpoint_key, max_retries=0)
    default_base64 = openai.embeddings.create(input=TEXTS, model="text-embedding-3-small")
    floats = openai.embeddings.create(input=TEXTS, model="m", encoding_format="float")
    expected = HashModel().embed(TEXTS, [], 1536, "text")
    for result in (default_base64, floats):
        np.testing.assert_allclose(np.array(by_index(result)), expected, rtol=1e-6)
    from openai import AzureOpenAI

    azure = AzureOpenAI(
        azure_endpoint=hash_endpoint.url, api_key=endpoint_key, api_version="2024-10-21", max_retries=0
    )
    deployment = azure.embeddings.create(input=TEXTS, model="emb-small")  # /openai/deployments/emb-small
    np.testing.assert_allclose(np.array(by_index(deployment)), expected, rtol=1e-6)
    url = f"{hash_endpoint.url}/openai/deployments/emb-small/embeddings?api-version=2024-10-21"
    assert post(url, {"input": "one"}, {"api-key": endpoint_key})[0] == 200
    unknown = url.replace("emb-small", "emb-large")
    status, body = post(unknown, {"input": "one"}, {"api-key": endpoint_key})
    assert (status, body["error"]["code"]) == (404, "DeploymentNotFound")


@pytest.mark.integration
def test_stats_account_every_billed_text(client: EmbeddingsClient, hash_endpoint: Any) -> None:
    first = client.embed(input=["a", "b"])
    second = client.embed(input=["b"])
    with pytest.raises(HttpResponseError):
        client.embed(input=[""])
    stats = hash_endpoint.stats()
    assert stats["requests"] == 3
    assert stats["responses"] == {"200": 2, "400": 1}
    assert (stats["ok_requests"], stats["texts_billed"]) == (2, 3)
    assert stats["prompt_tokens"] == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert stats["billed"] == {sha256_hex("a"): 1, sha256_hex("b"): 2}
    # The SDK keeps its connection alive; stats polling is not counted.
    assert stats["connections"] == 1 and stats["max_concurrent"] == 1
    assert "billed" not in hash_endpoint.stats(billed=False)


@pytest.mark.integration
def test_quota_answers_429_with_retry_after(start_endpoint: Any, endpoint_key: str) -> None:
    endpoint = start_endpoint("--model", "hash", "--tpm", "60", "--rpm", "600")
    status, headers = _post_status_headers(endpoint.url, endpoint_key, [words(40)])
    assert status == 200
    # Buckets start full: 60 tokens, and 600 RPM allows 100 requests per 10 s.
    assert (headers["x-ratelimit-remaining-tokens"], headers["x-ratelimit-remaining-requests"]) == (
        "20",
        "99",
    )
    status, headers = _post_status_headers(endpoint.url, endpoint_key, [words(40)])
    assert status == 429
    # 20 tokens are left and refill at 1 token/s: about 20 s until 40 are there.
    assert 19_000 < int(headers["retry-after-ms"]) <= 20_000
    assert headers["retry-after"] == "20"
    client = EmbeddingsClient(f"{endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0)
    with pytest.raises(HttpResponseError) as caught:
        client.embed(input=[words(40)])
    assert service_error(caught.value)[:2] == (429, "429")
    assert endpoint.stats()["responses"] == {"200": 1, "429": 2}


def _post_status_headers(url: str, key: str, inputs: list[str]) -> tuple[int, dict[str, str]]:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        body = json.dumps({"input": inputs})
        connection.request("POST", "/embeddings", body, {"api-key": key})
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@pytest.mark.integration
def test_reset_fault_drops_the_connection_before_billing(start_endpoint: Any, endpoint_key: str) -> None:
    endpoint = start_endpoint("--model", "hash", "--reset-rate", "1")
    client = EmbeddingsClient(f"{endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0)
    with pytest.raises((ServiceRequestError, ServiceResponseError)):
        client.embed(input=["x"])
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        _post_status_headers(endpoint.url, endpoint_key, ["x"])
    stats = endpoint.stats()
    assert (stats["requests"], stats["responses"], stats["texts_billed"]) == (2, {}, 0)
    assert stats["connections"] == 2


@pytest.mark.integration
def test_an_outage_drops_every_request_until_it_ends_or_a_reset(
    start_endpoint: Any, endpoint_key: str
) -> None:
    endpoint = start_endpoint("--model", "hash")
    assert _post_status_headers(endpoint.url, endpoint_key, ["x"])[0] == 200
    endpoint.outage(0.5)
    for _ in range(2):
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            _post_status_headers(endpoint.url, endpoint_key, ["x"])
    time.sleep(0.6)
    assert _post_status_headers(endpoint.url, endpoint_key, ["x"])[0] == 200
    endpoint.outage(60)
    endpoint.reset()
    assert _post_status_headers(endpoint.url, endpoint_key, ["x"])[0] == 200
    assert endpoint.stats()["texts_billed"] == 1


@pytest.mark.integration
def test_error_faults_alternate_500_and_503(start_endpoint: Any, endpoint_key: str) -> None:
    endpoint = start_endpoint("--model", "hash", "--error-rate", "1")
    statuses = [_post_status_headers(endpoint.url, endpoint_key, ["x"])[0] for _ in range(3)]
    assert statuses == [500, 503, 500]
    assert endpoint.stats()["texts_billed"] == 0


@pytest.mark.integration
def test_slow_answer_after_a_client_timeout_is_billed_twice(start_endpoint: Any, endpoint_key: str) -> None:
    endpoint = start_endpoint("--model", "hash", "--slow-rate", "1", "--slow-ms", "400")
    impatient = EmbeddingsClient(
        f"{endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0, read_timeout=0.1
    )
    with pytest.raises(ServiceResponseError):
        impatient.embed(input=["slow"])
    patient = EmbeddingsClient(f"{endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0)
    threads = [threading.Thread(target=patient.embed, kwargs={"input": ["slow"]}) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = endpoint.stats()
    assert stats["billed"] == {sha256_hex("slow"): 3}
    assert stats["max_concurrent"] >= 2


@pytest.mark.integration
def test_wordllama_ranks_the_matching_topic_first(wordllama_endpoint: Any, endpoint_key: str) -> None:
    client = EmbeddingsClient(
        f"{wordllama_endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0
    )
    names = ["try", "for", "lambda", "import", "class", "with", "numbers", "slicings"]
    documents = client.embed(input=[topics[name] for name in names], input_type=EmbeddingInputType.DOCUMENT)
    question = "how do I catch and handle an exception raised by my code?"
    query = client.embed(input=[question], input_type=EmbeddingInputType.QUERY)
    matrix = np.array(by_index(documents), dtype=np.float32)
    assert matrix.shape == (len(names), 256)
    np.testing.assert_allclose(matrix, wordllama_local.embed([topics[n] for n in names]), atol=1e-6)
    scores = matrix @ np.array(query.data[0].embedding, dtype=np.float32)
    assert names[int(np.argmax(scores))] == "try"


@pytest.mark.integration
def test_wordllama_dimensions_truncate_and_renormalize(wordllama_endpoint: Any, endpoint_key: str) -> None:
    client = EmbeddingsClient(
        f"{wordllama_endpoint.url}/models", AzureKeyCredential(endpoint_key), retry_total=0
    )
    full = np.array(client.embed(input=["sparks"]).data[0].embedding)
    short = np.array(client.embed(input=["sparks"], dimensions=100).data[0].embedding)
    np.testing.assert_allclose(short, full[:100] / np.linalg.norm(full[:100]), atol=1e-6)


@pytest.mark.integration
def test_launch_reports_a_server_that_fails_to_start_and_stops_cleanly() -> None:
    with pytest.raises(RuntimeError, match="give --key"):
        start_local_endpoint("--model", "hash", env={"SPARKEMBED_SERVE_KEY": ""})
    with start_local_endpoint("--model", "hash", "--no-auth") as endpoint:
        assert post(f"{endpoint.url}/embeddings", {"input": "x"}, {})[0] == 200
    assert endpoint.process.returncode == 0
