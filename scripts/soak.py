"""Fault soak: the full job (Spark local[2], Delta) against the local endpoint under faults.

The endpoint (hash model) answers 10% of requests 500/503, resets 2% of connections,
holds 2% of answers (already billed) past the client's read timeout, shuffles ``data``,
and enforces a TPM quota tighter than the corpus needs, so the run must wait for refill.

Chaos on top, each at a share of the corpus billed: ``--outage-s S`` drops every request for
S seconds (at 20 %), ``--kill-workers N`` SIGKILLs a Spark Python worker N times (between
30 % and 80 %), and ``--interrupt`` sends the driver SIGINT (at 50 %): the run commits what
was answered and stops, and a second run finishes the job.

Reports rows ok/failed, lost and duplicated rows, vectors that differ from the hash
model's own (recomputed here), texts billed more than once (from ``/_stats``) against the
one-wave bound, and wall time. Exit status 1 when any row failed, was lost or duplicated,
or got a wrong vector. Texts billed twice are reported, not judged: a slow answer abandoned
after the server billed it, or a killed worker's answered requests, are paid for again, as
they would be on Azure.

Usage::

    python scripts/soak.py                    # 20,000 rows
    python scripts/soak.py --rows 2000 --json soak.json
    python scripts/soak.py --outage-s 120 --kill-workers 2 --interrupt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from sparkembed.config import EmbedConfig, load_config  # noqa: E402
from sparkembed.core import wordllama  # noqa: E402
from sparkembed.server.launch import LocalEndpoint, start_local_endpoint  # noqa: E402
from sparkembed.server.models import HashModel  # noqa: E402
from tests.spark_cluster import python_workers  # noqa: E402

WORDS = [
    "river", "lake", "delta", "stone", "quota", "token", "batch", "retry", "vector", "spark",
    "table", "commit", "wave", "shard", "cloud", "north", "south", "bright", "quiet", "rapid",
    "amber", "cedar", "maple", "harbor", "signal", "window", "garden", "ledger",
]  # fmt: skip


@dataclass(frozen=True)
class SoakOptions:
    """What to run. Rates are fractions of requests; times in seconds unless named ``_ms``."""

    rows: int = 20_000
    seed: int = 7
    error_rate: float = 0.10
    reset_rate: float = 0.02
    slow_rate: float = 0.02
    slow_ms: float = 3000.0
    read_timeout_s: float = 2.0
    tokens_per_minute: int | None = None
    """None: the corpus's tokens / ``quota_factor``, so part of the run waits for refill."""
    quota_factor: float = 1.3
    client_quota_factor: float = 1.2
    """The client's limiter is told this times the server's quota (another client shares the
    deployment, say), so 429s come and the engine must absorb them."""
    dims: int = 64
    max_inputs: int = 32
    commit_every_rows: int = 5_000
    outage_s: float = 0.0
    kill_workers: int = 0
    interrupt: bool = False
    workdir: str | None = None
    keep: bool = False


@dataclass
class SoakReport:
    rows: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    texts_billed_more_than_once: int = 0
    extra_billings: int = 0
    tokens_per_minute: int = 0
    corpus_tokens: int = 0
    server_prompt_tokens: int = 0
    table_prompt_tokens: int = 0
    requests: int = 0
    retries: int = 0
    throttled_429: int = 0
    limiter_wait_s: float = 0.0
    server_responses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    one_wave_rows: int = 0
    """The bound on texts billed twice that a crash or a kill may cost."""
    outage_s: float = 0.0
    workers_killed: int = 0
    interrupted: bool = False
    runs: int = 1
    tokens_billed_reported: int = 0
    """What the runs' summaries say was billed, to set beside the server's count."""
    failed_errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.ok == self.rows and not (self.failed or self.lost or self.duplicated or self.mismatched)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def make_corpus(rows: int, seed: int) -> tuple[list[str], list[str]]:
    """``rows`` distinct ids and texts of 5 to 60 words."""
    rng = random.Random(seed)
    ids = [f"doc-{i:07d}" for i in range(rows)]
    texts = [f"{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for i in range(rows)]
    return ids, texts


def start_faulty_endpoint(options: SoakOptions, key: str, tokens_per_minute: int) -> LocalEndpoint:
    return start_local_endpoint(
        "--model", "hash", "--dims", str(options.dims), "--seed", str(options.seed), "--shuffle",
        "--error-rate", str(options.error_rate), "--reset-rate", str(options.reset_rate),
        "--slow-rate", str(options.slow_rate), "--slow-ms", str(options.slow_ms),
        "--tpm", str(tokens_per_minute),
        env={"SPARKEMBED_SERVE_KEY": key},
    )  # fmt: skip


def soak_config(
    options: SoakOptions, url: str, key: str, workdir: Path, tokens_per_minute: int
) -> EmbedConfig:
    config = load_config(
        None,
        {
            "endpoint.url": url,
            "source.path": str(workdir / "source.parquet"),
            "target.path": str(workdir / "target"),
            "batching.max_inputs": options.max_inputs,
            "limits.tokens_per_minute": int(tokens_per_minute * options.client_quota_factor),
            "limits.concurrency": 4,
            "retry.read_timeout_s": options.read_timeout_s,
            "retry.connect_timeout_s": 5.0,
            # Retries must outlast an outage: backoff waits up to 2 s.
            "retry.max_attempts": 12 + 2 * math.ceil(options.outage_s),
            "retry.backoff_initial_s": 0.1,
            "retry.backoff_max_s": 2.0,
            "run.commit_every_rows": options.commit_every_rows,
            "run.log_dir": str(workdir / "runs"),
        },
    )
    return config.model_copy(update={"auth": config.auth.model_copy(update={"key": SecretStr(key)})})


def run_soak(options: SoakOptions) -> SoakReport:
    """Run the job once under faults and check its output against the endpoint's model."""
    from sparkembed.spark import driver
    from sparkembed.spark.session import get_spark

    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="sparkembed-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ids, texts = make_corpus(options.rows, options.seed)
    pq.write_table(pa.table({"id": ids, "text": texts}), workdir / "source.parquet")
    corpus_tokens = sum(wordllama.count_tokens(texts))
    tpm = options.tokens_per_minute or max(1000, int(corpus_tokens / options.quota_factor))
    key = "soak-" + secrets.token_hex(12)
    endpoint = start_faulty_endpoint(options, key, tpm)
    try:
        config = soak_config(options, endpoint.url, key, workdir, tpm)
        spark = get_spark(config, local_default=True)
        chaos = Chaos(options, endpoint)
        started = time.monotonic()
        with chaos:
            summaries = [driver.run(spark, config, progress=lambda line: print(line, flush=True))]
            if summaries[0].stopped:  # the interrupt: a second run finishes the job
                summaries.append(driver.run(spark, config, progress=lambda line: print(line, flush=True)))
        wall_s = time.monotonic() - started
        stats = endpoint.stats()
    finally:
        endpoint.stop()
    preflights = len(summaries) * _preflight_tokens()
    report = SoakReport(
        rows=options.rows,
        tokens_per_minute=tpm,
        corpus_tokens=corpus_tokens,
        server_prompt_tokens=stats["prompt_tokens"] - preflights,
        requests=sum(s.counts["requests"] for s in summaries),
        retries=sum(s.counts["retries"] for s in summaries),
        throttled_429=sum(s.counts["throttled"] for s in summaries),
        limiter_wait_s=round(sum(s.limiter_wait_s for s in summaries), 1),
        server_responses=stats["responses"],
        wall_s=round(wall_s, 1),
        one_wave_rows=options.commit_every_rows,
        outage_s=options.outage_s,
        workers_killed=chaos.killed,
        interrupted=chaos.interrupted,
        runs=len(summaries),
        tokens_billed_reported=sum(s.to_json()["tokens_billed"] for s in summaries),
    )
    check_output(report, workdir / "target", ids, texts, options.dims)
    count_billings(report, stats["billed"], texts)
    if not options.keep and options.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _preflight_tokens() -> int:
    """What one preflight bills on the hash model: its text's tokens, counted as the server does."""
    from sparkembed.core.engine import PREFLIGHT_TEXT

    return wordllama.count_tokens([PREFLIGHT_TEXT])[0]


class Chaos:
    """Faults beyond the endpoint's own, each when a share of the corpus has been billed."""

    def __init__(self, options: SoakOptions, endpoint: LocalEndpoint) -> None:
        self._endpoint = endpoint
        self._rows = options.rows
        steps: list[tuple[float, str]] = []
        if options.outage_s:
            steps.append((0.2, "outage"))
        for k in range(options.kill_workers):
            steps.append((0.3 + 0.5 * k / max(1, options.kill_workers - 1), "kill"))
        if options.interrupt:
            steps.append((0.5, "interrupt"))
        self._steps = sorted(steps)
        self._outage_s = options.outage_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-chaos", daemon=True)
        self.killed = 0
        self.interrupted = False

    def __enter__(self) -> Chaos:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        steps = list(self._steps)
        while steps and not self._done.wait(0.2):
            billed = self._endpoint.stats(billed=False)["texts_billed"]
            while steps and billed >= steps[0][0] * self._rows:
                self._act(steps.pop(0)[1])

    def _act(self, step: str) -> None:
        if step == "outage":
            print(f"chaos: endpoint outage for {self._outage_s:g} s", flush=True)
            self._endpoint.outage(self._outage_s)
        elif step == "kill":
            workers = python_workers(os.getsid(0))
            if workers:
                print(f"chaos: SIGKILL Python worker {workers[0]}", flush=True)
                os.kill(workers[0], signal.SIGKILL)
                self.killed += 1
        elif step == "interrupt":
            print("chaos: SIGINT to the driver", flush=True)
            self.interrupted = True
            os.kill(os.getpid(), signal.SIGINT)


def check_output(report: SoakReport, target: Path, ids: list[str], texts: list[str], dims: int) -> None:
    """Statuses, lost and duplicated rows, and each ok vector against the hash model's."""
    from sparkembed.sinks import read_table

    table = read_table(str(target)).select(["id", "status", "error", "embedding", "prompt_tokens"])
    out_ids = table.column("id").to_pylist()
    status = table.column("status").to_pylist()
    report.ok, report.failed = status.count("ok"), status.count("failed")
    report.skipped = status.count("skipped")
    report.table_prompt_tokens = int(sum(table.column("prompt_tokens").to_pylist()))
    report.lost = len(set(ids) - set(out_ids))
    report.duplicated = len(out_ids) - len(set(out_ids))
    errors = table.column("error").to_pylist()
    report.failed_errors = sorted({e for e, s in zip(errors, status, strict=True) if s == "failed"})[:10]
    text_of = dict(zip(ids, texts, strict=True))
    ok_rows = [i for i, s in enumerate(status) if s == "ok"]
    if not ok_rows:
        return
    ok_texts = [text_of[out_ids[i]] for i in ok_rows]
    want = HashModel(dims).embed(ok_texts, [], dims, "text")
    got = np.asarray(table.column("embedding").take(pa.array(ok_rows)).to_pylist(), dtype=np.float32)
    report.mismatched = int((got != want).any(axis=1).sum())


def count_billings(report: SoakReport, billed: dict[str, int], texts: Sequence[str]) -> None:
    """Texts of the corpus the server billed more than once (by sha256 of the UTF-8 text)."""
    counts = [billed.get(hashlib.sha256(t.encode()).hexdigest(), 0) for t in texts]
    report.texts_billed_more_than_once = sum(1 for c in counts if c > 1)
    report.extra_billings = sum(c - 1 for c in counts if c > 1)


def parse_args(argv: Sequence[str] | None) -> tuple[SoakOptions, str | None]:
    defaults = SoakOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=defaults.rows)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--error-rate", type=float, default=defaults.error_rate)
    p.add_argument("--reset-rate", type=float, default=defaults.reset_rate)
    p.add_argument("--slow-rate", type=float, default=defaults.slow_rate)
    p.add_argument("--slow-ms", type=float, default=defaults.slow_ms)
    p.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s, help="seconds")
    p.add_argument("--tpm", type=int, default=None, help="quota; default corpus tokens / --quota-factor")
    p.add_argument("--quota-factor", type=float, default=defaults.quota_factor)
    p.add_argument("--client-quota-factor", type=float, default=defaults.client_quota_factor)
    p.add_argument("--dims", type=int, default=defaults.dims)
    p.add_argument("--max-inputs", type=int, default=defaults.max_inputs)
    p.add_argument("--commit-every", type=int, default=defaults.commit_every_rows)
    p.add_argument("--outage-s", type=float, default=0.0, help="drop every request this long, at 20 %%")
    p.add_argument("--kill-workers", type=int, default=0, help="SIGKILL a Python worker this often")
    p.add_argument("--interrupt", action="store_true", help="SIGINT the driver at 50 %%, then rerun")
    p.add_argument("--workdir", default=None, help="keep source, table and run log here")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    options = SoakOptions(
        rows=args.rows, seed=args.seed, error_rate=args.error_rate, reset_rate=args.reset_rate,
        slow_rate=args.slow_rate, slow_ms=args.slow_ms, read_timeout_s=args.read_timeout,
        tokens_per_minute=args.tpm, quota_factor=args.quota_factor,
        client_quota_factor=args.client_quota_factor, dims=args.dims,
        max_inputs=args.max_inputs, commit_every_rows=args.commit_every, workdir=args.workdir,
        outage_s=args.outage_s, kill_workers=args.kill_workers, interrupt=args.interrupt,
    )  # fmt: skip
    return options, args.json


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; print the report (last line: JSON); 0 when nothing failed, got lost or mismatched."""
    options, json_path = parse_args(argv)
    report = run_soak(options)
    print(
        f"soak: {report.rows} rows in {report.wall_s:.1f} s: {report.ok} ok, {report.failed} failed, "
        f"{report.lost} lost, {report.duplicated} duplicated, {report.mismatched} wrong vectors; "
        f"{report.texts_billed_more_than_once} texts billed more than once "
        f"({report.extra_billings} extra billings; one wave is {report.one_wave_rows} rows) after "
        f"a {report.outage_s:g} s outage, {report.workers_killed} worker kills and "
        f"{'an' if report.interrupted else 'no'} interrupt ({report.runs} runs); "
        f"tokens billed {report.server_prompt_tokens} by the server, {report.tokens_billed_reported} "
        f"by the summaries; {report.requests} requests, "
        f"{report.retries} retries, {report.throttled_429} throttled, "
        f"{report.limiter_wait_s:.0f} s waited in the limiter; server answered "
        f"{report.server_responses}; TPM {report.tokens_per_minute} for {report.corpus_tokens} tokens"
    )
    document = json.dumps(report.to_json())
    if json_path:
        Path(json_path).write_text(document + "\n")
    print(document, flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
