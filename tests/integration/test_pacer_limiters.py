"""The pacer against the local endpoint under each ``--limiter`` model, over real HTTP.

Windows are scaled to a 3 s "minute" so each run takes seconds. The job is told nothing
about the model in use, and in most runs nothing of the quota either: it must find both from
the service's answers. Timings on this machine are noisy, so the tests count instead: no
failed row, and few 429s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support import build_config, corpus

from sparkembed.backends import make_backend
from sparkembed.config import EmbedConfig
from sparkembed.core.engine import Embedder
from sparkembed.core.metrics import Metrics
from sparkembed.core.ratelimit import RateLimiter
from sparkembed.core.runlog import TaskLog
from sparkembed.server.launch import LocalEndpoint

pytestmark = pytest.mark.integration

SCALE = 0.05
MINUTE_S = 60 * SCALE
QUOTA_TPM = 20_000
"""Tokens per scaled minute: a 256-input request (about 4,500 tokens) is near a quarter of it,
as the 1,024-input request of the issue was of its quota."""
LIMITERS = ["token-bucket", "sliding-window", "fixed-window"]


def start(start_endpoint: Any, limiter: str, *more: str) -> LocalEndpoint:
    return start_endpoint(
        *("--model", "hash", "--dims", "16", "--tpm", str(QUOTA_TPM), "--rpm", "6000"),
        *("--limiter", limiter, "--window-scale", str(SCALE), *more),
    )


def config_for(endpoint: LocalEndpoint, key: str, **limits: Any) -> EmbedConfig:
    return build_config(
        {
            "endpoint": {"url": endpoint.url},
            "batching": {"max_inputs": 256},
            "limits": {"concurrency": 8, **limits},
            "retry": {"max_attempts": 3, "total_timeout_s": 120},
        },
        key=key,
    )


def run(
    config: EmbedConfig,
    texts: list[str],
    tokens_per_minute: float | None = None,
    share: float = 1.0,
    run_dir: Path | None = None,
    limiters: list[RateLimiter] | None = None,
    max_share: float = 1.0,
) -> Metrics:
    """Embed ``texts`` in chunks of 500, paced on the scaled minute; return the metrics.

    With ``run_dir``, the pacer publishes its charges and reads its peers' there, as a
    Spark task's does; ``limiters`` gets the pacer, to look at afterwards."""
    limiter = RateLimiter(
        tokens_per_minute and tokens_per_minute * max_share * share,
        None,
        share=share,
        minute_s=MINUTE_S,
        keep_share=max_share < 1,
    )
    if limiters is not None:
        limiters.append(limiter)
    embedder = Embedder(config, make_backend(config), share=share, limiter=limiter)
    metrics = Metrics()
    chunks = [texts[i : i + 500] for i in range(0, len(texts), 500)]
    with contextlib.ExitStack() as stack:
        if run_dir is not None:
            stack.enter_context(TaskLog(run_dir, f"w00000-{limiter.id}", metrics, pacers=embedder.limiters))
        try:
            for results in embedder.embed_stream(chunks, metrics):
                assert all(status == "ok" for status in results.status), set(results.error)
        finally:
            embedder.close()
    return metrics


def throttled_share(metrics: Metrics) -> float:
    return metrics.throttled / metrics.requests


@pytest.mark.parametrize("limiter", LIMITERS)
def test_no_quota_set_and_large_requests_every_row_ok(
    start_endpoint: Any, endpoint_key: str, limiter: str
) -> None:
    endpoint = start(start_endpoint, limiter)
    texts = corpus(4000)  # about 2.6 minutes of quota
    metrics = run(config_for(endpoint, endpoint_key), texts)
    assert (metrics.ok_rows, metrics.failed_rows) == (len(texts), 0)
    assert endpoint.stats(billed=False)["texts_billed"] == len(texts)  # nothing paid twice
    # The first burst finds the limit; after it, the pacer keeps within what it learned.
    assert metrics.throttled <= 12 and throttled_share(metrics) < 0.25, metrics.to_dict()


@pytest.mark.parametrize("limiter", LIMITERS)
def test_a_quota_set_twice_too_high_is_found(start_endpoint: Any, endpoint_key: str, limiter: str) -> None:
    endpoint = start(start_endpoint, limiter, "--tpm-jitter", "0.05", "--seed", "1")
    texts = corpus(4000)
    config = config_for(endpoint, endpoint_key, tokens_per_minute=2 * QUOTA_TPM)
    metrics = run(config, texts, tokens_per_minute=2 * QUOTA_TPM)
    assert (metrics.ok_rows, metrics.failed_rows) == (len(texts), 0)
    assert metrics.throttled <= 12 and throttled_share(metrics) < 0.25, metrics.to_dict()


@pytest.mark.parametrize("limiter", ["sliding-window", "fixed-window"])
def test_the_right_quota_under_jitter_costs_few_429s(
    start_endpoint: Any, endpoint_key: str, limiter: str
) -> None:
    endpoint = start(start_endpoint, limiter, "--tpm-jitter", "0.05", "--seed", "2")
    texts = corpus(4000)
    config = config_for(endpoint, endpoint_key, tokens_per_minute=QUOTA_TPM)
    metrics = run(config, texts, tokens_per_minute=QUOTA_TPM)
    assert (metrics.ok_rows, metrics.failed_rows) == (len(texts), 0)
    assert throttled_share(metrics) < 0.1, metrics.to_dict()


def test_two_workers_share_a_quota_neither_knows(start_endpoint: Any, endpoint_key: str) -> None:
    endpoint = start(start_endpoint, "sliding-window")
    config = config_for(endpoint, endpoint_key)
    outcomes: dict[int, Metrics] = {}

    def worker(number: int) -> None:
        outcomes[number] = run(config, corpus(2500)[number::2], share=1 / 2)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == [0, 1]
    assert sum(m.failed_rows for m in outcomes.values()) == 0
    assert sum(m.ok_rows for m in outcomes.values()) == 2500


@pytest.mark.parametrize("limiter", LIMITERS)
def test_four_tasks_with_peers_learn_the_whole_limit_and_split_it(
    start_endpoint: Any, endpoint_key: str, limiter: str, tmp_path: Path
) -> None:
    """Four tasks, two starting late, none told the quota: through the run's spend files each
    learns what the whole job may send (the quota, within the jitter), not a guess from its
    own sends, and counts the tasks sending (each takes an equal part: tests/unit)."""
    endpoint = start(start_endpoint, limiter, "--tpm-jitter", "0.05", "--seed", "3")
    config = config_for(endpoint, endpoint_key)
    texts = corpus(6000)
    outcomes: dict[int, Metrics] = {}
    limiters: list[RateLimiter] = []
    seen: set[int | None] = set()

    def task(number: int) -> None:
        time.sleep(0.0 if number < 2 else MINUTE_S / 3)
        outcomes[number] = run(config, texts[number::4], share=1 / 4, run_dir=tmp_path, limiters=limiters)

    def watch() -> None:  # how many senders the pacers counted
        while len(outcomes) < 4:
            seen.update(pacer._tokens.peers for pacer in list(limiters))
            time.sleep(0.05)

    threads = [threading.Thread(target=task, args=(n,)) for n in range(4)] + [threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(outcomes) == [0, 1, 2, 3]
    assert sum(m.ok_rows for m in outcomes.values()) == len(texts)
    assert sum(m.failed_rows for m in outcomes.values()) == 0
    requests = sum(m.requests for m in outcomes.values())
    # 0-4 % under the windows, 0-6.5 % under the bucket (6 runs each, 2026-12-05). Most are
    # where tasks burst on each other's files up to PACE_EVERY_S old: a twelfth of this test's
    # scaled minute, a 240th of a real one. Under the bucket, a bound of sends plus room may
    # reach twice the quota (see below), hence its looser bound (issue 15).
    bound = 0.15 if limiter == "token-bucket" else 0.1
    assert sum(m.throttled for m in outcomes.values()) / requests < bound
    # Without peers: what it sent times four, plus the room. A bucket refills while it is
    # drawn, and a fixed window empties on the clock, so until they run dry the room they
    # report plus a trailing window's sends may reach twice the quota (and that much could
    # be sent in a trailing window, then); a sliding window's is the quota.
    quota = QUOTA_TPM * (1 + 0.05) * (1 if limiter == "sliding-window" else 2)
    for pacer in limiters:
        assert pacer._tokens.bound is not None and 0.75 * QUOTA_TPM < pacer._tokens.bound <= quota
    assert 4 in seen  # all four at once, from their files


def test_no_row_fails_while_another_client_keeps_taking_the_room(
    start_endpoint: Any, endpoint_key: str
) -> None:
    """A greedy client that ignores 429s takes whatever frees up: any 429s we get may pass
    ``retry.max_attempts`` (3 here), yet only time bounds them, and every row gets through."""
    endpoint = start(start_endpoint, "sliding-window")
    done = threading.Event()

    def greedy() -> None:
        body = json.dumps({"input": [" ".join(["word"] * 500)]})
        connection = http.client.HTTPConnection(endpoint.url.removeprefix("http://"), timeout=30)
        while not done.is_set():
            connection.request("POST", "/embeddings", body, {"api-key": endpoint_key})
            connection.getresponse().read()
            time.sleep(0.02)
        connection.close()

    thread = threading.Thread(target=greedy)
    thread.start()
    try:
        time.sleep(0.5)
        metrics = run(config_for(endpoint, endpoint_key), corpus(1500))
    finally:
        done.set()
        thread.join()
    assert (metrics.ok_rows, metrics.failed_rows) == (1500, 0)


class SteadyClient:
    """Another application on the deployment: ``share`` of the quota, evenly, a request every
    60th of the minute; it counts the 429s it gets."""

    def __init__(self, endpoint: LocalEndpoint, key: str, share: float) -> None:
        self._address, self._key = endpoint.url.removeprefix("http://"), key
        self._tokens = share * QUOTA_TPM / 60
        self.sent = self.throttled = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _post(self, connection: http.client.HTTPConnection, words: int) -> dict[str, Any]:
        body = json.dumps({"input": [" ".join(["lake"] * words)]})
        connection.request("POST", "/embeddings", body, {"api-key": self._key})
        answer = connection.getresponse()
        payload: dict[str, Any] = json.loads(answer.read())
        self.sent += 1
        self.throttled += answer.status == 429
        return payload

    def _run(self) -> None:
        connection = http.client.HTTPConnection(self._address, timeout=30)
        words = 50
        billed = self._post(connection, words)["usage"]["prompt_tokens"]
        words = max(1, round(words * self._tokens / billed))
        while not self._done.wait(MINUTE_S / 60):
            self._post(connection, words)
        connection.close()

    def stop(self) -> float:
        """Stop; the share of its requests answered 429."""
        self._done.set()
        self._thread.join()
        return self.throttled / self.sent


def test_max_share_leaves_another_client_its_part_through_a_wandering_limit(
    start_endpoint: Any, endpoint_key: str, tmp_path: Path
) -> None:
    """limits.max_share 0.7 and a client steadily taking 30 % of a quota that wanders ±5 %:
    the job's four tasks keep below their 70 % when the limit dips too, so the other client
    is seldom refused (a job told max_share 1 left it 16 % of 429s here). The scaled minute
    does not tell bursts from an even rate (tests/unit; BENCHMARKS.md for the real minute)."""
    endpoint = start(start_endpoint, "sliding-window", "--tpm-jitter", "0.05", "--seed", "5")
    config = config_for(endpoint, endpoint_key, tokens_per_minute=QUOTA_TPM, max_share=0.7)
    texts = corpus(4000)
    other = SteadyClient(endpoint, endpoint_key, 0.3)
    outcomes: dict[int, Metrics] = {}

    def task(number: int) -> None:
        outcomes[number] = run(config, texts[number::4], QUOTA_TPM, 1 / 4, tmp_path, max_share=0.7)

    try:
        time.sleep(MINUTE_S / 2)  # the other application was there first
        threads = [threading.Thread(target=task, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    finally:
        refused = other.stop()
    assert sum(m.ok_rows for m in outcomes.values()) == len(texts)
    assert refused < 0.01, f"the other client got {refused:.1%} 429s ({other.throttled} of {other.sent})"
