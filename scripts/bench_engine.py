"""Benchmarks of the embedding engine against the local endpoint (figures, never asserts).

Scenarios (``--only`` picks one; default both):

- ``saturation``: endpoint ``--tpm 600000 --rpm 3600``; ``--workers`` worker processes,
  each an :class:`Embedder` told the whole quota and ``limits.workers``, embed texts of
  ~250-550 tokens, enough for ``--minutes`` of ideal time. Reports
  efficiency = ideal / actual time, where ideal = (total tokens / quota - 1) minutes and
  actual = first to last successful response; steady share = achieved TPM between minute 1
  and 95 % of the tokens, / quota; the share of requests answered 429; failed rows.
- ``latency``: endpoint ``--latency-ms 200``, no quota; throughput of one worker against
  concurrency x batch / latency, and in the same run a naive baseline (one synchronous
  request at a time with the plain SDK client, no limiter) and the ratio.

Usage::

    python scripts/bench_engine.py                      # both, 5.5 minutes of saturation
    python scripts/bench_engine.py --minutes 1.5        # a shorter smoke run
    python scripts/bench_engine.py --only latency --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparkembed.backends import make_backend
from sparkembed.config import validate_config  # noqa: E402
from sparkembed.core.engine import Embedder  # noqa: E402
from sparkembed.core.metrics import Metrics  # noqa: E402
from sparkembed.server.launch import start_local_endpoint  # noqa: E402


def corpus(n: int, seed: int, words_range: tuple[int, int] = (180, 400)) -> list[str]:
    """``n`` distinct English texts (windows over Python's own help topics)."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        size = rng.randint(*words_range)
        start = rng.randrange(len(words) - size)
        texts.append(f"[{seed}:{i}] " + " ".join(words[start : start + size]))
    return texts


def mean_tokens(texts: list[str]) -> float:
    """Tokens per text as the local endpoint bills them."""
    from sparkembed.server.models import load_model

    encodings = load_model("hash", 8).tokenize(texts)
    return sum(len(e.ids) for e in encodings) / len(texts)


def engine_config(url: str, **limits: Any) -> Any:
    return validate_config(
        {"endpoint": {"url": url}, "auth": {"mode": "none"}, "limits": limits},
    )


# -- saturation ------------------------------------------------------------------------


def saturation_worker(url: str, worker: int, workers: int, n_texts: int, limits: dict[str, Any]) -> dict:
    """One worker process: embed its texts in chunks of 200, return its metrics."""
    texts = corpus(n_texts, seed=worker, words_range=(180, 400))
    cfg = engine_config(url, **limits)
    embedder = Embedder(cfg, make_backend(cfg), share=1 / workers)
    metrics = Metrics()
    chunks = (texts[i : i + 200] for i in range(0, len(texts), 200))
    for _ in embedder.embed_stream(chunks, metrics):
        pass
    embedder.close()
    return metrics.to_dict(timeline=True)


def run_saturation(args: argparse.Namespace) -> dict[str, Any]:
    quota = args.tpm
    per_text = mean_tokens(corpus(300, seed=999))
    n_texts = math.ceil(quota * (args.minutes + 1) / per_text / args.workers)
    limits = {
        "concurrency": args.concurrency,
        "tokens_per_minute": quota,
        "requests_per_minute": args.rpm,
    }
    print(f"saturation: {args.workers} workers x {n_texts} texts of ~{per_text:.0f} tokens")
    with start_local_endpoint(
        "--model", "hash", "--no-auth", "--tpm", str(quota), "--rpm", str(args.rpm)
    ) as endpoint:
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.workers) as pool:
            jobs = [(endpoint.url, w, args.workers, n_texts, limits) for w in range(args.workers)]
            parts = pool.starmap(saturation_worker, jobs)
        stats = endpoint.stats(billed=False)
    total = Metrics()
    for part in parts:
        total.merge(Metrics.from_dict(part))
    if args.save_timeline:
        args.save_timeline.write_text(json.dumps(total.to_dict(timeline=True)))
    figures = analyse_saturation(total, quota)
    figures["server_requests"] = stats["requests"]
    figures["server_429"] = stats["responses"].get("429", 0)
    figures["server_prompt_tokens"] = stats["prompt_tokens"]
    return figures


def analyse_saturation(metrics: Metrics, quota: int) -> dict[str, Any]:
    """Efficiency, steady share and throttling from the merged per-attempt timeline."""
    ok = sorted((r for r in metrics.timeline if r.status == 200), key=lambda r: r.end_s)
    first, last = ok[0].end_s, ok[-1].end_s
    tokens = sum(r.prompt_tokens for r in ok)
    ideal_s = (tokens / quota - 1) * 60
    done, t95 = 0, last
    for record in ok:
        done += record.prompt_tokens
        if done >= 0.95 * tokens:
            t95 = record.end_s
            break
    # Tokens count when their response arrives: the rate between two arrivals a < b is the
    # tokens arriving in (a, b] over b - a. a is the first arrival after minute one.
    start = next((r.end_s for r in ok if r.end_s >= first + 60), t95)
    steady_tokens = sum(r.prompt_tokens for r in ok if start < r.end_s <= t95)
    steady_tpm = steady_tokens / max(t95 - start, 1e-9) * 60
    per_minute = [0] * (int((last - first) // 60) + 1)
    for record in ok:
        per_minute[int((record.end_s - first) // 60)] += record.prompt_tokens
    return {
        "total_tokens": tokens,
        "ideal_s": round(ideal_s, 1),
        "actual_s": round(last - first, 1),
        "efficiency": round(ideal_s / (last - first), 3),
        "steady_share": round(steady_tpm / quota, 3),
        "requests": metrics.requests,
        "throttled": metrics.throttled,
        "throttled_pct": round(100 * metrics.throttled / max(metrics.requests, 1), 2),
        "retries": metrics.retries,
        "failed_rows": metrics.failed_rows,
        "ok_rows": metrics.ok_rows,
        "tokens_per_minute": per_minute,
    }


# -- latency hiding and the naive baseline ---------------------------------------------


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    batch, concurrency, latency_s = args.batch, args.concurrency, args.latency_ms / 1000
    texts = corpus(concurrency * batch * args.rounds, seed=7, words_range=(10, 30))
    with start_local_endpoint(
        "--model", "hash", "--dims", "1536", "--no-auth", "--latency-ms", str(args.latency_ms)
    ) as endpoint:
        config = engine_config(endpoint.url, concurrency=concurrency)
        config = config.model_copy(
            update={"batching": config.batching.model_copy(update={"max_inputs": batch})}
        )
        embedder = Embedder(config, make_backend(config))
        embedder.preflight()  # connect and warm up outside the timing
        start = time.perf_counter()
        results = embedder.embed(texts)
        engine_s = time.perf_counter() - start
        embedder.close()
        naive_texts = texts[: batch * args.naive_rounds]
        naive_s = naive_run(endpoint.url, naive_texts, batch)
    ideal = concurrency * batch / latency_s
    engine_tps = len(texts) / engine_s
    naive_tps = len(naive_texts) / naive_s
    return {
        "texts": len(texts),
        "ok_rows": results.status.count("ok"),
        "concurrency": concurrency,
        "batch": batch,
        "latency_ms": args.latency_ms,
        "ideal_texts_per_s": round(ideal, 1),
        "engine_texts_per_s": round(engine_tps, 1),
        "engine_vs_ideal": round(engine_tps / ideal, 3),
        "naive_texts_per_s": round(naive_tps, 1),
        "engine_vs_naive": round(engine_tps / naive_tps, 2),
    }


def naive_run(url: str, texts: list[str], batch: int) -> float:
    """One synchronous request at a time with the SDK's defaults; seconds taken."""
    from azure.ai.inference import EmbeddingsClient
    from azure.core.credentials import AzureKeyCredential

    with EmbeddingsClient(url, AzureKeyCredential("unused")) as client:
        client.embed(input=["warm up"])
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            client.embed(input=texts[i : i + batch])
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("saturation", "latency"), default=None)
    parser.add_argument("--minutes", type=float, default=5.5, help="ideal saturation minutes")
    parser.add_argument("--workers", type=int, default=4, help="saturation worker processes")
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--rpm", type=int, default=3_600)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight/worker")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--batch", type=int, default=64, help="inputs per latency request")
    parser.add_argument("--rounds", type=int, default=25, help="latency requests per slot")
    parser.add_argument("--naive-rounds", type=int, default=10, help="naive requests")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    parser.add_argument("--save-timeline", type=Path, default=None, help="saturation timeline")
    parser.add_argument("--analyse", type=Path, default=None, help="reanalyse a saved timeline")
    args = parser.parse_args(argv)

    if args.analyse:
        saved = Metrics.from_dict(json.loads(args.analyse.read_text()))
        print(json.dumps(analyse_saturation(saved, args.tpm)))
        return 0
    figures: dict[str, Any] = {}
    if args.only in (None, "latency"):
        figures["latency"] = run_latency(args)
        print("latency:", json.dumps(figures["latency"]))
    if args.only in (None, "saturation"):
        figures["saturation"] = run_saturation(args)
        print("saturation:", json.dumps(figures["saturation"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
