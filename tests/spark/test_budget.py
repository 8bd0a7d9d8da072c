"""Budget caps (issue 18, part 3) on real Spark and the local endpoint's accounting: a run over
its cap is refused before any request; with allow_partial it stops within one request per task
slot of the cap, commits what is done, and a rerun continues from there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession
from support import build_config
from test_spark_job import billed_besides_preflight

from sparkembed.cli import main
from sparkembed.config import EmbedConfig
from sparkembed.core import wordllama
from sparkembed.errors import BudgetError
from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import read_table
from sparkembed.spark import driver
from sparkembed.spark.estimate import estimate

pytestmark = [pytest.mark.spark, pytest.mark.integration]

DIMS = 32
MAX_INPUTS = 8
SLOTS = 2  # the spark fixture's local[2]


def texts(n: int) -> list[str]:
    return [f"Budget row {i} speaks of river {i % 11}, stone {i % 7} and lake {i}." for i in range(n)]


def write_source(tmp_path: Path, n: int) -> str:
    path = tmp_path / "source.parquet"
    pq.write_table(pa.table({"id": [f"b{i:04d}" for i in range(n)], "text": texts(n)}), path)
    return str(path)


def make_config(endpoint: LocalEndpoint, key: str, source: str, target: str, **sets: Any) -> EmbedConfig:
    overrides = {
        "endpoint.url": endpoint.url,
        "source.path": source,
        "target.path": target,
        "batching.max_inputs": MAX_INPUTS,
        "limits.concurrency": 2,
        "long_text.tokenizer": "wordllama",  # what the local endpoint bills: exact estimates
        "run.partitions": SLOTS,
        "run.commit_every_rows": 100,
        "run.log_dir": str(Path(target).parent / "runs"),
        **sets,
    }
    return build_config(sets=overrides, key=key)


@pytest.fixture()
def endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", str(DIMS))


def test_a_run_over_its_cap_is_refused_before_any_request(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    source, target = write_source(tmp_path, 60), str(tmp_path / "target")
    tokens = sum(wordllama.count_tokens(texts(60)))
    capped = make_config(endpoint, endpoint_key, source, target, **{"run.max_tokens": tokens // 2})
    said = rf"estimated at {tokens:,} tokens .* cap of {tokens // 2:,} tokens"
    with pytest.raises(BudgetError, match=said):
        driver.run(spark, capped, progress=lambda _: None)
    price = {"endpoint.price_per_million_tokens": 100.0, "run.max_cost_usd": tokens / 4 * 100 / 1e6}
    with pytest.raises(BudgetError, match="run.max_cost_usd"):
        driver.run(spark, make_config(endpoint, endpoint_key, source, target, **price), progress=print)
    assert endpoint.stats(billed=False)["requests"] == 2  # the two preflights, nothing else
    assert not Path(target).exists()

    # The estimate says so too, after dedup, with cost and ETA at the quota.
    quota = {"run.max_tokens": tokens // 2, "limits.tokens_per_minute": 60_000}
    found = estimate(spark, make_config(endpoint, endpoint_key, source, target, **quota))
    assert found["estimated_tokens"] == tokens and found["over_budget"] and found["cap_tokens"] == tokens // 2
    assert found["eta_seconds"] == pytest.approx(tokens / 1000, abs=0.1)


def test_allow_partial_stops_within_one_request_per_slot_and_a_rerun_completes(
    spark: SparkSession,
    endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 400
    source, target = write_source(tmp_path, n), str(tmp_path / "target")
    counts = wordllama.count_tokens(texts(n))
    cap = sum(counts) * 2 // 5
    config = make_config(endpoint, endpoint_key, source, target)
    same = ("batching.max_inputs", "limits.concurrency", "long_text.tokenizer", "run.partitions",
            "run.commit_every_rows", "run.log_dir")  # fmt: skip
    flags = [f"{key}={getattr(getattr(config, key.split('.')[0]), key.split('.')[1])}" for key in same]
    monkeypatch.setenv("AZURE_INFERENCE_CREDENTIAL", endpoint_key)
    argv = ["run", "--source", source, "--target", target, "--endpoint", endpoint.url, "--allow-partial",
            "--set", f"run.max_tokens={cap}"]  # fmt: skip

    assert main(argv + [part for flag in flags for part in ("--set", flag)]) == 0

    lines = capsys.readouterr()
    summary = json.loads(lines.out.strip().splitlines()[-1])
    assert summary["stopped"] == "budget" and "stopped at the budget's cap" in lines.err
    billed_texts, billed = billed_besides_preflight(endpoint)
    one_request = MAX_INPUTS * max(counts)
    assert cap <= billed <= cap + SLOTS * one_request
    table = read_table(target).to_pandas()
    assert (table["status"] == "ok").all() and len(table) == billed_texts < n  # not sent: absent
    assert int(table["prompt_tokens"].sum()) == billed == summary["prompt_tokens"]

    # The rerun (no cap now) sends only what the first run did not: nothing is paid twice.
    endpoint.reset()
    rerun = driver.run(spark, config, progress=lambda _: None)
    assert rerun.counts["ok_rows"] == n - len(table) and rerun.stopped is None
    assert billed_besides_preflight(endpoint) == (n - billed_texts, sum(counts) - billed)
    assert len(read_table(target).to_pandas()) == n
