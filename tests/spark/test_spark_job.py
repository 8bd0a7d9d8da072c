"""The whole job on real Spark (local[2]), a real local endpoint over HTTP, real Delta.

Results are checked with plain ``deltalake`` against the endpoint's own answers and
accounting: vectors, usage sums, statuses, and how many connections the executors opened.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from pyspark.sql import SparkSession
from support import build_config, die_at_wave

from sparkembed.config import EmbedConfig, load_config
from sparkembed.core.engine import PREFLIGHT_TEXT
from sparkembed.core.summary import RunSummary
from sparkembed.errors import ConfigError
from sparkembed.server.launch import LocalEndpoint
from sparkembed.server.models import HashModel
from sparkembed.sinks import ConcurrentWriteError, read_table, staging_location
from sparkembed.spark import driver

pytestmark = [pytest.mark.spark, pytest.mark.integration]

DIMS = 64
LONG_TEXT = " ".join(f"word{i % 97} sentence {i}." for i in range(4000))  # about 20k tokens


def source_rows(n: int = 600) -> dict[str, list[Any]]:
    ids = [f"doc-{i:04d}" for i in range(n)]
    texts: list[str | None] = [f"Document {i} is about topic {i % 17} and item {i * 7}." for i in range(n)]
    texts[1], texts[2], texts[3], texts[4] = None, "", "   \t", LONG_TEXT
    return {"id": ids, "text": texts, "title": [f"title {i}" for i in range(n)]}


def write_source(tmp_path: Path, rows: dict[str, list[Any]], name: str = "source.parquet") -> str:
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.table(rows), path)
    return str(path)


def make_config(endpoint: LocalEndpoint, key: str, source: str, target: str, **sets: Any) -> EmbedConfig:
    overrides = {
        "endpoint.url": endpoint.url,
        "source.path": source,
        "source.passthrough": ["title"],
        "target.path": target,
        "batching.max_inputs": 64,
        "limits.concurrency": 4,
        "run.commit_every_rows": 250,
        "run.log_dir": str(Path(target).parent / "runs"),
        **sets,
    }
    return build_config(sets=overrides, key=key)


def expected_vectors(texts: list[str]) -> np.ndarray:
    model = HashModel(default_dimensions=DIMS)
    return model.embed(texts, [], DIMS, "text")


def billed_besides_preflight(endpoint: LocalEndpoint) -> tuple[int, int]:
    """(texts billed, prompt tokens) without the preflight requests."""
    stats = endpoint.stats()
    preflight_hash = hashlib.sha256(PREFLIGHT_TEXT.encode()).hexdigest()
    preflights = stats["billed"].get(preflight_hash, 0)
    from sparkembed.core import wordllama

    preflight_tokens = wordllama.count_tokens([PREFLIGHT_TEXT])[0]
    return stats["texts_billed"] - preflights, stats["prompt_tokens"] - preflights * preflight_tokens


@pytest.fixture()
def hash_endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", str(DIMS))


def test_job_writes_every_row_with_the_endpoints_vectors_and_usage(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = source_rows()
    target = str(tmp_path / "target")
    config = make_config(hash_endpoint, endpoint_key, write_source(tmp_path, rows), target)

    summary = driver.run(spark, config, progress=lambda _: None)

    table = read_table(target).to_pandas()
    assert set(table["id"]) == set(rows["id"])  # no row lost
    whole = table[table["chunk_index"] == 0].set_index("id")
    assert whole.loc["doc-0001", "status"] == "skipped"
    assert whole.loc["doc-0002", "status"] == "skipped"
    assert whole.loc["doc-0003", "status"] == "skipped"
    chunks = table[table["id"] == "doc-0004"].sort_values("chunk_index")
    assert len(chunks) > 1 and (chunks["status"] == "ok").all()  # the long text was chunked
    starts, ends = chunks["chunk_start"].tolist(), chunks["chunk_end"].tolist()
    assert starts[0] == 0 and ends[-1] == len(LONG_TEXT)
    assert all(starts[k + 1] < ends[k] for k in range(len(starts) - 1))  # overlapping, no gaps
    ok = table[table["status"] == "ok"]
    assert len(ok) == len(table) - 3 and table["error"][table["status"] == "ok"].isna().all()

    # Vectors are the endpoint's, row by row (chunks: the vector of the chunk's text).
    source_text = {i: t for i, t in zip(rows["id"], rows["text"], strict=True)}
    texts = [
        LONG_TEXT[int(r.chunk_start) : int(r.chunk_end)] if r.id == "doc-0004" else source_text[r.id]
        for r in ok.itertuples()
    ]
    got = np.stack(ok["embedding"].to_numpy()).astype(np.float32)
    np.testing.assert_array_equal(got, expected_vectors(texts))
    assert (ok["dimensions"] == DIMS).all()
    hashes = [hashlib.sha256(source_text[i].encode()).hexdigest() for i in ok["id"]]
    assert (ok["text_hash"] == hashes).all()
    assert (table["title"] == [f"title {int(i[4:])}" for i in table["id"]]).all()

    # Usage: table sums equal the endpoint's accounting, and each text was billed once.
    texts_billed, prompt_tokens = billed_besides_preflight(hash_endpoint)
    assert texts_billed == len(ok)
    assert int(table["prompt_tokens"].sum()) == prompt_tokens == summary.counts["prompt_tokens"]
    assert summary.counts["ok_rows"] == len(ok) and summary.counts["skipped_rows"] == 3

    # One client per Python worker: 2 workers x concurrency 4, plus the driver's preflight.
    assert hash_endpoint.stats(billed=False)["connections"] <= 2 * 4 + 1


def test_rerun_is_free_and_only_changes_are_billed(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = source_rows(300)
    target = str(tmp_path / "target")
    config = make_config(hash_endpoint, endpoint_key, write_source(tmp_path, rows), target)
    driver.run(spark, config, progress=lambda _: None)
    before = read_table(target).to_pandas()

    hash_endpoint.reset()
    driver.run(spark, config, progress=lambda _: None)
    assert hash_endpoint.stats(billed=False)["requests"] == 1  # the preflight only
    after = read_table(target).to_pandas()
    assert sorted(after["request_id"].dropna()) == sorted(before["request_id"].dropna())

    # Change 10 texts, add 10 rows, delete 5: 20 texts billed.
    changed = dict(rows)
    changed["text"] = list(rows["text"])
    for i in range(10, 20):
        changed["text"][i] = f"Changed text {i}."
    for key in changed:
        changed[key] = changed[key][5:] if key != "text" else changed["text"][5:]
    changed["id"] += [f"new-{i}" for i in range(10)]
    changed["text"] += [f"A new document {i}." for i in range(10)]
    changed["title"] += ["new"] * 10
    config2 = make_config(
        hash_endpoint, endpoint_key, write_source(tmp_path, changed, "changed.parquet"), target
    )
    hash_endpoint.reset()
    driver.run(spark, config2, progress=lambda _: None)
    assert billed_besides_preflight(hash_endpoint)[0] == 20
    table = read_table(target).to_pandas().set_index("id")
    for i in range(10, 20):
        row = table.loc[f"doc-{i:04d}"]
        assert row["text_hash"] == hashlib.sha256(f"Changed text {i}.".encode()).hexdigest()
        np.testing.assert_array_equal(row["embedding"], expected_vectors([f"Changed text {i}."])[0])
    keys = read_table(target).to_pandas()[["id", "chunk_index", "text_hash"]]
    assert not keys.duplicated(["id", "chunk_index"]).any()  # no stale rows
    assert (keys.groupby("id")["text_hash"].nunique(dropna=False) == 1).all()
    assert "doc-0000" in table.index  # deleted from the source, kept without --prune

    pruned = config2.model_copy(update={"run": config2.run.model_copy(update={"prune": True})})
    summary = driver.run(spark, pruned, progress=lambda _: None)
    ids = set(read_table(target).column("id").to_pylist())
    assert summary.pruned == 5 and not {f"doc-{i:04d}" for i in range(5)} & ids
    assert ids == set(changed["id"])


def test_a_run_that_commits_while_this_one_plans_makes_this_one_fail_not_repeat_its_rows(
    spark: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = source_rows(60)
    target = str(tmp_path / "target")
    first = write_source(tmp_path, {key: values[:20] for key, values in rows.items()}, "first.parquet")
    driver.run(spark, make_config(hash_endpoint, endpoint_key, first, target), progress=lambda _: None)
    before = read_table(target)
    planned = driver.plan_work

    def another_run_commits_after_planning(*args: Any, **kwargs: Any) -> Any:
        plan = planned(*args, **kwargs)
        write_deltalake(target, before.slice(0, 1), mode="append")
        return plan

    monkeypatch.setattr(driver, "plan_work", another_run_commits_after_planning)
    hash_endpoint.reset()
    config = make_config(hash_endpoint, endpoint_key, write_source(tmp_path, rows), target)
    with pytest.raises(ConcurrentWriteError, match="another writer committed"):
        driver.run(spark, config, progress=lambda _: None)
    assert len(read_table(target)) == len(before) + 1  # nothing of this run's: it planned without that row
    assert billed_besides_preflight(hash_endpoint)[0] == 0  # refused before any request


def test_failed_rows_stay_until_retry_failed(
    spark: SparkSession, start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = source_rows(200)
    for i in (7, 70, 170):
        rows["text"][i] = f"POISON row {i}"
    source = write_source(tmp_path, rows)
    target = str(tmp_path / "target")
    faulty = start_endpoint("--model", "hash", "--dims", str(DIMS), "--fail-text", "POISON")
    summary = driver.run(spark, make_config(faulty, endpoint_key, source, target), progress=lambda _: None)
    table = read_table(target).to_pandas()
    failed = table[table["status"] == "failed"]
    assert sorted(failed["id"]) == ["doc-0007", "doc-0070", "doc-0170"]
    assert failed["error"].str.startswith("400 invalid_input").all()
    assert summary.counts["failed_rows"] == 3 and summary.failed_fraction > 0

    clean = start_endpoint("--model", "hash", "--dims", str(DIMS))
    lines: list[str] = []
    driver.run(spark, make_config(clean, endpoint_key, source, target), progress=lines.append)
    assert any(line.startswith("3 ids have failed rows") for line in lines)
    assert clean.stats(billed=False)["requests"] == 1  # left as they are

    driver.run(
        spark,
        make_config(clean, endpoint_key, source, target, **{"run.retry_failed": True}),
        progress=lambda _: None,
    )
    table = read_table(target).to_pandas()
    assert (table["status"] != "failed").all()
    assert not table.duplicated(["id", "chunk_index"]).any()
    assert billed_besides_preflight(clean)[0] == 3


def test_changed_fingerprint_is_refused_and_reembed_all_resumes_after_a_crash(
    spark: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = source_rows(600)
    source = write_source(tmp_path, rows)
    target = str(tmp_path / "target")
    driver.run(spark, make_config(hash_endpoint, endpoint_key, source, target), progress=lambda _: None)
    smaller = make_config(hash_endpoint, endpoint_key, source, target, **{"endpoint.dimensions": 32})
    with pytest.raises(ConfigError, match="--reembed-all"):
        driver.run(spark, smaller, progress=lambda _: None)

    # A --reembed-all run dies after its first wave is committed...
    again = make_config(
        hash_endpoint, endpoint_key, source, target, **{"endpoint.dimensions": 32, "run.reembed_all": True}
    )
    die_at_wave(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        driver.run(spark, again, progress=lambda _: None)
    monkeypatch.undo()
    # The target is untouched (one fingerprint, issue 19): the first wave sits in the staging table.
    untouched = read_table(target).to_pandas()
    assert set(untouched["dimensions"].dropna()) == {DIMS}
    assert untouched["embedding_fingerprint"].nunique() == 1
    first_wave = read_table(staging_location(target)).to_pandas()
    assert 0 < first_wave["id"].nunique() < len(rows["id"]) and set(first_wave["dimensions"].dropna()) == {32}
    with pytest.raises(ConfigError, match="also to finish"):  # half-built: still refused without the flag
        driver.run(spark, smaller, progress=lambda _: None)

    # ...and its rerun pays only for what the crash left undone.
    hash_endpoint.reset()
    driver.run(spark, again, progress=lambda _: None)
    table = read_table(target).to_pandas()
    assert table["embedding_fingerprint"].nunique() == 1
    assert set(table["dimensions"].dropna()) == {32}
    assert set(table["id"]) == set(rows["id"])
    billed_ids = len(set(rows["id"])) - 3 - first_wave["id"].nunique()  # minus blanks, minus wave 0
    assert billed_besides_preflight(hash_endpoint)[0] == len(table[table["status"] == "ok"]) - len(
        first_wave[first_wave["status"] == "ok"]
    )
    assert billed_ids > 0


def test_a_target_that_does_not_fit_is_refused_before_any_embedding(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = source_rows(50)
    target = str(tmp_path / "target")
    driver.run(
        spark, make_config(hash_endpoint, endpoint_key, write_source(tmp_path, rows), target), progress=print
    )
    rows["title"] = list(range(50))  # a passthrough column changed type
    other = make_config(hash_endpoint, endpoint_key, write_source(tmp_path, rows, "other.parquet"), target)
    hash_endpoint.reset()
    with pytest.raises(ConfigError, match="title"):
        driver.run(spark, other, progress=lambda _: None)
    assert hash_endpoint.stats(billed=False)["requests"] == 1  # the preflight only


def test_prune_to_an_empty_table_then_rerun(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    target = str(tmp_path / "target")
    source = write_source(tmp_path, source_rows(20))
    driver.run(spark, make_config(hash_endpoint, endpoint_key, source, target))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string()),
                             "title": pa.array([], pa.string())}), empty)  # fmt: skip
    config = make_config(hash_endpoint, endpoint_key, str(empty), target, **{"run.prune": True})
    summary = driver.run(spark, config, progress=lambda _: None)
    assert summary.pruned == 20 and read_table(target).num_rows == 0
    driver.run(spark, config, progress=lambda _: None)  # an empty table is still a table
    fresh = make_config(
        hash_endpoint, endpoint_key, write_source(tmp_path, source_rows(5), "f.parquet"), target
    )
    driver.run(spark, fresh, progress=lambda _: None)
    assert set(read_table(target).column("id").to_pylist()) == {f"doc-{i:04d}" for i in range(5)}


def test_new_rows_are_added_without_rewriting_the_table(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    import json as json_

    rows = source_rows(100)
    target = tmp_path / "target"
    driver.run(spark, make_config(hash_endpoint, endpoint_key, write_source(tmp_path, rows), str(target)))
    grown = {k: list(v) for k, v in rows.items()}
    grown["id"] += ["extra-1", "extra-2"]
    grown["text"] += ["one more", "and another"]
    grown["title"] += ["x", "y"]
    config = make_config(hash_endpoint, endpoint_key, write_source(tmp_path, grown, "g.parquet"), str(target))
    driver.run(spark, config, progress=lambda _: None)
    last = sorted((target / "_delta_log").glob("*.json"))[-1]
    actions = [json_.loads(line) for line in last.read_text().splitlines()]
    assert not [a for a in actions if "remove" in a]  # nothing rewritten
    assert sum(1 for a in actions if "add" in a) >= 1
    assert set(read_table(str(target)).column("id").to_pylist()) == set(grown["id"])


def test_error_reasons_group_by_cause_not_by_the_numbers_in_them(spark) -> None:
    errors = [
        "429 quota exhausted: retry-after 167.478 s",
        "429 quota exhausted: retry-after 167.829 s",
        "429 quota exhausted: retry-after 3 s",
        "400 context_length_exceeded: input 0 has 9000 tokens, the maximum is 8191",
        "400 context_length_exceeded: input 3 has 8200 tokens, the maximum is 8191",
        "503 busy",
    ]
    failed = spark.createDataFrame([(e,) for e in errors], "error string")
    counts, examples = driver.error_groups(failed)
    assert counts == {
        "429 quota exhausted: retry-after N s": 3,
        "400 context_length_exceeded: input N has N tokens, the maximum is N": 2,
        "503 busy": 1,
    }
    assert examples["429 quota exhausted: retry-after N s"] == "429 quota exhausted: retry-after 167.478 s"


@pytest.mark.parametrize(
    ("given", "used"),
    [("local", "local[1,4]"), ("local[2]", "local[2,4]"), ("local[*]", "local[*,4]"),
     ("local[2,1]", "local[2,1]"), ("spark://host:7077", "spark://host:7077")],
)  # fmt: skip
def test_a_local_master_retries_tasks_unless_told_otherwise(given: str, used: str) -> None:
    from sparkembed.spark.session import with_task_retries

    assert with_task_retries(given) == used


def test_the_test_session_itself_retries_tasks(spark) -> None:
    assert spark.sparkContext.master == "local[2,4]"


def test_a_long_wave_prints_its_progress_from_the_tasks_spend_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparkembed.core.metrics import Metrics, RequestRecord
    from sparkembed.core.runlog import TaskLog
    from sparkembed.core.waves_plan import WaveLimits, WavePlanner

    monkeypatch.setattr(driver, "PROGRESS_EVERY_S", 0.05)
    config = load_config(None, {"limits.tokens_per_minute": 2_000})
    summary = RunSummary(run_id="r", rows_total=100)
    planner = WavePlanner(100, 5_000, WaveLimits(tokens_per_minute=2_000))
    planner.next_wave()
    lines: list[str] = []
    spent = Metrics()
    for status in (200, 429, 200):
        spent.record(RequestRecord(0.0, 1.0, 20, 600 if status == 200 else 0, status, 1))
    ticker = driver._Ticker(lines.append, str(tmp_path), 0, planner, summary, config, time.monotonic())
    with TaskLog(tmp_path, "w00000-p00000-a0-t1", spent), ticker:
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
    assert lines, "no progress line inside the wave"
    assert lines[0].startswith(f"wave 1/{planner.waves_planned} running: 40 texts answered, 1,200 tokens, ")
    assert "% of quota), 1 answered 429, ETA " in lines[0]


def test_the_source_as_target_is_refused_without_suggesting_overwrite(tmp_path: Path) -> None:
    source = str(tmp_path / "docs")
    config = load_config(None, {"source.path": source, "target.path": source + "/"})
    with pytest.raises(ConfigError, match="is the source table: give another --target") as refused:
        driver.check_target_location(config)
    assert "overwrite" not in str(refused.value)


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = f"""
import os, signal
from sparkembed.spark import driver
with driver._stop_on_signals({str(tmp_path)!r}, print) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM and os.path.exists({str(tmp_path / "STOP")!r})
    print("first signal: still running", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    print("not reached", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stdout == "first signal: still running\n"
    assert "SIGTERM: no new requests" in proc.stderr


def test_moving_a_table_to_the_v1_route_re_embeds_nothing(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = source_rows(300)
    source, target = write_source(tmp_path, rows), str(tmp_path / "target")
    on_models = make_config(
        hash_endpoint, endpoint_key, source, target,
        **{"endpoint.url": f"{hash_endpoint.url}/models", "endpoint.model": "emb-small"},
    )  # fmt: skip
    assert on_models.endpoint.route == "azure-ai-inference"
    driver.run(spark, on_models, progress=lambda _: None)
    hash_endpoint.reset()

    on_v1 = make_config(
        hash_endpoint, endpoint_key, source, target,
        **{"endpoint.url": f"{hash_endpoint.url}/openai/v1", "endpoint.model": "emb-small"},
    )  # fmt: skip
    assert on_v1.endpoint.route == "openai-v1"
    summary = driver.run(spark, on_v1, progress=lambda _: None)

    assert billed_besides_preflight(hash_endpoint) == (0, 0)
    assert summary.rows_total == 0


def test_rows_with_the_fingerprint_older_releases_wrote_are_done(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    from deltalake import write_deltalake

    rows = source_rows(200)
    source, target = write_source(tmp_path, rows), str(tmp_path / "target")
    config = make_config(hash_endpoint, endpoint_key, source, target)
    driver.run(spark, config, progress=lambda _: None)
    # Before 0.2 the route was hashed into the fingerprint: rewrite the table as one of those.
    served = driver.preflight(config)
    old_fingerprint = config.equivalent_fingerprints(served)[1]
    assert old_fingerprint != config.fingerprint(served)
    table = read_table(target)
    column = table.schema.get_field_index("embedding_fingerprint")
    old = table.set_column(column, "embedding_fingerprint", pa.array([old_fingerprint] * len(table)))
    write_deltalake(target, old, mode="overwrite")
    hash_endpoint.reset()

    summary = driver.run(spark, config, progress=lambda _: None)

    assert billed_besides_preflight(hash_endpoint) == (0, 0)
    assert summary.rows_total == 0


def test_pinned_fingerprints_of_tables_written_before_the_route_left_them() -> None:
    """Values computed by release 0.1: a change here would re-embed every existing table."""
    cases = {
        "c17b781e973276ea": {},
        "2975ea0abf14d208": {"endpoint.model": "text-embedding-3-small", "endpoint.dimensions": 256},
        "4a49b6e4f13b9114": {"endpoint.api": "openai-v1", "endpoint.model": "text-embedding-3-small"},
        "f93f46b12471fff7": {"endpoint.url": "local"},
    }
    for fingerprint, overrides in cases.items():
        assert fingerprint in load_config(None, overrides).equivalent_fingerprints(), overrides
    assert load_config(None, {}).fingerprint() == "23a0449c0cdaf917"
    assert load_config(None, {"endpoint.api": "openai-v1"}).fingerprint() == "23a0449c0cdaf917"
