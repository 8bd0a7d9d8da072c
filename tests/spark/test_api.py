"""The notebook API: lazy embed(), and write() keeping the config's own keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from pyspark.util import PythonEvalType

import sparkembed
from sparkembed.config import deployment_name
from sparkembed.core.context import RunContext
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
    # Passthrough columns, then those added since the first tables (deployment, dedup_of, cached_from),
    # as tables evolve.
    assert out.columns[0] == "doc" and out.columns[-4:] == ["title", "deployment", "dedup_of", "cached_from"]
    served = deployment_name(endpoint.url)
    assert [rows[i]["deployment"] for i in (1, 2, 3)] == [served, None, served]  # a skipped row: none
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
    from sparkembed.spark.api import _as_config
    from sparkembed.spark.writers import embed_with_metrics

    monkeypatch.setenv("SPARKEMBED_TEST_KEY", endpoint_key)
    endpoint = start_endpoint("--model", "hash", "--dims", "16")
    df = spark.createDataFrame(
        [(i, f"text {i}", "t") for i in range(300)], "doc long, body string, title string"
    ).repartition(3)
    config = _as_config(spark, config_for(endpoint, tmp_path, batching={"max_inputs": 50}))
    out, accumulator = embed_with_metrics(df, config, RunContext(run_id="run-1"))
    assert out.count() == 300
    metrics = accumulator.value
    assert metrics["ok_rows"] == 300 and metrics["requests"] == endpoint.stats(billed=False)["requests"]
    assert metrics["prompt_tokens"] == endpoint.stats(billed=False)["prompt_tokens"]
    assert len(metrics["timeline"]) == metrics["requests"]


# An Arrow UDF where pyspark has arrow_udf (4.1+); the pandas UDF of pyspark 3.5 and 4.0.
UDF_KINDS = {
    "arrow": PythonEvalType.SQL_SCALAR_ARROW_ITER_UDF,
    "pandas": PythonEvalType.SQL_SCALAR_PANDAS_ITER_UDF,
}


@pytest.mark.parametrize("kind", sorted(UDF_KINDS))
def test_the_udf_embeds_a_column_and_serves_sql_with_the_endpoints_vectors(
    spark: SparkSession,
    start_endpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    import numpy as np
    from pyspark.sql import functions as F

    from sparkembed.server.models import HashModel

    if kind == "pandas":  # as on pyspark 3.5 and 4.0, which have no arrow_udf
        monkeypatch.delattr(F, "arrow_udf")
    monkeypatch.setenv("SPARKEMBED_TEST_KEY", endpoint_key)
    endpoint = start_endpoint("--model", "hash", "--dims", "16", "--fail-text", "POISON")
    texts = [f"text number {i}" for i in range(100)]
    texts[5], texts[6] = None, "  "
    df = spark.createDataFrame(list(enumerate(texts)), "doc long, body string").coalesce(1)
    emb = sparkembed.embedding_udf(config=config_for(endpoint, tmp_path, batching={"max_inputs": 64}))
    assert emb.evalType == UDF_KINDS[kind]
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10")
    try:
        rows = {r["doc"]: r["e"] for r in df.select("doc", emb("body").alias("e")).collect()}
        stats = endpoint.stats(billed=False)
        spark.udf.register("embed_text", emb)
        df.union(spark.createDataFrame([(100, "a POISON text")], df.schema)).createOrReplaceTempView("docs")
        query = "SELECT doc, embed_text(body) AS e FROM docs"
        sql = {r["doc"]: r["e"] for r in spark.sql(query).collect()}
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4096")

    docs = [i for i in range(100) if i not in (5, 6)]
    want = dict(zip(docs, HashModel(16).embed([texts[i] for i in docs], [], 16, "text"), strict=True))
    for doc, vector in want.items():
        assert rows[doc]["status"] == "ok" and rows[doc]["error"] is None
        np.testing.assert_array_equal(np.array(rows[doc]["embedding"], dtype=np.float32), vector)
        np.testing.assert_array_equal(np.array(sql[doc]["embedding"], dtype=np.float32), vector)
    assert [rows[d]["status"] for d in (5, 6)] == ["skipped", "skipped"] and rows[5]["embedding"] is None
    # Ten Arrow batches of 10 rows went out as requests of up to 64 texts: 98 texts, 2 requests.
    assert (stats["requests"], stats["texts_billed"]) == (2, 98)
    assert sum(r["prompt_tokens"] for r in rows.values()) == stats["prompt_tokens"]
    # A text the service refuses fails alone, with its reason, in SQL too.
    assert sql[100]["status"] == "failed" and sql[100]["error"].startswith("400 ")
    assert sql[99]["status"] == "ok"
