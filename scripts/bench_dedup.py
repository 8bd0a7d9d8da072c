"""Cost saved by in-run dedup and the shared cache (issue 18) on a corpus with 40 % duplicates.

One local[2] Spark session and the local endpoint's ``hash`` model (256 dimensions); every
figure of tokens comes from the endpoint's own accounting (``/_stats``: the usage of every
answered request, less the preflights), not from sparkembed's summary. On one corpus, each
into its own new target:

- ``dedup off``: ``run.dedup: false``, every row sent;
- ``dedup on``: the default, each distinct text sent once;
- ``dedup + cache (first table)``: the same, with an empty ``cache.path``, which it fills;
- ``second table via cache``: another target over the same corpus, through that cache;
- ``half-new table via cache``: a corpus whose texts are half those of the first, half new.

With ``--long N``, a second corpus instead: ``N`` distinct long documents (about 3,000 tokens,
over the ``batching.max_input_tokens`` of 2,048 set for it, so cut into 512-token chunks),
each one of 50 template headers (about 1,100 tokens, so its first chunks are shared with the
other documents of its template) followed by a body of its own. It runs ``dedup off`` and
``dedup on`` in 10 waves, and the tokens it should pay for are those of the distinct chunks.
``SPARKEMBED_CODE=/path/to/checkout`` runs another checkout's job on the same corpus.

Prints one line per run (rows, tokens billed, the tokens of the texts it should pay for, cost at
``--price`` USD per 1M tokens, saving against ``dedup off`` on the same corpus, seconds) and,
with ``--json``, writes them. Asserts nothing.

Usage::

    python scripts/bench_dedup.py                     # 20,000 rows, 40 % duplicates
    python scripts/bench_dedup.py --rows 5000 --json out.json
    python scripts/bench_dedup.py --long 2000         # long documents sharing their first chunks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CODE = os.environ.get("SPARKEMBED_CODE", str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, CODE)
# Spark's Python workers must import the same checkout as the driver.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (CODE, os.environ.get("PYTHONPATH")) if p)

from sparkembed.config import EmbedConfig, validate_config  # noqa: E402
from sparkembed.core import wordllama  # noqa: E402
from sparkembed.core.engine import PREFLIGHT_TEXT  # noqa: E402
from sparkembed.core.longtext import LongTextPlanner  # noqa: E402
from sparkembed.server.launch import LocalEndpoint, start_local_endpoint  # noqa: E402
from sparkembed.spark.driver import run  # noqa: E402
from sparkembed.spark.session import get_spark  # noqa: E402

WORDS = (
    "delta", "lake", "vector", "quota", "token", "batch", "retry", "river", "stone", "spark", "table",
    "cache", "price", "model", "chunk", "wave", "commit", "driver", "task", "executor", "region",
)  # fmt: skip


def corpus(rows: int, duplicates: float, seed: int, prefix: str = "doc") -> list[str]:
    """``rows`` texts of 20-80 words, of which ``duplicates`` repeat another row's text."""
    rng = random.Random(seed)
    distinct = [
        f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
        for i in range(round(rows * (1 - duplicates)))
    ]
    texts = distinct + [rng.choice(distinct) for _ in range(rows - len(distinct))]
    rng.shuffle(texts)
    return texts


LONG_KEYS = {"batching": {"max_input_tokens": 2048}, "long_text": {"tokenizer": "wordllama"}}
"""The ``--long`` corpus's settings: its texts are over the input limit, cut by the endpoint's tokenizer."""


def long_corpus(docs: int, seed: int) -> list[str]:
    """``docs`` distinct documents: one of 50 shared headers of 700 words, then 1,300 words of their own."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    headers = [f"Template {k}. {words(700)}" for k in range(50)]
    return [f"{rng.choice(headers)}\n\nDocument {i}. {words(1300)}" for i in range(docs)]


def write_source(path: Path, texts: list[str]) -> Path:
    pq.write_table(pa.table({"id": [f"r{i:07d}" for i in range(len(texts))], "text": texts}), path)
    return path


def billed(endpoint: LocalEndpoint) -> int:
    """Prompt tokens the endpoint billed since its last reset, without the preflights."""
    stats = endpoint.stats()
    preflights = stats["billed"].get(hashlib.sha256(PREFLIGHT_TEXT.encode()).hexdigest(), 0)
    return int(stats["prompt_tokens"]) - preflights * wordllama.count_tokens([PREFLIGHT_TEXT])[0]


def config(url: str, source: Path, target: Path, work: Path, **run_keys: Any) -> EmbedConfig:
    cache = run_keys.pop("cache", None)
    more = run_keys.pop("more", {})
    return validate_config(
        {
            "endpoint": {"url": url},
            "auth": {"mode": "none"},
            "source": {"path": str(source)},
            "target": {"path": str(target)},
            "run": {"commit_every_rows": 10_000, "log_dir": str(work / "runs"), **run_keys},
            "cache": {"path": str(cache) if cache else None},
            **more,
        }
    )


def chunks(texts: list[str], settings: EmbedConfig) -> list[str]:
    """What the job sends for ``texts`` without dedup: their chunks, as its planner cuts them."""
    return [unit.text for unit in LongTextPlanner(settings).plan(texts).units if unit.text is not None]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--duplicates", type=float, default=0.4, help="share of rows repeating a text")
    parser.add_argument("--price", type=float, default=0.02, help="USD per 1M prompt tokens")
    parser.add_argument("--long", type=int, metavar="N", help="N long documents sharing chunks, instead")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_dedup_"))
    os.chdir(work)  # workers put the working folder first on sys.path: keep SPARKEMBED_CODE's checkout
    if args.long:
        return bench_long(args, work)
    texts = corpus(args.rows, args.duplicates, seed=18)
    distinct = list(dict.fromkeys(texts))
    half_new = distinct[: len(distinct) // 2] + corpus(len(distinct) - len(distinct) // 2, 0.0, 19, "new")
    source = write_source(work / "corpus.parquet", texts)
    other = write_source(work / "half_new.parquet", half_new)
    print(f"corpus: {len(texts):,} rows, {len(distinct):,} distinct texts "
          f"({1 - len(distinct) / len(texts):.0%} duplicates); work folder {work}")  # fmt: skip
    spark = get_spark(EmbedConfig(), local_default=True)
    results: list[dict[str, Any]] = []
    cache = work / "cache"
    try:
        with start_local_endpoint("--model", "hash", "--dims", "256", "--no-auth") as endpoint:
            run(spark, config(endpoint.url, source, work / "warmup", work), progress=lambda _: None)
            new_half = half_new[len(distinct) // 2 :]
            runs = [  # name, source, run keys, the tokens of the texts it should pay for
                ("dedup off", source, {"dedup": False}, texts),
                ("dedup on", source, {}, distinct),
                ("dedup + cache (first table)", source, {"cache": cache}, distinct),
                ("second table via cache", source, {"cache": cache}, []),
                ("half-new table via cache", other, {"cache": cache}, new_half),
            ]
            for index, (name, corpus_path, keys, paid) in enumerate(runs):
                endpoint.reset()
                started = time.monotonic()
                summary = run(spark, config(endpoint.url, corpus_path, work / f"t{index}", work, **keys),
                              progress=lambda _: None)  # fmt: skip
                tokens = billed(endpoint)
                row = {
                    "run": name,
                    "rows": summary.rows_total,
                    "tokens_billed": tokens,
                    "tokens_expected": sum(wordllama.count_tokens(paid)) if paid else 0,
                    "tokens_in_table": summary.counts["prompt_tokens"],
                    "cost_usd": tokens * args.price / 1e6,
                    "rows_deduplicated": summary.deduplicated,
                    "rows_from_cache": summary.from_cache,
                    "seconds": round(time.monotonic() - started, 1),
                }
                results.append(row)
                base = results[0]["tokens_billed"]
                saved = f"{1 - tokens / base:6.1%}" if base and corpus_path == source else "     -"
                print(f"{name:<28} {row['rows']:>7,} rows {tokens:>10,} tokens (expected "
                      f"{row['tokens_expected']:>10,}) ${row['cost_usd']:.6f} saved {saved} "
                      f"{row['seconds']:6.1f} s", flush=True)  # fmt: skip
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "duplicates": args.duplicates,
                                               "price": args.price, "runs": results}, indent=2))  # fmt: skip
    return 0


def bench_long(args: argparse.Namespace, work: Path) -> int:
    """``--long``: dedup off and on over long documents that share their first chunks."""
    texts = long_corpus(args.long, seed=18)
    source = write_source(work / "long.parquet", texts)
    keys = {"commit_every_rows": max(1, args.long // 10), "more": LONG_KEYS}
    settings = config("local", source, work / "t", work, **dict(keys))
    every = chunks(texts, settings)
    paid = {"dedup off": every, "dedup on": list(dict.fromkeys(every))}
    print(f"corpus: {len(texts):,} long documents, {len(paid['dedup off']):,} chunks, "
          f"{len(paid['dedup on']):,} distinct; code {CODE}")  # fmt: skip
    spark = get_spark(EmbedConfig(), local_default=True)
    results: list[dict[str, Any]] = []
    try:
        with start_local_endpoint("--model", "hash", "--dims", "256", "--no-auth") as endpoint:
            for name, dedup in (("dedup off", False), ("dedup on", True)):
                endpoint.reset()
                started = time.monotonic()
                target = work / name.replace(" ", "_")
                summary = run(spark, config(endpoint.url, source, target, work, dedup=dedup, **dict(keys)),
                              progress=lambda _: None)  # fmt: skip
                tokens = billed(endpoint)
                expected = sum(wordllama.count_tokens(paid[name]))
                results.append({"run": name, "waves": summary.waves, "tokens_billed": tokens,
                                "tokens_expected": expected, "cost_usd": tokens * args.price / 1e6,
                                "seconds": round(time.monotonic() - started, 1)})  # fmt: skip
                print(f"{name:<10} {summary.waves} waves {tokens:>11,} tokens (distinct chunks: "
                      f"{expected:>11,}) ${tokens * args.price / 1e6:.6f} {results[-1]['seconds']:6.1f} s",
                      flush=True)  # fmt: skip
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"long": args.long, "code": CODE, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
