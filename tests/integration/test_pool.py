"""A pool of deployments against local endpoints over real HTTP: routing by quota, failover
with exact vectors, and rows failing only when every deployment is out.

Quotas are metered on windows scaled to a 3 s "minute", so each run takes seconds.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from support import DIMS, build_config, corpus, expected

from sparkembed.backends import make_backend
from sparkembed.config import EmbedConfig, deployment_name
from sparkembed.core.engine import Embedder, build_routes
from sparkembed.core.metrics import Metrics
from sparkembed.core.streaming import EmbedResults
from sparkembed.server.launch import LocalEndpoint

pytestmark = pytest.mark.integration

SCALE = 0.05
MINUTE_S = 60 * SCALE


def start(start_endpoint: Any, tokens_per_minute: int, *more: str) -> LocalEndpoint:
    return start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--tpm", str(tokens_per_minute), "--rpm", "60000"),
        *("--limiter", "sliding-window", "--window-scale", str(SCALE), *more),
    )


def pool_config(key: str, *members: tuple[LocalEndpoint, int], **retry: Any) -> EmbedConfig:
    pool = [{"url": endpoint.url, "tokens_per_minute": tpm} for endpoint, tpm in members]
    return build_config(
        {
            "endpoint": {"pool": pool},
            "batching": {"max_inputs": 64},
            "limits": {"concurrency": 8},
            "retry": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "max_attempts": 12, **retry},
        },
        key=key,
    )


def run(
    config: EmbedConfig, texts: list[str], after_chunk: Any = None, chunk_rows: int = 250
) -> tuple[EmbedResults, Metrics]:
    """Embed ``texts`` through the pool in chunks; ``after_chunk(i)`` is called as chunk i is done."""
    embedder = Embedder(config, routes=build_routes(config, make_backend, minute_s=MINUTE_S))
    metrics = Metrics()
    chunks = [texts[i : i + chunk_rows] for i in range(0, len(texts), chunk_rows)]
    parts = []
    try:
        for i, results in enumerate(embedder.embed_stream(chunks, metrics)):
            parts.append(results)
            if after_chunk is not None:
                after_chunk(i)
    finally:
        embedder.close()
    joined = EmbedResults(
        vectors=np.concatenate([p.vectors for p in parts]),
        status=[s for p in parts for s in p.status],
        error=[e for p in parts for e in p.error],
        prompt_tokens=np.concatenate([p.prompt_tokens for p in parts]),
        total_tokens=np.concatenate([p.total_tokens for p in parts]),
        attempts=np.concatenate([p.attempts for p in parts]),
        request_id=[r for p in parts for r in p.request_id],
        model=[m for p in parts for m in p.model],
        deployment=[d for p in parts for d in p.deployment],
    )
    return joined, metrics


def name(endpoint: LocalEndpoint) -> str:
    return deployment_name(endpoint.url)


def test_traffic_goes_to_each_deployment_in_proportion_to_its_quota(
    start_endpoint: Any, endpoint_key: str
) -> None:
    big, small = start(start_endpoint, 20_000), start(start_endpoint, 10_000)
    texts = corpus(4000)  # about 52k tokens: near two scaled minutes of the pool's 30k
    results, metrics = run(pool_config(endpoint_key, (big, 20_000), (small, 10_000)), texts)
    assert results.status == ["ok"] * len(texts), set(results.error)
    billed = {name(e): e.stats(billed=False)["prompt_tokens"] for e in (big, small)}
    assert sum(billed.values()) == metrics.prompt_tokens  # nothing paid twice
    assert 1.6 <= billed[name(big)] / billed[name(small)] <= 2.5, billed
    served = {n: results.deployment.count(n) for n in (name(big), name(small))}
    assert sum(served.values()) == len(texts)
    assert 1.6 <= served[name(big)] / served[name(small)] <= 2.5, served
    assert metrics.throttled <= 0.05 * metrics.requests, metrics.to_dict()


def test_a_deployment_stopped_mid_run_loses_no_row_and_no_vector_changes(
    start_endpoint: Any, endpoint_key: str
) -> None:
    a, b = start(start_endpoint, 20_000), start(start_endpoint, 20_000)
    texts = corpus(3000)
    stopped = threading.Event()

    def stop_b(chunk: int) -> None:
        if chunk == 2 and not stopped.is_set():
            b.stop()  # connections refused from now on: b is out at once
            stopped.set()

    results, metrics = run(pool_config(endpoint_key, (a, 20_000), (b, 20_000)), texts, stop_b)
    assert stopped.is_set()
    assert results.status == ["ok"] * len(texts), set(results.error)
    vectors, _ = expected(texts)
    np.testing.assert_array_equal(results.vectors, vectors)
    served = {n: results.deployment.count(n) for n in (name(a), name(b))}
    assert served[name(b)] > 0 and served[name(a)] > served[name(b)], served
    late = results.deployment[-500:]
    assert late == [name(a)] * 500  # after b went away, a served everything
    assert a.stats(billed=False)["texts_billed"] + served[name(b)] >= len(texts)
    assert metrics.failed_rows == 0


def test_an_outage_moves_the_requests_to_the_others(start_endpoint: Any, endpoint_key: str) -> None:
    """Dropped connections (not refused ones) take a deployment out after a few strikes."""
    a, b = start(start_endpoint, 20_000), start(start_endpoint, 20_000)
    texts = corpus(3000)

    def outage(chunk: int) -> None:
        if chunk == 1:
            b.outage(30)

    results, _ = run(pool_config(endpoint_key, (a, 20_000), (b, 20_000)), texts, outage)
    assert results.status == ["ok"] * len(texts), set(results.error)
    vectors, _ = expected(texts)
    np.testing.assert_array_equal(results.vectors, vectors)
    assert results.deployment[-500:] == [name(a)] * 500
    billed_a = a.stats()["billed"]
    billed_b = b.stats()["billed"]
    assert sum(billed_a.values()) + sum(billed_b.values()) == len(texts)  # each text paid once


def test_rows_fail_only_when_every_deployment_is_out(start_endpoint: Any, endpoint_key: str) -> None:
    a, b = start(start_endpoint, 20_000), start(start_endpoint, 20_000)
    a.stop()
    b.stop()
    config = pool_config(endpoint_key, (a, 20_000), (b, 20_000), total_timeout_s=1)
    results, _ = run(config, corpus(50))
    assert results.status == ["failed"] * 50
    assert all(e and e.startswith("every deployment of the pool is out: ") for e in results.error)


def test_a_deployment_refusing_the_key_is_taken_out_and_the_others_serve(
    start_endpoint: Any, endpoint_key: str
) -> None:
    from sparkembed.spark.secrets import apply_secret  # driver-side; imports no pyspark

    a, b = start(start_endpoint, 20_000), start(start_endpoint, 20_000)
    config = pool_config(endpoint_key, (a, 20_000), (b, 20_000))
    members = (config.endpoint.pool[0], config.endpoint.pool[1].model_copy(update={"key_env": "KEY_B"}))
    config = config.model_copy(update={"endpoint": config.endpoint.model_copy(update={"pool": members})})
    config = apply_secret(config, environ={"KEY_B": "a-wrong-key-0123456789"})
    texts = corpus(500)
    results, _ = run(config, texts)
    assert results.status == ["ok"] * len(texts), set(results.error)
    assert set(results.deployment) == {name(a)}
    assert b.stats(billed=False)["responses"] == {"401": 1}  # out at the first refusal
