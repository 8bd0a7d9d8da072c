"""The notebook API: lazy embed(), and write() keeping the config's own keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import SparkSession

import sparkembed
from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import read_table

pytestmark = [pytest.mark.spark, pytest.mark.integration]


def config_for(endpoint: LocalEndpoint, tmp_path: Path, **sections: dict) -> dict:
    return {
        "endpoint": {"url": endpoint.url},
        "auth": {"key_env": "SPARKEMBED_TEST_KEY"},
        "source": {"id_col": "doc", "text_col": "body", "passthrough": ["title"]},
        "run": {"log_dir": str(tmp_path / "runs")},
        **sections,
    }


def test_embed_is_lazy_and_uses_the_configs_columns(
    spark: SparkSession, start_endpoint, endpoint_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARKEMBED_TEST_KEY", endpoint_key)
    endpoint = start_endpoint("--model", "hash", "--dims", "16")
    df = spark.createDataFrame(
        [(1, "first text", "a"), (2, None, "b"), (3, "third text", "c")],
        "doc long, body string, title string",
    )
    out = sparkembed.embed(df, config=config_for(endpoint, tmp_path))
    assert endpoint.stats(billed=False)["requests"] == 0  # nothing sent yet
    rows = {r["doc"]: r for r in out.collect()}
    assert out.columns[0] == "doc" and out.columns[-1] == "title"
    assert [rows[i]["status"] for i in (1, 2, 3)] == ["ok", "skipped", "ok"]
    assert rows[3]["title"] == "c" and len(rows[1]["embedding"]) == 16
    assert endpoint.stats()["texts_billed"] == 2


def test_write_keeps_the_configs_mode_unless_told(
    spark: SparkSession, start_endpoint, endpoint_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARKEMBED_TEST_KEY", endpoint_key)
    endpoint = start_endpoint("--model", "hash", "--dims", "16")
    df = spark.createDataFrame([(1, "one", "a"), (2, "two", "b")], "doc long, body string, title string")
    target = str(tmp_path / "t")
    config = config_for(endpoint, tmp_path, target={"mode": "append"})
    summary = sparkembed.write(df, target, config=config)
    assert summary.counts["ok_rows"] == 2
    assert sorted(read_table(target).column("title").to_pylist()) == ["a", "b"]
    again = sparkembed.write(df, target, config=config)  # append mode, but nothing new to embed
    assert again.counts["ok_rows"] == 0 and read_table(target).num_rows == 2


def test_the_native_sinks_metrics_come_back_through_an_accumulator(
    spark: SparkSession, start_endpoint, endpoint_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native sink writes with Spark's Delta (not here), so metrics can't ride on collected rows."""
    from sparkembed.api import _as_config
    from sparkembed.waves import embed_with_metrics

    monkeypatch.setenv("SPARKEMBED_TEST_KEY", endpoint_key)
    endpoint = start_endpoint("--model", "hash", "--dims", "16")
    df = spark.createDataFrame(
        [(i, f"text {i}", "t") for i in range(300)], "doc long, body string, title string"
    ).repartition(3)
    config = _as_config(spark, config_for(endpoint, tmp_path, batching={"max_inputs": 50}))
    out, accumulator = embed_with_metrics(df, config, "run-1")
    assert out.count() == 300
    metrics = accumulator.value
    assert metrics["ok_rows"] == 300 and metrics["requests"] == endpoint.stats(billed=False)["requests"]
    assert metrics["prompt_tokens"] == endpoint.stats(billed=False)["prompt_tokens"]
    assert len(metrics["timeline"]) == metrics["requests"]
