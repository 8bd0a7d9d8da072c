"""The whole job over a real local Spark Connect server, a real local endpoint and real Delta.

Connect has no SparkContext, no accumulators and no JVM in this process, and this server has
no Delta: the run must find its task slots and its sink from the server, bring its metrics
back as data, and write the same table, statuses, usage and summary as on classic Spark
(tests/spark/test_spark_job.py checks those there).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyspark.sql import DataFrame, SparkSession
from support import DIMS, build_config, die_at_wave

import sparkembed
from sparkembed.core.engine import PREFLIGHT_TEXT
from sparkembed.core.summary import RunSummary
from sparkembed.errors import SparkConnectError
from sparkembed.report import main as report_main
from sparkembed.server.launch import LocalEndpoint
from sparkembed.server.models import HashModel
from sparkembed.sinks import read_table
from sparkembed.spark import writers
from sparkembed.spark.delta_native import native_available
from sparkembed.spark.session import default_parallelism, is_connect

ROWS = 120
FirstRun = tuple[str, Any, RunSummary, dict[str, Any]]
"""The first run's target, config, summary and the endpoint's stats after it."""
LONG_TEXT = " ".join(f"word{i % 31} sentence {i}." for i in range(15))  # several chunks of 32 tokens


def source_rows(n: int = ROWS) -> list[tuple[str, str | None, str]]:
    texts: list[str | None] = [f"Document {i} is about topic {i % 17} and item {i * 7}." for i in range(n)]
    texts[1], texts[2], texts[3], texts[4] = None, "", "   \t", LONG_TEXT
    return [(f"doc-{i:04d}", text, f"title {i}") for i, text in enumerate(texts)]


def source(spark: SparkSession, n: int = ROWS) -> DataFrame:
    return spark.createDataFrame(source_rows(n), "id string, text string, title string")


def config_for(endpoint: LocalEndpoint, key: str, runs: Path, **sets: Any) -> Any:
    """No ``run.partitions``: the run asks the server how many task slots it has."""
    return build_config(sets={
        "endpoint.url": endpoint.url,
        "source.passthrough": ["title"],
        "batching.max_inputs": 16,
        "batching.max_input_tokens": 64,
        "long_text.chunk_tokens": 32,
        "long_text.overlap_tokens": 8,
        "limits.concurrency": 4,
        "run.log_dir": str(runs),
        **sets,
    }, key=key)  # fmt: skip


def billed_besides_preflight(endpoint: LocalEndpoint) -> tuple[int, int]:
    """(texts billed, prompt tokens) without the preflight requests."""
    from sparkembed.core import wordllama

    stats = endpoint.stats()
    preflights = stats["billed"].get(hashlib.sha256(PREFLIGHT_TEXT.encode()).hexdigest(), 0)
    preflight_tokens = wordllama.count_tokens([PREFLIGHT_TEXT])[0]
    return stats["texts_billed"] - preflights, stats["prompt_tokens"] - preflights * preflight_tokens


def own_connect_server_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that starts a local Connect server of its own: on a
    free port (``SPARK_TESTING``), without this process's Connect session's variables."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE", "SPARK_CONNECT_AUTHENTICATE_TOKEN", "SPARK_REMOTE"
    )}  # fmt: skip
    return env | {"SPARK_TESTING": "1", **extra}


def cached_relations_alive() -> int:
    """Server-side checkpoints this process still holds. One left for interpreter exit hangs it:
    its ``__del__`` then starts a gRPC thread that never runs (issue 16)."""
    gc.collect()
    return sum(
        1 for o in gc.get_objects()
        if type(o).__name__ == "CachedRemoteRelation" and getattr(o, "_relation_id", None) is not None
    )  # fmt: skip


@pytest.fixture(scope="module")
def first_run(
    connect: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> FirstRun:
    """One ``sparkembed.write`` on Connect: (target, config, summary, the endpoint's stats)."""
    folder = tmp_path_factory.mktemp("first")
    target = str(folder / "target")
    config = config_for(hash_endpoint, endpoint_key, folder / "runs")
    hash_endpoint.reset()
    summary = sparkembed.write(source(connect), target, config=config)
    return target, config, summary, hash_endpoint.stats(billed=False)


def test_the_session_is_connect_and_its_slots_and_sink_come_from_the_server(connect: SparkSession) -> None:
    import delta.tables  # noqa: F401  the client has the delta package...

    assert is_connect(connect)
    assert default_parallelism(connect) == 2  # local[2,4]: found by the probe, not set anywhere
    config = build_config(sets={"target.path": "/tmp/t"})
    assert not native_available(connect)  # ...but the server has no Delta
    assert writers.sink_kind(connect, config) == "delta-rs"


def test_a_first_run_writes_every_row_with_the_endpoints_vectors_and_usage(
    first_run: FirstRun, hash_endpoint: LocalEndpoint
) -> None:
    target, _, summary, stats = first_run
    rows = source_rows()
    table = read_table(target).to_pandas()
    assert set(table["id"]) == {r[0] for r in rows}  # no row lost
    whole = table[table["chunk_index"] == 0].set_index("id")
    assert list(whole.loc[["doc-0001", "doc-0002", "doc-0003"], "status"]) == ["skipped"] * 3
    chunks = table[table["id"] == "doc-0004"].sort_values("chunk_index")
    assert len(chunks) > 1 and (chunks["status"] == "ok").all()  # the long text was chunked
    assert chunks["chunk_start"].iloc[0] == 0 and chunks["chunk_end"].iloc[-1] == len(LONG_TEXT)
    ok = table[table["status"] == "ok"]
    assert len(ok) == len(table) - 3 and ok["error"].isna().all()

    text_of = {r[0]: r[1] for r in rows}
    texts = [
        LONG_TEXT[int(r.chunk_start) : int(r.chunk_end)] if r.id == "doc-0004" else text_of[r.id]
        for r in ok.itertuples()
    ]
    got = np.stack(ok["embedding"].to_numpy()).astype(np.float32)
    np.testing.assert_array_equal(got, HashModel(default_dimensions=DIMS).embed(texts, [], DIMS, "text"))
    assert (ok["text_hash"] == [hashlib.sha256(text_of[i].encode()).hexdigest() for i in ok["id"]]).all()
    assert (table["title"] == [f"title {int(i[4:])}" for i in table["id"]]).all()

    # Usage: the table, the summary and the endpoint's accounting agree; each text billed once.
    texts_billed, prompt_tokens = billed_besides_preflight(hash_endpoint)
    assert texts_billed == len(ok)
    assert int(table["prompt_tokens"].sum()) == prompt_tokens == summary.counts["prompt_tokens"]
    assert summary.tokens_billed == prompt_tokens
    # The summary's metrics came back as data from the tasks, without accumulators.
    counts = summary.counts
    assert (counts["ok_rows"], counts["skipped_rows"], counts["failed_rows"]) == (len(ok), 3, 0)
    assert counts["requests"] == stats["requests"] - 1  # all but the preflight
    assert len(summary.timeline) == counts["requests"]
    assert summary.rows_total == ROWS and summary.error is None
    assert summary.to_json()["run_id"] == summary.run_id


def test_a_rerun_sends_nothing_but_the_preflight(
    connect: SparkSession, first_run: FirstRun, hash_endpoint: LocalEndpoint
) -> None:
    target, config, _, _ = first_run
    before = read_table(target).to_pandas()
    hash_endpoint.reset()
    again = sparkembed.write(source(connect), target, config=config)
    assert hash_endpoint.stats(billed=False)["requests"] == 1  # the preflight only
    assert again.rows_total == 0 and again.counts["requests"] == 0
    after = read_table(target).to_pandas()
    assert sorted(after["request_id"].dropna()) == sorted(before["request_id"].dropna())


def test_the_report_of_a_connect_run(first_run: FirstRun, tmp_path: Path) -> None:
    _, config, summary, _ = first_run
    assert report_main([summary.run_id, "--runs-dir", config.run.log_dir, "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert summary.run_id in html and "<img" in html


def test_a_crash_after_a_wave_resumes_paying_only_for_what_was_left(
    connect: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = str(tmp_path / "target")
    config = config_for(hash_endpoint, endpoint_key, tmp_path / "runs", **{"run.commit_every_rows": 40})
    die_at_wave(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        sparkembed.write(source(connect), target, config=config)
    monkeypatch.undo()
    # The run's checkpoint of the rows to do is released now, not at interpreter exit.
    assert cached_relations_alive() == 0
    first_wave = read_table(target).to_pandas()
    assert 0 < first_wave["id"].nunique() < ROWS

    hash_endpoint.reset()
    summary = sparkembed.write(source(connect), target, config=config)
    table = read_table(target).to_pandas()
    assert set(table["id"]) == {r[0] for r in source_rows()}
    assert not table.duplicated(["id", "chunk_index"]).any()
    paid = len(table[table["status"] == "ok"]) - len(first_wave[first_wave["status"] == "ok"])
    assert paid > 0 and billed_besides_preflight(hash_endpoint)[0] == paid
    assert summary.counts["ok_rows"] == paid
    assert summary.rows_total == ROWS - first_wave["id"].nunique()


def test_a_connect_error_is_translated_with_the_original_chained(
    connect: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    """``target.sink: native`` on a server without Delta: the server refuses Delta's relation."""
    config = config_for(hash_endpoint, endpoint_key, tmp_path / "runs", **{"target.sink": "native"})
    with pytest.raises(SparkConnectError) as raised:
        sparkembed.write(source(connect, 10), str(tmp_path / "target"), config=config)
    message = str(raised.value)
    assert message.startswith("Spark Connect: ") and "JVM stacktrace" not in message
    assert "\n" not in message and endpoint_key not in message
    assert type(raised.value.__cause__).__module__.startswith("pyspark.errors.exceptions.connect")
    assert raised.value.run_summary.error.startswith("SparkConnectError: ")  # type: ignore[attr-defined]
    assert cached_relations_alive() == 0


def test_grpc_errors_are_translated_at_the_api(
    connect: SparkSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that cannot be reached answers with a raw ``grpc.RpcError`` (after retrying)."""
    import grpc

    from sparkembed.spark import api
    from sparkembed.spark.driver import translate_spark_error

    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "failed to connect to all addresses; sc://host:443/;token=dapi-secret-123"

    def unreachable(spark: SparkSession) -> int:
        raise Unavailable()

    monkeypatch.setattr(api, "default_parallelism", unreachable)
    with pytest.raises(SparkConnectError, match="UNAVAILABLE: failed to connect") as raised:
        config = {"endpoint": {"url": "http://127.0.0.1:9"}, "auth": {"mode": "none"}}
        sparkembed.embedding_udf(config=config, spark=connect)
    assert isinstance(raised.value.__cause__, Unavailable)
    assert "dapi-secret-123" not in str(raised.value) and "token=***" in str(raised.value)
    assert translate_spark_error(ValueError("not Spark's")) is None


def test_embed_is_lazy_on_connect(
    connect: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    config = config_for(hash_endpoint, endpoint_key, tmp_path / "runs")
    hash_endpoint.reset()
    out = sparkembed.embed(source(connect, 6), config=config)
    assert hash_endpoint.stats(billed=False)["requests"] == 0  # nothing sent yet
    rows = {r["id"]: r for r in out.collect()}
    assert [rows[f"doc-{i:04d}"]["status"] for i in (0, 1, 5)] == ["ok", "skipped", "ok"]
    want = HashModel(default_dimensions=DIMS).embed([source_rows(6)[5][1]], [], DIMS, "text")[0]
    np.testing.assert_array_equal(np.array(rows["doc-0005"]["embedding"], dtype=np.float32), want)


def test_the_udf_and_its_sql_function_give_the_endpoints_vectors(
    connect: SparkSession, start_endpoint, endpoint_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARKEMBED_TEST_KEY", endpoint_key)
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--fail-text", "POISON")
    texts: list[str | None] = [f"text number {i}" for i in range(100)]
    texts[5], texts[6] = None, "  "
    df = connect.createDataFrame(list(enumerate(texts)), "doc long, body string").coalesce(1)
    config = {
        "endpoint": {"url": endpoint.url},
        "auth": {"key_env": "SPARKEMBED_TEST_KEY"},
        "batching": {"max_inputs": 64},
    }
    emb = sparkembed.embedding_udf(config=config)  # the active session: this Connect one
    connect.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10")
    try:
        rows = {r["doc"]: r["e"] for r in df.select("doc", emb("body").alias("e")).collect()}
        stats = endpoint.stats(billed=False)
        connect.udf.register("embed_text", emb)
        df.union(connect.createDataFrame([(100, "a POISON text")], df.schema)).createOrReplaceTempView("docs")
        sql = {r["doc"]: r["e"] for r in connect.sql("SELECT doc, embed_text(body) AS e FROM docs").collect()}
    finally:
        connect.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "4096")

    docs = [i for i in range(100) if i not in (5, 6)]
    want = HashModel(DIMS).embed([texts[i] for i in docs], [], DIMS, "text")
    for doc, vector in zip(docs, want, strict=True):
        assert rows[doc]["status"] == "ok" and rows[doc]["error"] is None
        np.testing.assert_array_equal(np.array(rows[doc]["embedding"], dtype=np.float32), vector)
        np.testing.assert_array_equal(np.array(sql[doc]["embedding"], dtype=np.float32), vector)
    assert [rows[d]["status"] for d in (5, 6)] == ["skipped", "skipped"] and rows[5]["embedding"] is None
    # Ten Arrow batches of 10 rows went out as requests of up to 64 texts: 98 texts, 2 requests.
    assert (stats["requests"], stats["texts_billed"]) == (2, 98)
    assert sum(r["prompt_tokens"] for r in rows.values()) == stats["prompt_tokens"]
    assert sql[100]["status"] == "failed" and sql[100]["error"].startswith("400 ")
    assert sql[99]["status"] == "ok"


def test_the_native_sinks_metrics_need_no_accumulator(
    connect: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spark's own Delta on Connect (Databricks serverless): this server has none, so its write
    is delta-rs here; the metrics path is the one a Delta server takes, without accumulators."""
    from dataclasses import replace

    from deltalake import write_deltalake

    from sparkembed.spark import delta_native, driver
    from sparkembed.spark.sources import select_input

    def write_native(out: DataFrame, target: str, **_: Any) -> None:
        write_deltalake(target, out.toArrow(), mode="append")

    monkeypatch.setattr(delta_native, "write_native", write_native)
    monkeypatch.setattr(delta_native, "add_columns", lambda *args: None)
    target, runs = str(tmp_path / "target"), tmp_path / "runs" / "native-run"
    config = config_for(hash_endpoint, endpoint_key, tmp_path / "runs", **{"target.path": target})
    context = replace(driver.preflight(config), run_id="native-run", workers=2)
    assert writers.embed_with_metrics(source(connect, 6), config, context)[1] is None  # no accumulators
    hash_endpoint.reset()

    sink = writers.NativeSink(connect, str(runs))
    rows = select_input(source(connect, 60), config.source)
    waves = [
        sink.write_wave(rows.filter(rows.id < "doc-0030").repartition(2), config, context, 0),
        sink.write_wave(rows.filter(rows.id >= "doc-0030").repartition(2), config, context, 1),
    ]

    table = read_table(target).to_pandas()
    stats = hash_endpoint.stats(billed=False)
    assert sum(w["ok_rows"] for w in waves) == (table["status"] == "ok").sum()
    assert sum(w["skipped_rows"] for w in waves) == 3
    assert sum(w["prompt_tokens"] for w in waves) == table["prompt_tokens"].sum() == stats["prompt_tokens"]
    assert sum(w["requests"] for w in waves) == stats["requests"]
    assert sum(len(w["timeline"]) for w in waves) == stats["requests"]


@pytest.mark.slow
def test_the_command_line_runs_on_a_connect_server_of_its_own(
    hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    """``SPARK_REMOTE`` as ``spark-submit --remote`` sets it: the CLI (and jobs/embed_table.py)
    builds a Connect session instead of a classic one, and exits when done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = source_rows(40)
    source_path = tmp_path / "source.parquet"
    columns = {name: [r[i] for r in rows] for i, name in enumerate(("id", "text", "title"))}
    pq.write_table(pa.table(columns), source_path)
    target = tmp_path / "target"
    env = own_connect_server_env(SPARK_REMOTE="local[2]", AZURE_INFERENCE_CREDENTIAL=endpoint_key)
    hash_endpoint.reset()
    proc = subprocess.run(
        [sys.executable, "-m", "sparkembed.cli", "run", "--endpoint", hash_endpoint.url,
         "--source", str(source_path), "--target", str(target), "--set", f"run.log_dir={tmp_path / 'runs'}",
         "--set", "batching.max_input_tokens=64", "--set", "long_text.chunk_tokens=32",
         "--set", "long_text.overlap_tokens=8"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    table = read_table(str(target)).to_pandas()
    assert summary["rows_ok"] == (table["status"] == "ok").sum() and summary["rows_skipped"] == 3
    billed = billed_besides_preflight(hash_endpoint)[1]
    assert summary["prompt_tokens"] == billed == table["prompt_tokens"].sum()
    assert endpoint_key not in proc.stdout + proc.stderr


SCRIPT_LEFT_FAILING = """
import os, sys
import sparkembed
from pyspark.sql import SparkSession

spark = SparkSession.builder.remote("local[2]").getOrCreate()
df = spark.createDataFrame([(i, f"text {i}") for i in range(20)], "id long, text string")
config = {"endpoint": {"url": os.environ["ENDPOINT"]}, "target": {"sink": "native"},
          "run": {"log_dir": sys.argv[2]}}
sparkembed.write(df, sys.argv[1], config=config)  # fails; the session is never stopped
"""


@pytest.mark.slow
def test_a_script_whose_run_failed_exits_at_once(
    hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    """Issue 16: after the server refused the run, the process hung at exit until killed (a
    checkpoint of the failed run, released only in ``__del__`` at interpreter shutdown)."""
    env = own_connect_server_env(ENDPOINT=hash_endpoint.url, AZURE_INFERENCE_CREDENTIAL=endpoint_key)
    args = [sys.executable, "-c", SCRIPT_LEFT_FAILING, str(tmp_path / "target"), str(tmp_path / "runs")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)  # hung: TimeoutExpired
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sparkembed.errors.SparkConnectError: Spark Connect: InvalidPlanInput" in proc.stderr
