"""The shared embedding cache (issue 18, part 2) on real Spark, the local endpoint's accounting
and real Delta: a text is paid for once across runs and tables that share ``cache.path``."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from pyspark.sql import SparkSession
from support import sha256_hex
from test_dedup import DIMS, LONG, make_config, sharing_rows, write_source
from test_spark_job import billed_besides_preflight

from sparkembed import cli, sinks
from sparkembed.core.tokenizers import counter_for
from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import read_table
from sparkembed.spark import cache, driver, writers
from sparkembed.spark.estimate import estimate

QUIET = {"progress": lambda _: None}


@pytest.fixture()
def endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", str(DIMS), "--fail-text", "POISON")


def rows_of(prefix: str, texts: list[str]) -> dict[str, list[Any]]:
    return {"id": [f"{prefix}{i:03d}" for i in range(len(texts))], "text": texts, "title": ["t"] * len(texts)}


def cached(endpoint: LocalEndpoint, key: str, tmp_path: Path, source: str, target: str, **sets: Any) -> Any:
    cache = str(tmp_path / "cache")
    return make_config(endpoint, key, source, str(tmp_path / target), **{"cache.path": cache, **sets})


def test_two_targets_sharing_half_their_texts_bill_the_shared_half_once(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    shared = [f"Shared text {i} about {i % 7}." for i in range(20)]
    shared[3] = LONG  # cached as all its chunks
    only_a = [f"Only in A {i}." for i in range(18)] + ["POISON text", "  "]  # a failure and a blank
    only_b = [f"Only in B {i}." for i in range(20)]
    source_a = write_source(tmp_path, rows_of("a", shared + only_a), "a.parquet")
    source_b = write_source(tmp_path, rows_of("b", only_b + shared), "b.parquet")

    first = driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source_a, "a"), **QUIET)
    table_a = read_table(str(tmp_path / "a")).to_pandas()
    chunks = int((table_a["text_hash"] == sha256_hex(LONG)).sum())
    assert chunks > 1 and billed_besides_preflight(endpoint)[0] == 20 - 1 + chunks + 18

    # The cache holds only ok vectors: every chunk of the long text, no failure, no blank.
    store = read_table(str(tmp_path / "cache")).to_pandas()
    ok_a = table_a[table_a["status"] == "ok"]
    assert len(store) == len(ok_a) == first.cache_added and store["embedding"].notna().all()
    assert set(store["text_hash"]) == set(ok_a["text_hash"]) and sha256_hex("POISON text") not in set(
        store["text_hash"]
    )
    assert (store["chunks"][store["text_hash"] == sha256_hex(LONG)] == chunks).all()
    assert (store["run_id"] == first.run_id).all() and int(store["tokens"].sum()) == int(
        ok_a["prompt_tokens"].sum()
    )

    # Another table over half the same texts: the estimate and the run pay for the other half only.
    config_b = cached(endpoint, endpoint_key, tmp_path, source_b, "b")
    endpoint.reset()
    guess = estimate(spark, config_b)
    assert guess["rows_from_cache"] == 20 and guess["rows_to_embed"] == 40
    endpoint.reset()
    second = driver.run(spark, config_b, **QUIET)
    texts, tokens = billed_besides_preflight(endpoint)
    counter = counter_for(config_b)
    assert texts == 20 and guess["inputs_to_send"] == 20
    assert guess["estimated_tokens"] == sum(counter.count(text) for text in only_b)
    table_b = read_table(str(tmp_path / "b")).to_pandas()
    assert int(table_b["prompt_tokens"].sum()) == tokens == second.counts["prompt_tokens"]  # sums to the bill
    hits = table_b[table_b["cached_from"].notna()]
    assert set(hits["text_hash"]) == {sha256_hex(t) for t in shared} and len(hits) == 19 + chunks
    assert (hits["cached_from"] == first.run_id).all() and (hits["prompt_tokens"] == 0).all()
    assert (hits["status"] == "ok").all() and hits["dedup_of"].isna().all() and second.from_cache == len(hits)
    by_chunk = table_a.set_index(["text_hash", "chunk_index"])["embedding"]
    for row in hits.itertuples():
        np.testing.assert_array_equal(row.embedding, by_chunk[(row.text_hash, row.chunk_index)])
    assert not table_b.duplicated(["id", "chunk_index"]).any() and set(table_b["id"]) == set(
        rows_of("b", only_b + shared)["id"]
    )


def test_a_text_whose_chunks_were_copied_in_its_task_is_cached_whole(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = sharing_rows()  # r03 and r07: two long texts sharing chunks, in one task
    source = write_source(tmp_path, rows)
    one_task = {"run.partitions": 1, "run.commit_every_rows": 1000}
    driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "a", **one_task), **QUIET)
    table_a = read_table(str(tmp_path / "a")).to_pandas()
    of_b = table_a[table_a["id"] == "r07"]
    assert of_b["dedup_of"].notna().any() and of_b["dedup_of"].isna().any()  # some chunks copied

    # The cache holds r07 with every chunk, the copied ones too: another table pays nothing.
    store = read_table(str(tmp_path / "cache")).to_pandas()
    assert (store["text_hash"] == of_b["text_hash"].iloc[0]).sum() == len(of_b)
    endpoint.reset()
    driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "b", **one_task), **QUIET)
    assert billed_besides_preflight(endpoint) == (0, 0)
    table_b = read_table(str(tmp_path / "b")).to_pandas().set_index(["id", "chunk_index"]).sort_index()
    assert len(table_b) == len(table_a) and table_b["cached_from"].notna().all()
    for row in table_a.itertuples():
        np.testing.assert_array_equal(table_b.loc[(row.id, row.chunk_index), "embedding"], row.embedding)


def test_a_crash_mid_wave_then_reruns_with_the_cache_bill_nothing_already_embedded(
    spark: SparkSession,
    endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = [f"Crash text {i} on {i % 11}." for i in range(120)]
    source = write_source(tmp_path, rows_of("r", texts))
    real_commit = writers.DeltaRsSink._commit

    def die_in_wave_two(self, files, schema, config, run_id, version, replacing):  # type: ignore[no-untyped-def]
        if version == 2:  # the wave's requests were answered (and billed); the driver dies
            raise KeyboardInterrupt("driver killed")
        return real_commit(self, files, schema, config, run_id, version, replacing)

    monkeypatch.setattr(writers.DeltaRsSink, "_commit", die_in_wave_two)
    with pytest.raises(KeyboardInterrupt):
        driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "a"), **QUIET)
    monkeypatch.undo()
    done = read_table(str(tmp_path / "a")).to_pandas()
    store = read_table(str(tmp_path / "cache")).to_pandas()
    assert 0 < len(done) < 120 and set(store["text_hash"]) == set(done["text_hash"])  # waves 0 and 1

    # Another table over the same texts pays only for what no finished wave embedded...
    endpoint.reset()
    driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "b"), **QUIET)
    billed = endpoint.stats()["billed"]
    assert billed_besides_preflight(endpoint)[0] == 120 - len(done)
    assert not any(billed.get(h) for h in done["text_hash"])
    # ...and the crashed run's rerun pays for nothing at all.
    endpoint.reset()
    driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "a"), **QUIET)
    assert billed_besides_preflight(endpoint) == (0, 0)
    assert read_table(str(tmp_path / "a")).num_rows == 120
    assert read_table(str(tmp_path / "cache")).to_pandas()["text_hash"].nunique() == 120


def test_a_crash_between_a_wave_commit_and_its_cache_append_is_added_by_the_next_run(
    spark: SparkSession,
    endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts = [f"Gap text {i} on {i % 13}." for i in range(100)]
    texts[90], texts[91], texts[92] = LONG, "POISON gap text", "  "  # never cached: a failure, a blank
    source = write_source(tmp_path, rows_of("g", texts))
    real_add = cache.add_wave
    sent: list[int] = []  # rows of each wave

    def die_before_the_last_append(spark, config, context, wave, ids):  # type: ignore[no-untyped-def]
        sent.append(len(texts) if ids is None else ids.count())
        if sum(sent) == len(texts):  # the last wave is in the target; the driver dies
            raise KeyboardInterrupt("driver killed")
        return real_add(spark, config, context, wave, ids)

    monkeypatch.setattr(cache, "add_wave", die_before_the_last_append)
    with pytest.raises(KeyboardInterrupt):
        driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "a"), **QUIET)
    monkeypatch.undo()
    table_a = read_table(str(tmp_path / "a")).to_pandas()
    ok_a = table_a[table_a["status"] == "ok"]
    left_out = set(ok_a["text_hash"]) - set(read_table(str(tmp_path / "cache")).to_pandas()["text_hash"])
    assert set(table_a["id"]) == set(rows_of("g", texts)["id"]) and left_out  # the last wave's texts

    # The rerun of A pays for nothing and adds what the crash left out, each entry once...
    endpoint.reset()
    rerun = driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "a"), **QUIET)
    assert billed_besides_preflight(endpoint) == (0, 0) and rerun.cache_added > 0
    store = read_table(str(tmp_path / "cache")).to_pandas()
    assert len(store) == len(ok_a) and set(store["text_hash"]) == set(ok_a["text_hash"])
    assert not store.duplicated(["text_hash", "chunk_index"]).any() and store["embedding"].notna().all()
    chunks = int((ok_a["text_hash"] == sha256_hex(LONG)).sum())
    assert chunks > 1 and (store["chunks"][store["text_hash"] == sha256_hex(LONG)] == chunks).all()
    # ...and only once: the next rerun finds nothing left to add.
    again = driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "a"), **QUIET)
    assert again.cache_added == 0 and read_table(str(tmp_path / "cache")).num_rows == len(store)

    # Another table over the same texts bills nothing: every ok row comes from the cache.
    endpoint.reset()
    driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "b"), **QUIET)
    assert billed_besides_preflight(endpoint) == (0, 0)
    table_b = read_table(str(tmp_path / "b")).to_pandas()
    ok_b = table_b[table_b["status"] == "ok"]
    assert len(ok_b) == len(ok_a) and set(ok_b["cached_from"]) == set(ok_a["run_id"])
    assert (ok_b["prompt_tokens"] == 0).all()


def test_concurrent_runs_on_one_cache_lose_nothing(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    sources = {
        name: write_source(
            tmp_path, rows_of(name, [f"{name} text {i}." for i in range(60)]), f"{name}.parquet"
        )
        for name in ("x", "y")
    }
    errors: list[BaseException] = []

    def embed(name: str) -> None:
        try:
            config = cached(
                endpoint, endpoint_key, tmp_path, sources[name], name, **{"run.commit_every_rows": 20}
            )
            driver.run(spark, config, **QUIET)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=embed, args=(name,)) for name in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    store = read_table(str(tmp_path / "cache")).to_pandas()
    want = {sha256_hex(f"{name} text {i}.") for name in sources for i in range(60)}
    assert set(store["text_hash"]) == want and len(store) == 120


def test_appends_racing_on_one_cache_all_land(tmp_path: Path) -> None:
    path = str(tmp_path / "cache")
    errors: list[BaseException] = []

    def append(k: int) -> None:
        try:
            files = write_entries(path, entries(f"writer {k}", 5), k)
            sinks.create_cache(path)
            sinks.append_to_cache(path, files, app_id=f"run-{k}", version=0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and read_table(path).num_rows == 30


def write_entries(path: str, rows: pa.Table, writer: int) -> list[sinks.FileMeta]:
    """Parquet files of cache rows under ``path``, named as a run's (uncommitted)."""
    prefix = f"part-20261203T000000Z-0000000{writer}-cache-w00000-p0-a0"
    return sinks.write_part(path, rows, schema=sinks.CACHE_SCHEMA, file_prefix=prefix)


def entries(label: str, n: int, created_at: datetime | None = None) -> pa.Table:
    """``n`` cache rows, one whole text each."""
    when = created_at or datetime.now(timezone.utc)
    return pa.table(
        {
            "fingerprint": ["fp"] * n,
            "text_hash": [sha256_hex(f"{label} {i}") for i in range(n)],
            "chunk_index": pa.array([0] * n, pa.int32()),
            "chunk_start": pa.nulls(n, pa.int32()),
            "chunk_end": pa.nulls(n, pa.int32()),
            "chunks": pa.array([1] * n, pa.int32()),
            "embedding": pa.array([[0.5, 0.5]] * n, pa.list_(pa.float32())),
            "model": ["m"] * n,
            "tokens": pa.array([3] * n, pa.int64()),
            "run_id": [label] * n,
            "created_at": pa.array([when] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=sinks.CACHE_SCHEMA,
    )


def test_vacuum_deletes_entries_older_than_the_age_and_refuses_other_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "cache")
    sinks.create_cache(path)
    now = datetime.now(timezone.utc)
    for version, (label, age) in enumerate((("old", 100), ("recent", 30))):
        files = write_entries(path, entries(label, 4, now - timedelta(days=age)), version)
        sinks.append_to_cache(path, files, app_id=label, version=0)
    (tmp_path / "cache" / "notes.txt").write_text("not the cache's")

    assert cli.main(["cache", "vacuum", "--older-than", "90d", "--path", path]) == 0
    assert '"rows_deleted": 4' in capsys.readouterr().out
    left = read_table(path).to_pandas()
    assert set(left["run_id"]) == {"recent"} and len(left) == 4
    # Files the log marks removed go once past the retention; a file Delta does not know, never.
    removed = sinks.vacuum_cache(path, timedelta(days=90), retention_hours=0).files_removed
    assert len(removed) == 1 and (tmp_path / "cache" / "notes.txt").exists()
    assert read_table(path).num_rows == 4

    other = str(tmp_path / "vectors")
    write_deltalake(other, pa.table({"id": ["a"], "created_at": [now]}))
    assert cli.main(["cache", "vacuum", "--older-than", "1s", "--path", other]) == 2
    assert "not a sparkembed cache" in capsys.readouterr().err and read_table(other).num_rows == 1
    assert cli.main(["cache", "vacuum", "--older-than", "soon", "--path", path]) == 2


def test_a_rerun_that_changes_texts_adds_the_new_texts_to_the_cache(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    """Upsert waves wait in the pending table until the run's end: the cache still gets them."""
    texts = [f"Rerun text {i}." for i in range(30)]
    source = write_source(tmp_path, rows_of("r", texts), "r.parquet")
    driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "r"), **QUIET)
    changed = texts[:]
    for i in range(0, 30, 3):
        changed[i] = f"Rewritten text {i}."
    source = write_source(tmp_path, rows_of("r", changed), "r.parquet")
    endpoint.reset()
    rerun = driver.run(spark, cached(endpoint, endpoint_key, tmp_path, source, "r"), **QUIET)
    assert billed_besides_preflight(endpoint)[0] == 10 and rerun.cache_added == 10
    store = read_table(str(tmp_path / "cache")).to_pandas()
    assert set(store["text_hash"]) == {sha256_hex(t) for t in texts + changed}
    assert not Path(sinks.pending_location(str(tmp_path / "r"))).exists()
