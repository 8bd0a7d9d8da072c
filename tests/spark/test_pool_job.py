"""A pool of deployments in the whole job: the ``deployment`` column, a rerun through another
pool, a table written before the column existed, and a pool the preflight refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from pyspark.sql import SparkSession
from support import build_config

from sparkembed.config import EmbedConfig, deployment_name
from sparkembed.errors import ConfigError
from sparkembed.server.launch import LocalEndpoint
from sparkembed.server.models import HashModel
from sparkembed.sinks import read_table
from sparkembed.spark import driver

pytestmark = [pytest.mark.spark, pytest.mark.integration]

DIMS = 64


def write_source(tmp_path: Path, n: int, name: str = "source.parquet") -> tuple[str, list[str]]:
    texts = [f"Document {i} is about topic {i % 17} and item {i * 7}." for i in range(n)]
    path = tmp_path / name
    pq.write_table(pa.table({"id": [f"doc-{i:04d}" for i in range(n)], "text": texts}), path)
    return str(path), texts


def config_for(
    endpoint: dict[str, Any], key: str, source: str, target: str, **sets: Any
) -> EmbedConfig:
    return build_config(
        {"endpoint": endpoint},
        sets={
            "source.path": source,
            "target.path": target,
            "batching.max_inputs": 32,
            "limits.concurrency": 4,
            "run.commit_every_rows": 200,
            "run.log_dir": str(Path(target).parent / "runs"),
            **sets,
        },
        key=key,
    )


def pool_of(*endpoints: LocalEndpoint) -> dict[str, Any]:
    return {"pool": [{"url": e.url, "tokens_per_minute": 600_000} for e in endpoints]}


def hash_vectors(texts: list[str]) -> np.ndarray:
    return HashModel(default_dimensions=DIMS).embed(texts, [], DIMS, "text")


def test_the_deployment_column_says_who_served_each_row_and_another_pool_redoes_nothing(
    spark: SparkSession, start_endpoint: Any, endpoint_key: str, tmp_path: Path
) -> None:
    a, b = (start_endpoint("--model", "hash", "--dims", str(DIMS), "--latency-ms", "20") for _ in range(2))
    source, texts = write_source(tmp_path, 600)
    target = str(tmp_path / "target")
    summary = driver.run(spark, config_for(pool_of(a, b), endpoint_key, source, target), progress=print)

    table = read_table(target).to_pandas().set_index("id").loc[[f"doc-{i:04d}" for i in range(600)]]
    assert (table["status"] == "ok").all()
    np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy()), hash_vectors(texts))
    served = table["deployment"].value_counts().to_dict()
    names = {deployment_name(a.url), deployment_name(b.url)}
    assert set(served) == names, served
    for endpoint in (a, b):  # each row's deployment billed it (besides the preflight's text)
        stats = endpoint.stats(billed=False)
        assert stats["texts_billed"] - 1 == served[deployment_name(endpoint.url)]
    assert read_table(target).schema.names[-3:] == ["deployment", "dedup_of", "cached_from"]

    assert set(summary.deployments) == names
    for name in names:
        usage = summary.deployments[name]
        assert usage["quota_tokens_per_minute"] == 600_000
        assert usage["requests"] > 0 and usage["tokens_per_minute"] > 0
    assert summary.to_json()["deployments"] == summary.deployments

    # The same model through another pool: the fingerprint is the same, nothing is redone.
    c = start_endpoint("--model", "hash", "--dims", str(DIMS))
    again = driver.run(spark, config_for(pool_of(c), endpoint_key, source, target), progress=print)
    assert again.counts["requests"] == 0
    assert c.stats(billed=False)["ok_requests"] == 1  # the preflight only


def test_a_table_from_before_the_deployment_column_keeps_working(
    spark: SparkSession, start_endpoint: Any, endpoint_key: str, tmp_path: Path
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS))
    one_url = {"url": endpoint.url}
    first, _ = write_source(tmp_path, 300, "first.parquet")
    driver.run(spark, config_for(one_url, endpoint_key, first, str(tmp_path / "new")), progress=print)
    written = read_table(str(tmp_path / "new"))
    assert set(written.column("deployment").to_pylist()) == {deployment_name(endpoint.url)}
    old = str(tmp_path / "old")  # the same rows as an older release wrote them: no deployment, dedup_of...
    write_deltalake(old, written.drop_columns(["deployment", "dedup_of", "cached_from"]))

    source, texts = write_source(tmp_path, 500)
    summary = driver.run(spark, config_for(one_url, endpoint_key, source, old), progress=print)

    assert summary.counts["ok_rows"] == 200  # the 300 rows from before are done already
    table = read_table(old).to_pandas().set_index("id").sort_index()
    assert len(table) == 500 and (table["status"] == "ok").all()
    assert table["deployment"].iloc[:300].isna().all()
    assert (table["deployment"].iloc[300:] == deployment_name(endpoint.url)).all()
    assert table["dedup_of"].isna().all()  # added, after deployment, null for every row here
    assert table["cached_from"].isna().all()
    assert read_table(old).schema.names[-3:] == ["deployment", "dedup_of", "cached_from"]
    np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy()), hash_vectors(texts))


@pytest.mark.parametrize(
    ("second", "said"),
    [
        (("--model", "hash", "--dims", "32"), "answers 32 dimensions, but"),
        (("--model", "wordllama", "--dims", str(DIMS)), "answers another vector than"),
    ],
)
def test_a_pool_whose_vectors_disagree_is_refused_naming_the_deployment(
    start_endpoint: Any, endpoint_key: str, second: tuple[str, ...], said: str
) -> None:
    a, b = start_endpoint("--model", "hash", "--dims", str(DIMS)), start_endpoint(*second)
    # One model name for both, as deployments report it: only the vectors tell them apart.
    config = build_config({"endpoint": {**pool_of(a, b), "model": "embedding"}}, key=endpoint_key)
    with pytest.raises(ConfigError, match="One table must never mix vector spaces") as refused:
        driver.preflight(config)
    assert f"deployment {deployment_name(b.url)} {said}" in str(refused.value)
    assert endpoint_key not in str(refused.value)


def test_the_cli_refuses_a_mixed_pool_in_one_line_before_spark_starts(
    start_endpoint: Any, endpoint_key: str, tmp_path: Path
) -> None:
    a = start_endpoint("--model", "hash", "--dims", str(DIMS))
    b = start_endpoint("--model", "hash", "--dims", "32")
    source, _ = write_source(tmp_path, 5)
    (tmp_path / "pool.yaml").write_text(
        "endpoint:\n  pool:\n"
        f"    - {{url: '{a.url}', tokens_per_minute: 240000}}\n"
        f"    - {{url: '{b.url}', tokens_per_minute: 120000, key_env: KEY_B}}\n"
    )
    env = {**os.environ, "AZURE_INFERENCE_CREDENTIAL": endpoint_key, "KEY_B": endpoint_key}
    env.pop("SPARKEMBED_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sparkembed.cli", "run", "--config", "pool.yaml", "--source", source,
         "--target", "./t"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith(f"sparkembed: error: endpoint.pool: deployment {deployment_name(b.url)} ")
    assert "Traceback" not in proc.stderr and endpoint_key not in proc.stderr + proc.stdout
    assert not (tmp_path / "t").exists()
