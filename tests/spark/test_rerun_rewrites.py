"""Reruns scale with the change, not the table (issue 18, part 4): a rerun's waves defer their
upserts to the pending table, and one commit rewrites each touched target file once.

Checked on the Delta log itself (adds and removes of every commit), at every committed version
(no reader ever sees two live rows for one (id, chunk_index)), and after a crash mid-rerun.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession
from support import build_config, die_at_wave

from sparkembed.core.engine import PREFLIGHT_TEXT
from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import pending_location, read_table
from sparkembed.spark import driver

pytestmark = [pytest.mark.spark, pytest.mark.integration]

ROWS = 400
CHANGED = 40


@pytest.fixture()
def hash_endpoint(start_endpoint: Any) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", "16")


def texts(changed: set[int] = frozenset(), version: str = "") -> dict[str, list[Any]]:  # type: ignore[assignment]
    ids = [f"doc-{i:04d}" for i in range(ROWS)]
    body = [f"Row {i} tells of item {i * 7}{version if i in changed else ''}." for i in range(ROWS)]
    return {"id": ids, "text": body}


def write_source(tmp_path: Path, rows: dict[str, list[Any]], name: str) -> str:
    path = tmp_path / name
    pq.write_table(pa.table(rows), path)
    return str(path)


def config_for(endpoint: LocalEndpoint, key: str, source: str, target: str, wave_rows: int) -> Any:
    return build_config(sets={
        "endpoint.url": endpoint.url, "source.path": source, "target.path": target,
        "batching.max_inputs": 16, "run.commit_every_rows": wave_rows, "run.dedup": False,
        "run.log_dir": str(Path(target).parent / "runs"),
    }, key=key)  # fmt: skip


def commits(target: str, after: int) -> list[dict[str, list[dict[str, Any]]]]:
    """The adds and removes of each commit after version ``after``."""
    found = []
    for path in sorted((Path(target) / "_delta_log").glob("*.json")):
        if int(path.stem) <= after:
            continue
        actions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        found.append({kind: [a[kind] for a in actions if kind in a] for kind in ("add", "remove")})
    return found


def assert_one_live_row_per_key_at_every_version(target: str) -> None:
    for version in range(DeltaTable(target).version() + 1):
        keys = DeltaTable(target, version=version).to_pyarrow_table(columns=["id", "chunk_index"])
        pairs = list(zip(keys["id"].to_pylist(), keys["chunk_index"].to_pylist(), strict=True))
        assert len(pairs) == len(set(pairs)), f"version {version} shows an (id, chunk_index) twice"


def assert_matches(target: str, source: dict[str, list[Any]]) -> None:
    table = read_table(target)
    hashes = dict(zip(table["id"].to_pylist(), table["text_hash"].to_pylist(), strict=True))
    assert table.num_rows == ROWS and set(table["status"].to_pylist()) == {"ok"}
    wanted = zip(source["id"], source["text"], strict=True)
    assert hashes == {i: hashlib.sha256(t.encode()).hexdigest() for i, t in wanted}


def texts_billed(endpoint: LocalEndpoint) -> int:
    stats = endpoint.stats()
    preflights = stats["billed"].get(hashlib.sha256(PREFLIGHT_TEXT.encode()).hexdigest(), 0)
    return int(stats["texts_billed"] - preflights)


def test_a_rerun_in_many_waves_rewrites_each_touched_file_once(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    target = str(tmp_path / "target")
    first = write_source(tmp_path, texts(), "first.parquet")
    driver.run(spark, config_for(hash_endpoint, endpoint_key, first, target, 50), progress=lambda _: None)
    before = DeltaTable(target)
    files_before = dict(zip(*[pa.table(before.get_add_actions(flatten=True))[c].to_pylist()
                              for c in ("path", "size_bytes")], strict=True))  # fmt: skip
    assert len(files_before) >= 8  # several waves of two tasks each

    changed = set(random.Random(18).sample(range(ROWS), CHANGED))
    rerun_rows = texts(changed, " (revised)")
    rerun = write_source(tmp_path, rerun_rows, "rerun.parquet")
    hash_endpoint.reset()
    config = config_for(hash_endpoint, endpoint_key, rerun, target, 4)
    summary = driver.run(spark, config, progress=lambda _: None)

    assert summary.waves >= 10 and texts_billed(hash_endpoint) == CHANGED
    rerun_commits = commits(target, before.version())
    removed = [r["path"] for c in rerun_commits for r in c["remove"]]
    assert len(rerun_commits) == 1  # the waves went to the pending table; one commit applied them
    assert len(removed) == len(set(removed)) and set(removed) <= set(files_before)
    assert sum(r["size"] for c in rerun_commits for r in c["remove"]) <= sum(files_before.values())
    assert not Path(pending_location(target)).exists()
    assert_one_live_row_per_key_at_every_version(target)
    assert_matches(target, rerun_rows)


def test_a_crash_mid_rerun_then_rerun_pays_nothing_twice(
    spark: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = str(tmp_path / "target")
    first = write_source(tmp_path, texts(), "first.parquet")
    driver.run(spark, config_for(hash_endpoint, endpoint_key, first, target, 100), progress=lambda _: None)
    version_before = DeltaTable(target).version()
    changed = set(random.Random(7).sample(range(ROWS), CHANGED))
    rerun_rows = texts(changed, " (revised)")
    rerun = write_source(tmp_path, rerun_rows, "rerun.parquet")
    config = config_for(hash_endpoint, endpoint_key, rerun, target, 5)

    die_at_wave(monkeypatch, 3)
    hash_endpoint.reset()
    with pytest.raises(KeyboardInterrupt):
        driver.run(spark, config, progress=lambda _: None)
    monkeypatch.undo()
    paid_before_crash = texts_billed(hash_endpoint)
    # The target is as it was; the three committed waves wait in the pending table.
    assert DeltaTable(target).version() == version_before
    pending = read_table(pending_location(target))
    assert pending.num_rows == paid_before_crash > 0

    hash_endpoint.reset()
    driver.run(spark, config, progress=lambda _: None)
    assert texts_billed(hash_endpoint) == CHANGED - paid_before_crash  # nothing paid twice
    assert not Path(pending_location(target)).exists()
    assert_one_live_row_per_key_at_every_version(target)
    assert_matches(target, rerun_rows)
    # The rerun applied the crashed run's rows, then its own: each a single commit.
    assert len(commits(target, version_before)) == 2


def target_scans(spark: SparkSession, target: str, after: int) -> list[tuple[str, int]]:
    """Each scan of ``target``'s files in the Spark queries run since execution id ``after``:
    the columns it read and the rows it output (from Spark's SQL status store; a checkpoint
    or a reused exchange reads no file)."""
    spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty()  # type: ignore[attr-defined]
    store = spark._jsparkSession.sharedState().statusStore()  # type: ignore[attr-defined]
    executions = store.executionsList()
    found = []
    for k in range(executions.size()):
        execution_id = executions.apply(k).executionId()
        if execution_id <= after:
            continue
        values = store.executionMetrics(execution_id)
        nodes = store.planGraph(execution_id).allNodes()
        for node in (nodes.apply(n) for n in range(nodes.size())):
            if node.name().strip() != "Scan parquet" or f"{target}/" not in node.desc():
                continue
            columns = re.search(r"ReadSchema: (struct<[^>]*>)", node.desc())
            metrics = node.metrics()
            rows = next(
                values.get(m.accumulatorId()).get()
                for m in (metrics.apply(i) for i in range(metrics.size()))
                if m.name() == "number of output rows"
            )
            found.append((columns.group(1) if columns else "", int(rows.replace(",", ""))))
    return found


def last_execution(spark: SparkSession) -> int:
    spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty()  # type: ignore[attr-defined]
    executions = spark._jsparkSession.sharedState().statusStore().executionsList()  # type: ignore[attr-defined]
    return max((executions.apply(k).executionId() for k in range(executions.size())), default=-1)


def test_a_rerun_with_nothing_changed_reads_the_target_once(
    spark: SparkSession, start_endpoint: Any, endpoint_key: str, tmp_path: Path
) -> None:
    rows = texts()
    rows["text"][5] = "POISON 5"  # a failed id: the rerun counts it from the same read
    rows["text"][9] = rows["text"][8]  # a copy: dedup's look-up must not read the target again
    source = write_source(tmp_path, rows, "source.parquet")
    target = str(tmp_path / "target")
    faulty = start_endpoint("--model", "hash", "--dims", "16", "--fail-text", "POISON")
    config = config_for(faulty, endpoint_key, source, target, 100).with_overrides({"run.dedup": True})
    driver.run(spark, config, progress=lambda _: None)
    version = DeltaTable(target).version()

    clean = start_endpoint("--model", "hash", "--dims", "16")
    config = config.with_overrides({"endpoint.url": clean.url})
    before = last_execution(spark)
    lines: list[str] = []
    spark.conf.set("spark.sql.maxMetadataStringLength", "10000")  # plans show whole locations
    try:
        summary = driver.run(spark, config, progress=lines.append)
    finally:
        spark.conf.unset("spark.sql.maxMetadataStringLength")

    assert clean.stats(billed=False)["requests"] == 1  # the preflight only
    assert summary.failed_before == 1 and any(line.startswith("1 ids have failed rows") for line in lines)
    assert summary.rows_total == summary.waves == 0 and DeltaTable(target).version() == version
    # Planning reads the target's ids and hashes once; the fingerprint check reads only the
    # fingerprint column, answered from the files' statistics (no row comes out of that scan).
    scans = target_scans(spark, target, before)
    assert [columns for columns, _ in scans if "text_hash" in columns] == [
        "struct<id:string,text_hash:string,status:string,embedding_fingerprint:string>"
    ]
    assert [scan for scan in scans if "text_hash" not in scan[0]] == [
        ("struct<embedding_fingerprint:string>", 0)
    ]
