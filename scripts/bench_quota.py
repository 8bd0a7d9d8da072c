"""Quota benchmark (issue 15): the whole Spark job against ``sparkembed serve`` under each way
Azure may meter a deployment's quota (figures, no asserts).

Every scenario runs :func:`sparkembed.spark.driver.run` in one ``local[4]`` session (4 task
slots) on a source of texts of about 55 tokens, against a fresh endpoint with a 240k TPM /
1,440 RPM quota, 50 ms latency and the TPM limit wandering by ±5 %:

- ``bucket``, ``sliding``, ``fixed``: ``limits.tokens_per_minute`` set to the quota, under
  ``--limiter token-bucket``, ``sliding-window`` and ``fixed-window``;
- ``*-unset``: the same with no quota configured; ``*-2x``: configured twice too high;
- ``shared``: sliding windows, a second client steadily taking 30 % of the quota, the job
  with ``limits.max_share: 0.7``; the other client's 429 share is reported too;
- ``pool``: three deployments of 240k + 120k + 120k TPM (sliding windows, ±5 %) in one
  ``endpoint.pool``, twice the rows; efficiency is against the summed quota. ``pool-kill``:
  the same, with one 120k deployment stopped a third of the way through; its figures add the
  steady share after the kill against the quota left;
- ``cookbook-*``: the reference, side by side: one process pacing like the OpenAI cookbook's
  ``api_request_parallel_processor.py`` (token and request buckets of one minute, 100 inputs
  a request, a 15 s pause after a 429), on the same texts, endpoint and quota.

Definitions (as in BENCHMARKS.md): ideal time = (tokens / quota - 1) minutes, since a fresh
deployment may let one minute through at once; efficiency = ideal / actual, actual from the
first successful response to the last; steady share = the TPM achieved between minute 1 and
95 % of the tokens, over the quota; 429 share = attempts answered 429 / all attempts.
With one deployment, ``limit_per_minute_over_quota`` is the limit the endpoint offered
(its ±5 % wander, recomputed from its seed and the machine's monotonic clock), minute by
minute: a minute's burst can carry no more than that.

Usage::

    python scripts/bench_quota.py                      # every scenario, about 40 minutes
    python scripts/bench_quota.py --only sliding fixed cookbook-sliding
    python scripts/bench_quota.py --rows 6000 --json figures.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparkembed.config import EmbedConfig, validate_config  # noqa: E402
from sparkembed.core.metrics import RequestRecord  # noqa: E402
from sparkembed.server.launch import LocalEndpoint, start_local_endpoint  # noqa: E402
from sparkembed.server.models import load_model  # noqa: E402
from sparkembed.server.quota import WANDER_PERIOD_S, Wander  # noqa: E402
from sparkembed.spark import driver  # noqa: E402
from sparkembed.spark.session import get_spark  # noqa: E402

QUOTA_TPM = 240_000
QUOTA_RPM = 1_440
LATENCY_MS = 50
JITTER = 0.05
WORDS = [
    "lake", "delta", "spark", "vector", "quota", "token", "batch", "retry", "river", "stone", "table",
    "column", "row", "cluster", "driver", "executor", "wave", "commit", "schema", "partition",
    "shuffle", "index", "search", "model",
]  # fmt: skip
LIMITERS = {"bucket": "token-bucket", "sliding": "sliding-window", "fixed": "fixed-window"}
POOL_TPM = (240_000, 120_000, 120_000)
COOKBOOK_INPUTS = 100
COOKBOOK_PAUSE_S = 15.0


def scenarios() -> dict[str, dict[str, Any]]:
    """name -> limiter model, the TPM the job is told, max_share, a second client, cookbook."""
    out: dict[str, dict[str, Any]] = {}  # "rows": 2 runs on twice the rows
    for short, model in LIMITERS.items():
        out[short] = {"limiter": model, "tpm": QUOTA_TPM}
        out[f"{short}-unset"] = {"limiter": model, "tpm": None}
        out[f"{short}-2x"] = {"limiter": model, "tpm": 2 * QUOTA_TPM}
        out[f"cookbook-{short}"] = {"limiter": model, "tpm": QUOTA_TPM, "cookbook": True}
    out["shared"] = {"limiter": "sliding-window", "tpm": QUOTA_TPM, "max_share": 0.7, "other": 0.3}
    out["pool"] = {"limiter": "sliding-window", "pool": POOL_TPM, "rows": 2}
    out["pool-kill"] = {"limiter": "sliding-window", "pool": POOL_TPM, "rows": 2, "kill": 1}
    return out


def write_source(path: Path, rows: int) -> float:
    """A parquet source of ``rows`` distinct texts; returns their mean tokens (hash model)."""
    rng = random.Random(15)
    texts = [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(44, 52))) for i in range(rows)
    ]
    pq.write_table(pa.table({"id": list(range(rows)), "text": texts}), path)
    sample = texts[:500]
    return sum(len(e.ids) for e in load_model("hash", 8).tokenize(sample)) / len(sample)


def serve(limiter: str, seed: int, tpm: int = QUOTA_TPM) -> LocalEndpoint:
    rpm = QUOTA_RPM * tpm // QUOTA_TPM
    return start_local_endpoint(
        *("--model", "hash", "--dims", "64", "--no-auth", "--latency-ms", str(LATENCY_MS)),
        *("--tpm", str(tpm), "--rpm", str(rpm), "--limiter", limiter),
        *("--tpm-jitter", str(JITTER), "--seed", str(seed)),
    )


def job_config(
    urls: list[str], source: Path, target: Path, work: Path, spec: dict[str, Any]
) -> EmbedConfig:
    # A real deployment's model: the job counts tokens with its tokenizer (cl100k), as users' do.
    endpoint: dict[str, Any] = {"url": urls[0], "model": "text-embedding-3-small"}
    limits: dict[str, Any] = {"tokens_per_minute": spec.get("tpm"), "requests_per_minute": QUOTA_RPM}
    if "pool" in spec:
        endpoint = {"model": "text-embedding-3-small", "pool": [
            {"url": url, "tokens_per_minute": tpm, "requests_per_minute": QUOTA_RPM * tpm // QUOTA_TPM}
            for url, tpm in zip(urls, spec["pool"], strict=True)
        ]}  # fmt: skip
        limits = {}
    elif spec["tpm"] is None:
        limits["requests_per_minute"] = None
    if "max_share" in spec:
        limits["max_share"] = spec["max_share"]
    return validate_config(
        {
            "endpoint": endpoint,
            "auth": {"mode": "none"},
            "source": {"path": str(source)},
            "target": {"path": str(target)},
            "limits": limits,
            "run": {"spark_master": "local[4]", "partitions": 4, "log_dir": str(work / "runs")},
        }
    )


def per_deployment(
    records: list[RequestRecord], config: EmbedConfig, quotas: tuple[int, ...], begin: float
) -> dict[str, dict[str, Any]]:
    """Per deployment: its tokens per minute over its quota, and when its last answer came."""
    found = {}
    for (label, _), quota in zip(config.deployments(), quotas, strict=True):
        mine = [r for r in records if r.deployment == label and r.status == 200]
        if not mine:
            continue
        last = max(r.end_s for r in mine) - begin
        minutes = [0.0] * (int(last // 60) + 1)
        for r in mine:
            minutes[int((r.end_s - begin) // 60)] += r.prompt_tokens / quota
        tokens = sum(r.prompt_tokens for r in mine)
        found[label] = {
            "quota": quota,
            "tokens": tokens,
            "last_answer_s": round(last, 1),
            "tokens_per_minute_over_quota": [round(x, 2) for x in minutes],
        }
    return found


def analyse(records: list[RequestRecord], quota: float) -> dict[str, Any]:
    """Efficiency, steady share and 429 share of one run's attempts."""
    ok = sorted((r for r in records if r.status == 200), key=lambda r: r.end_s)
    tokens = sum(r.prompt_tokens for r in ok)
    first, last = ok[0].end_s, ok[-1].end_s
    ideal_s = max(0.0, (tokens / quota - 1) * 60)
    done, t95 = 0, last
    for r in ok:
        done += r.prompt_tokens
        if done >= 0.95 * tokens:
            t95 = r.end_s
            break
    start = first + 60
    steady_tokens = sum(r.prompt_tokens for r in ok if start < r.end_s <= t95)
    throttled = sum(r.status == 429 for r in records)
    steady = steady_tokens / max(t95 - start, 1e-9) * 60 / quota if t95 > start else None
    return {
        "tokens": tokens,
        "ideal_s": round(ideal_s, 1),
        "actual_s": round(last - first, 1),
        "efficiency": round(ideal_s / (last - first), 3) if last > first else None,
        "steady_share": None if steady is None else round(steady, 3),
        "attempts": len(records),
        "throttled": throttled,
        "share_429": round(throttled / len(records), 4) if records else 0.0,
    }


def offered(seed: int, begin: float, minutes: int) -> list[float]:
    """The jittered TPM limit over the quota, averaged per minute from ``begin`` (wall clock):
    the same :class:`Wander` as the endpoint's, on the machine's monotonic clock it reads. A
    burst at the start of a minute can carry no more than that minute's limit."""
    wander = Wander(JITTER, WANDER_PERIOD_S, seed, time.monotonic)
    start = begin - (time.time() - time.monotonic())
    means = []
    for minute in range(minutes):
        samples = [wander.at(start + minute * 60 + second) for second in range(60)]
        means.append(round(sum(samples) / len(samples), 3))
    return means


def share_after(records: list[RequestRecord], since: float, quota: float) -> float | None:
    """TPM achieved from ``since`` to 95 % of the tokens answered after it, over ``quota``."""
    ok = sorted((r for r in records if r.status == 200 and r.end_s > since), key=lambda r: r.end_s)
    total = sum(r.prompt_tokens for r in ok)
    done = 0
    for r in ok:
        done += r.prompt_tokens
        if done >= 0.95 * total:
            return round(done / max(r.end_s - since, 1e-9) * 60 / quota, 3)
    return None


class OtherClient:
    """Another application on the deployment: ``share`` of the quota, steadily, in 1 s steps."""

    def __init__(self, url: str, share: float) -> None:
        self._url, self._tokens = url, share * QUOTA_TPM / 60
        self._stop = threading.Event()
        self.sent = self.throttled = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        per_word = len(load_model("hash", 8).tokenize(["lake " * 100])[0].ids) / 100
        body = {"input": [" ".join(["lake"] * int(self._tokens / per_word))]}
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                async with session.post(f"{self._url}/embeddings", json=body) as answer:
                    await answer.read()
                    self.sent += 1
                    self.throttled += answer.status == 429
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"other_requests": self.sent, "other_429": self.throttled,
                "other_share_429": round(self.throttled / max(1, self.sent), 4)}  # fmt: skip


class Killer:
    """Stops one deployment a third of the way through the run's ideal time."""

    def __init__(self, endpoint: LocalEndpoint, source: Path, tokens_per_text: float, quota: int) -> None:
        tokens = pq.read_metadata(source).num_rows * tokens_per_text
        self._delay_s = 20 + max(60.0, (tokens / quota - 1) * 60) / 3  # about 20 s to start
        self._endpoint = endpoint
        self.at: float | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        time.sleep(self._delay_s)
        self._endpoint.stop()
        self.at = time.time()


async def cookbook(url: str, texts: list[str], tokens_per_text: float) -> list[RequestRecord]:
    """The reference pacer: one process, TPM and RPM buckets holding one minute each and
    refilled continuously, a 15 s pause for everyone after a 429, up to 10 attempts."""
    requests = [texts[i : i + COOKBOOK_INPUTS] for i in range(0, len(texts), COOKBOOK_INPUTS)]
    queue: list[tuple[list[str], int]] = [(batch, 1) for batch in reversed(requests)]
    records: list[RequestRecord] = []
    tokens_left, requests_left = float(QUOTA_TPM), float(QUOTA_RPM)
    last, paused_until = time.monotonic(), 0.0
    in_flight: set[asyncio.Task[None]] = set()

    async def send(session: aiohttp.ClientSession, batch: list[str], attempt: int) -> None:
        nonlocal paused_until
        start = time.time()
        async with session.post(f"{url}/embeddings", json={"input": batch}) as answer:
            body = await answer.json()
        usage = body.get("usage", {}).get("prompt_tokens", 0) if answer.status == 200 else 0
        records.append(RequestRecord(start, time.time(), len(batch), usage, answer.status, attempt))
        if answer.status != 200:
            if answer.status == 429:
                paused_until = time.monotonic() + COOKBOOK_PAUSE_S
            if attempt < 10:
                queue.append((batch, attempt + 1))

    async with aiohttp.ClientSession() as session:
        while queue or in_flight:
            now = time.monotonic()
            tokens_left = min(QUOTA_TPM, tokens_left + (now - last) * QUOTA_TPM / 60)
            requests_left = min(QUOTA_RPM, requests_left + (now - last) * QUOTA_RPM / 60)
            last = now
            cost = len(queue[-1][0]) * tokens_per_text if queue else 0.0
            if queue and now >= paused_until and tokens_left >= cost and requests_left >= 1:
                batch, attempt = queue.pop()
                tokens_left, requests_left = tokens_left - cost, requests_left - 1
                task = asyncio.create_task(send(session, batch, attempt))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            else:
                await asyncio.sleep(0.001)
    return records


def run_one(
    name: str, spec: dict[str, Any], source: Path, work: Path, tokens_per_text: float
) -> dict[str, Any]:
    quotas = spec.get("pool", (QUOTA_TPM,))
    seed = len(name)  # the first deployment's; the others' follow it
    endpoints = [serve(spec["limiter"], seed=seed + i, tpm=tpm) for i, tpm in enumerate(quotas)]
    endpoint = endpoints[0]
    other = OtherClient(endpoint.url, spec["other"]) if "other" in spec else None
    config: EmbedConfig | None = None
    killer = Killer(endpoints[spec["kill"]], source, tokens_per_text, sum(quotas)) if "kill" in spec else None
    try:
        if other:
            time.sleep(5)  # the other application was there first
        if spec.get("cookbook"):
            texts = pq.read_table(source).column("text").to_pylist()
            records = asyncio.run(cookbook(endpoint.url, texts, tokens_per_text))
            failed = sum(1 for r in records if r.status != 200 and r.attempt == 10) * COOKBOOK_INPUTS
        else:
            config = job_config([e.url for e in endpoints], source, work / name, work, spec)
            spark = get_spark(config, local_default=True)
            summary = driver.run(spark, config, progress=lambda _: None)
            records = [RequestRecord(**r) for r in summary.timeline]
            failed = summary.counts["failed_rows"]
        figures = analyse(records, sum(quotas) * spec.get("max_share", 1.0)) | {"failed_rows": failed}
        begin = min(r.start_s for r in records)
        figures["throttled_at_s"] = [round(r.start_s - begin, 1) for r in records if r.status == 429]
        per_minute = [0.0] * (int((max(r.end_s for r in records) - begin) // 60) + 1)
        for r in records:
            per_minute[int((r.end_s - begin) // 60)] += r.prompt_tokens / sum(quotas)
        figures["tokens_per_minute_over_quota"] = [round(x, 2) for x in per_minute]
        if len(endpoints) > 1 and config is not None:  # each deployment against its own quota
            figures["per_deployment"] = per_deployment(records, config, quotas, begin)
        if len(endpoints) == 1:  # the limit the service offered, minute by minute
            figures["limit_per_minute_over_quota"] = offered(seed, begin, len(per_minute))
        figures["timeline"] = [  # written to --json only: start, end, tokens, status, deployment
            [round(r.start_s - begin, 3), round(r.end_s - begin, 3), r.prompt_tokens, r.status, r.deployment]
            for r in records
        ]
        if killer is not None and killer.at is not None:
            left = sum(quotas) - quotas[spec["kill"]]
            figures["killed_after_s"] = round(killer.at - min(r.start_s for r in records), 1)
            figures["share_of_quota_left_after_kill"] = share_after(records, killer.at + 60, left)
        if other:
            figures |= other.stop()
            other = None
        return figures
    finally:
        if other:
            other.stop()
        for each in endpoints:
            each.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12_000, help="source rows (default 12000, ~55 tokens)")
    parser.add_argument("--only", nargs="*", default=None, help=f"scenarios, of: {' '.join(scenarios())}")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    chosen = {k: v for k, v in scenarios().items() if not args.only or k in args.only}
    work = Path(tempfile.mkdtemp(prefix="sparkembed-bench-quota-"))
    source = work / "source.parquet"
    tokens_per_text = write_source(source, args.rows)
    if any("rows" in spec for spec in chosen.values()):
        write_source(work / "source-x2.parquet", 2 * args.rows)
    print(f"bench_quota: {args.rows} rows of ~{tokens_per_text:.0f} tokens, {QUOTA_TPM:,} TPM, "
          f"{QUOTA_RPM:,} RPM, ±{JITTER:.0%} jitter, {LATENCY_MS} ms, local[4]", flush=True)  # fmt: skip
    results: dict[str, Any] = {}
    try:
        for name, spec in chosen.items():
            rows_source = work / "source-x2.parquet" if "rows" in spec else source
            results[name] = run_one(name, spec, rows_source, work, tokens_per_text)
            shown = {k: v for k, v in results[name].items() if k != "timeline"}
            print(f"{name:18} {json.dumps(shown)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
