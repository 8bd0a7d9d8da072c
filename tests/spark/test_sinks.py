"""Delta sinks: executors write parquet parts, the driver commits once, plain deltalake reads."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, QueryBuilder

from sparkembed.sinks import (
    ABSENT,
    ConcurrentWriteError,
    FileMeta,
    TargetSchemaError,
    commit_files,
    read_table,
    table_version,
    upsert_files,
    vacuum_after_run,
    vacuum_orphans,
    write_part,
)
from sparkembed.sinks.files import foreign_entries
from sparkembed.spark.delta_native import merge_source, native_available, write_native

DIMS = 4
T0 = dt.datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("chunk_index", pa.int32()),
        ("text_hash", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("dimensions", pa.int32()),
        ("model", pa.string()),
        ("input_type", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("request_id", pa.string()),
        ("run_id", pa.string()),
        ("embedded_at", pa.timestamp("us", tz="UTC")),
        ("embedding_fingerprint", pa.string()),
        ("chunk_start", pa.int32()),
        ("chunk_end", pa.int32()),
        ("title", pa.string()),
    ]
)


def vector(key: int, chunk: int, text: str) -> np.ndarray:
    """Awkward float32 values: thirds, a subnormal, negative zero, large magnitudes."""
    values = np.array([1 / 3, 1e-40, -0.0, 1e37], dtype=np.float32) * np.float32(key + 1)
    values[0] += np.float32(chunk + len(text))
    return values


def rows(keys: list[tuple[int, int]], text: str = "v1", run_id: str = "run1") -> pa.Table:
    """Output rows for (id, chunk_index) pairs; ``text`` stands for the source text."""
    n = len(keys)
    return pa.table(
        {
            "id": [k for k, _ in keys],
            "chunk_index": [c for _, c in keys],
            "text_hash": [f"{text}-{k}" for k, _ in keys],
            "embedding": pa.array([vector(k, c, text) for k, c in keys], pa.list_(pa.float32())),
            "dimensions": [DIMS] * n,
            "model": ["hash"] * n,
            "input_type": ["document"] * n,
            "prompt_tokens": [3] * n,
            "total_tokens": [3] * n,
            "status": ["ok"] * n,
            "error": [None] * n,
            "attempts": [1] * n,
            "request_id": [f"req-{k}" for k, _ in keys],
            "run_id": [run_id] * n,
            "embedded_at": [T0] * n,
            "embedding_fingerprint": ["fp1"] * n,
            "chunk_start": [c * 10 for _, c in keys],
            "chunk_end": [c * 10 + 10 for _, c in keys],
            "title": [f"title {k}" for k, _ in keys],
        },
        schema=SCHEMA,
    )


def snapshot(uri: str, version: int | None = None) -> list[dict]:
    """The table's rows, sorted by (id, chunk_index), read by deltalake's own (Rust) reader."""
    query = QueryBuilder().register("t", DeltaTable(uri, version=version)).execute("SELECT * FROM t")
    return sorted(pa.table(query.read_all()).to_pylist(), key=lambda r: (r["id"], r["chunk_index"]))


def keys_of(uri: str) -> list[tuple[int, int, str]]:
    return [(r["id"], r["chunk_index"], r["text_hash"]) for r in snapshot(uri)]


def write(uri: str, table: pa.Table, prefix: str, **kwargs) -> list[FileMeta]:
    return write_part(uri, table.to_batches(max_chunksize=2), schema=SCHEMA, file_prefix=prefix, **kwargs)


def commit(uri: str, keys: list[tuple[int, int]], app_id: str, version: int, **kwargs) -> int:
    """Write rows for ``keys`` and append them as (app_id, version)."""
    metas = write(uri, rows(keys), f"{app_id}-{version}")
    return commit_files(uri, metas, schema=SCHEMA, mode="append", app_id=app_id, version=version, **kwargs)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return str(tmp_path / "target")


def test_parts_commit_as_one_version_and_read_back_exactly(uri: str) -> None:
    data = rows([(k, 0) for k in range(7)])
    metas = write(uri, data, "app-w0-p0-a0", max_rows_per_file=3)

    version = commit_files(uri, metas, schema=SCHEMA, mode="append", app_id="app", version=0)

    assert version == 0
    assert [m.num_records for m in metas] == [3, 3, 1]
    table = DeltaTable(uri)
    assert sorted(os.path.basename(p) for p in table.file_uris()) == sorted(m.path for m in metas)
    assert table.transaction_version("app") == 0
    assert snapshot(uri) == data.to_pylist()
    assert pa.schema(table.schema().to_arrow()).field("embedding").type == pa.list_(pa.float32())


def test_embedding_survives_bit_exact(uri: str) -> None:
    data = rows([(1, 0), (2, 0), (2, 1)])
    commit_files(uri, write(uri, data, "p"), schema=SCHEMA, mode="append", app_id="a", version=0)

    got = read_table(uri).sort_by([("id", "ascending"), ("chunk_index", "ascending")])

    for row, (key, chunk) in zip(got.to_pylist(), [(1, 0), (2, 0), (2, 1)], strict=True):
        stored = np.array(row["embedding"], dtype=np.float32)
        assert stored.tobytes() == vector(key, chunk, "v1").tobytes()


def test_file_stats_bound_ids_and_round_timestamps_outward(uri: str) -> None:
    metas = write(uri, rows([(5, 0), (9, 1)]), "p")

    stats = json.loads(metas[0].stats or "")

    assert stats["numRecords"] == 2
    assert (stats["minValues"]["id"], stats["maxValues"]["id"]) == (5, 9)
    assert stats["minValues"]["embedded_at"] == "2025-05-01T12:00:00.123Z"
    assert stats["maxValues"]["embedded_at"] == "2025-05-01T12:00:00.124Z"
    assert stats["nullCount"]["error"] == 2
    assert "embedding" not in stats["nullCount"]


def test_recommitting_the_same_txn_adds_nothing(uri: str) -> None:
    data = rows([(1, 0), (2, 0)])
    commit_files(uri, write(uri, data, "p"), schema=SCHEMA, mode="append", app_id="a", version=0)
    again = write(uri, data, "p")  # a retried wave writes fresh files

    version = commit_files(uri, again, schema=SCHEMA, mode="append", app_id="a", version=0)

    assert version == 0
    assert len(snapshot(uri)) == 2
    nxt = commit_files(uri, again, schema=SCHEMA, mode="append", app_id="a", version=1)
    assert (nxt, len(snapshot(uri))) == (1, 4)


def test_overwrite_replaces_every_row(uri: str) -> None:
    commit(uri, [(1, 0), (2, 0)], "a", 0)

    metas = write(uri, rows([(3, 0)], text="v2"), "q")
    version = commit_files(uri, metas, schema=SCHEMA, mode="overwrite", app_id="b", version=0)

    assert version == 1
    assert keys_of(uri) == [(3, 0, "v2-3")]


def test_append_with_other_columns_is_refused(uri: str) -> None:
    commit(uri, [(1, 0)], "a", 0)
    wider = SCHEMA.append(pa.field("extra", pa.string()))
    metas = write_part(
        uri, rows([(2, 0)]).append_column("extra", pa.array(["x"])), schema=wider, file_prefix="w"
    )

    with pytest.raises(TargetSchemaError, match="extra"):
        commit_files(uri, metas, schema=wider, mode="append", app_id="a", version=1)
    assert keys_of(uri) == [(1, 0, "v1-1")]


def test_upsert_replaces_ids_drops_stale_chunks_in_one_commit(uri: str) -> None:
    # File A holds ids 1 (three chunks) and 2; file B holds id 3 only.
    first = write(uri, rows([(1, 0), (1, 1), (1, 2), (2, 0)]), "a", max_rows_per_file=10)
    first += write(uri, rows([(3, 0), (3, 1)]), "b", max_rows_per_file=10)
    commit_files(uri, first, schema=SCHEMA, mode="append", app_id="run", version=0)

    # Id 1's text changed and now has two chunks; id 4 is new.
    new = write(uri, rows([(1, 0), (1, 1), (4, 0)], text="v2"), "c")
    version = upsert_files(uri, new, schema=SCHEMA, id_col="id", app_id="run", version=1)

    assert version == 1
    assert keys_of(uri) == [
        (1, 0, "v2-1"),
        (1, 1, "v2-1"),
        (2, 0, "v1-2"),
        (3, 0, "v1-3"),
        (3, 1, "v1-3"),
        (4, 0, "v2-4"),
    ]
    files = {os.path.basename(p) for p in DeltaTable(uri).file_uris()}
    assert first[1].path in files  # B held no updated id: untouched
    assert first[0].path not in files  # A was rewritten without id 1
    assert len(snapshot(uri, version=0)) == 6  # old snapshot intact


def test_upsert_retry_is_a_no_op_and_missing_table_is_created(uri: str) -> None:
    new = write(uri, rows([(1, 0), (1, 1)]), "p")
    assert upsert_files(uri, new, schema=SCHEMA, id_col="id", app_id="a", version=0) == 0

    again = upsert_files(uri, new, schema=SCHEMA, id_col="id", app_id="a", version=0)

    assert again == 0
    assert keys_of(uri) == [(1, 0, "v1-1"), (1, 1, "v1-1")]


def test_upsert_with_string_ids_skips_files_outside_the_id_range(uri: str) -> None:
    schema = pa.schema([("doc", pa.string()), ("chunk_index", pa.int32()), ("text_hash", pa.string())])

    def part(docs: list[tuple[str, int]], text: str, prefix: str) -> list[FileMeta]:
        table = pa.table(
            {
                "doc": [d for d, _ in docs],
                "chunk_index": [c for _, c in docs],
                "text_hash": [text] * len(docs),
            },
            schema=schema,
        )
        return write_part(uri, table, schema=schema, file_prefix=prefix)

    low, high = part([("a", 0), ("b", 0), ("b", 1)], "old", "lo"), part([("x", 0)], "old", "hi")
    commit_files(uri, low + high, schema=schema, mode="append", app_id="s", version=0)

    upsert_files(uri, part([("b", 0)], "new", "up"), schema=schema, id_col="doc", app_id="s", version=1)

    got = (
        QueryBuilder()
        .register("t", DeltaTable(uri))
        .execute("SELECT doc, chunk_index, text_hash FROM t ORDER BY doc, chunk_index")
    )
    assert pa.table(got.read_all()).to_pylist() == [
        {"doc": "a", "chunk_index": 0, "text_hash": "old"},
        {"doc": "b", "chunk_index": 0, "text_hash": "new"},
        {"doc": "x", "chunk_index": 0, "text_hash": "old"},
    ]
    files = {os.path.basename(p) for p in DeltaTable(uri).file_uris()}
    assert high[0].path in files and low[0].path not in files


def test_orphan_files_are_invisible_and_vacuumed(uri: str) -> None:
    committed = write(uri, rows([(1, 0)]), "run7-w0-p0-a0")
    orphan = write(uri, rows([(1, 0)]), "run7-w0-p0-a1")  # failed attempt of the same task
    other_run = write(uri, rows([(9, 0)]), "run8-w0-p0-a0")
    commit_files(uri, committed, schema=SCHEMA, mode="append", app_id="run7", version=0)
    new = write(uri, rows([(1, 0)], text="v2"), "run7-w1-p0-a0")
    upsert_files(uri, new, schema=SCHEMA, id_col="id", app_id="run7", version=1)
    assert keys_of(uri) == [(1, 0, "v2-1")]

    removed = vacuum_orphans(uri, prefix="run7-")

    assert removed == [orphan[0].path]
    on_disk = set(os.listdir(uri))
    assert committed[0].path in on_disk  # removed by the upsert, but still in the log
    assert other_run[0].path in on_disk
    assert len(snapshot(uri, version=0)) == 1
    # Once a checkpoint replaces the log, files of the current snapshot are still spared.
    DeltaTable(uri).create_checkpoint()
    for name in os.listdir(os.path.join(uri, "_delta_log")):
        if name.endswith(".json"):
            os.remove(os.path.join(uri, "_delta_log", name))
    assert vacuum_orphans(uri, prefix="run7-") == [committed[0].path]
    assert keys_of(uri) == [(1, 0, "v2-1")]


def race_two_runs(uri: str, wave: int) -> tuple[int, dict[str, object]]:
    """Runs A and B commit ``wave`` at the same moment, both expecting the current version."""
    base = table_version(uri)
    parts = {run: write(uri, rows([(10 + wave, 0)], run_id=run), run) for run in ("runA", "runB")}
    barrier = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def commit(run: str) -> None:
        barrier.wait()
        try:
            outcome[run] = commit_files(
                uri, parts[run], schema=SCHEMA, mode="append", app_id=run, version=wave,
                expected_version=base,
            )  # fmt: skip
        except ConcurrentWriteError as exc:
            outcome[run] = exc

    threads = [threading.Thread(target=commit, args=(run,)) for run in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return base, outcome


def test_concurrent_runs_one_commit_wins_the_other_fails_cleanly(uri: str) -> None:
    commit(uri, [(0, 0)], "seed", 0)
    for wave in range(3):
        base, outcome = race_two_runs(uri, wave)

        winners = [run for run, result in outcome.items() if result == base + 1]
        losers = [run for run, r in outcome.items() if isinstance(r, ConcurrentWriteError)]
        assert len(winners) == 1 and len(losers) == 1, outcome
        assert table_version(uri) == base + 1
        landed = [r["run_id"] for r in snapshot(uri) if r["id"] == 10 + wave]
        assert landed == winners


def test_two_runs_creating_the_same_table_one_wins_the_other_fails_cleanly(tmp_path: Path) -> None:
    # Both find no table; the loser learns it either from delta-rs's own check or at the commit
    # of version 0 (each about half of the time here): both must read as a lost race.
    for attempt in range(12):
        uri = str(tmp_path / f"target-{attempt}")
        base, outcome = race_two_runs(uri, 0)
        assert base == ABSENT
        winners = [run for run, result in outcome.items() if result == 0]
        losers = [run for run, r in outcome.items() if isinstance(r, ConcurrentWriteError)]
        assert len(winners) == 1 and len(losers) == 1, outcome
        assert [r["run_id"] for r in snapshot(uri)] == winners


def test_stale_expected_version_is_refused_but_a_done_txn_is_not(uri: str) -> None:
    v0 = commit(uri, [(1, 0)], "a", 0, expected_version=ABSENT)
    commit(uri, [(2, 0)], "other", 0)

    with pytest.raises(ConcurrentWriteError, match="expected 0"):
        commit(uri, [(3, 0)], "a", 1, expected_version=v0)
    with pytest.raises(ConcurrentWriteError, match="no table"):
        commit(uri + "2", [(3, 0)], "a", 0, expected_version=3)
    assert commit(uri, [(1, 0)], "a", 0, expected_version=v0) == 1  # done before: no-op
    assert [k for k, _, _ in keys_of(uri)] == [1, 2]


def test_without_expected_version_blind_appends_both_land(uri: str) -> None:
    commit(uri, [(1, 0)], "a", 0)
    stale = DeltaTable(uri)
    commit(uri, [(2, 0)], "b", 0)

    assert stale.version() == 0
    assert commit(uri, [(3, 0)], "c", 0) == 2
    assert [k for k, _, _ in keys_of(uri)] == [1, 2, 3]


def test_write_part_edges(uri: str) -> None:
    assert write_part(uri, iter([]), schema=SCHEMA, file_prefix="p") == []
    with pytest.raises(ValueError, match="file_prefix"):
        write_part(uri, rows([(1, 0)]), schema=SCHEMA, file_prefix="bad/name")
    with pytest.raises(ValueError, match="title"):
        write_part(uri, rows([(1, 0)]).drop_columns(["title"]), schema=SCHEMA, file_prefix="p")
    metas = write(uri, rows([(k, 0) for k in range(9)]), "p", row_group_rows=4)
    # Input batches of 2 rows are coalesced into row groups of 4.
    parquet = pq.ParquetFile(os.path.join(uri, metas[0].path))
    row_groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert row_groups == [4, 4, 1]


@pytest.mark.spark
def test_spark_reads_the_delta_rs_files(spark, uri: str) -> None:
    data = rows([(1, 0), (1, 1), (2, 0)])
    commit_files(uri, write(uri, data, "p"), schema=SCHEMA, mode="append", app_id="a", version=0)

    df = spark.read.parquet(*DeltaTable(uri).file_uris())
    got = sorted(df.collect(), key=lambda r: (r["id"], r["chunk_index"]))

    assert dict(df.dtypes)["embedding"] == "array<float>"
    assert dict(df.dtypes)["embedded_at"] == "timestamp"
    assert [(r["id"], r["chunk_index"], r["embedding"]) for r in got] == [
        (r["id"], r["chunk_index"], r["embedding"]) for r in data.to_pylist()
    ]
    assert got[0]["embedded_at"].astimezone(dt.timezone.utc) == T0


@pytest.mark.spark
def test_native_merge_source_marks_stale_chunks_for_delete(spark) -> None:
    ddl = "id long, chunk_index int, h string"
    target = spark.createDataFrame([(1, 0, "old"), (1, 1, "old"), (1, 2, "old"), (2, 0, "old")], ddl)
    new = spark.createDataFrame([(1, 0, "new"), (1, 1, "new"), (3, 0, "new")], ddl)

    got = merge_source(target, new, "id").collect()

    assert sorted((r["id"], r["chunk_index"], r["h"], r["_sparkembed_op"]) for r in got) == [
        (1, 0, "new", "upsert"),
        (1, 1, "new", "upsert"),
        (1, 2, None, "delete"),
        (3, 0, "new", "upsert"),
    ]


@pytest.mark.spark
def test_native_sink_round_trips_with_delta_rs(spark, uri: str) -> None:
    if not native_available(spark):
        pytest.skip(
            "native Delta sink not tested: io.delta.tables.DeltaTable is not on this session's "
            "classpath (no Maven here). Set SPARKEMBED_DELTA_JARS=/path/delta-spark.jar,"
            "/path/delta-storage.jar to run it."
        )
    ddl = ", ".join(f"`{f.name}` {_spark_type(f.type)}" for f in SCHEMA)
    first = spark.createDataFrame(rows([(1, 0), (1, 1), (2, 0)]).to_pandas(), ddl)
    write_native(first, uri, mode="append", id_col="id", app_id="n", version=0)
    write_native(first, uri, mode="append", id_col="id", app_id="n", version=0)  # retry
    assert len(snapshot(uri)) == 3  # plain deltalake reads the native table

    second = spark.createDataFrame(rows([(1, 0)], text="v2").to_pandas(), ddl)
    write_native(second, uri, mode="upsert", id_col="id", app_id="n", version=1)
    assert keys_of(uri) == [(1, 0, "v2-1"), (2, 0, "v1-2")]

    rs_uri = uri + "-rs"
    commit(rs_uri, [(5, 0)], "a", 0)
    assert [r["id"] for r in spark.read.format("delta").load(rs_uri).collect()] == [5]


def _spark_type(t: pa.DataType) -> str:
    names = {pa.int64(): "bigint", pa.int32(): "int", pa.string(): "string"}
    if pa.types.is_list(t):
        return "array<float>"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return names[t]


RUN = "20261203T101500Z-0a1b2c3d"
OTHER_RUN = "20261101T080000Z-9f8e7d6c"
DAY = 86_400


def age(path: Path, days: float) -> None:
    then = dt.datetime.now().timestamp() - days * DAY
    os.utime(path, (then, then))


def foreign_files(folder: Path) -> dict[str, bytes]:
    """Files someone else put there: Spark-style parts and notes, of every age."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for days in (0, 3, 8, 400):
        for name in (f"part-0000{days % 10}-{days}d-c000.snappy.parquet", f"notes-{days}d.txt"):
            (folder / name).write_bytes(f"theirs {name}".encode())
            age(folder / name, days)
            made[name] = (folder / name).read_bytes()
    return made


def test_a_run_vacuums_only_files_sparkembed_wrote_and_never_foreign_ones(uri: str) -> None:
    committed = write(uri, rows([(1, 0)]), f"part-{RUN}-w00000-p00000-a0")
    commit_files(uri, committed, schema=SCHEMA, mode="append", app_id=RUN, version=0)
    failed_attempt = write(uri, rows([(1, 0)]), f"part-{RUN}-w00000-p00000-a1")
    crashed_old = write(uri, rows([(2, 0)]), f"part-{OTHER_RUN}-w00003-p00001-a0")
    crashed_recent = write(uri, rows([(3, 0)]), f"part-{OTHER_RUN}-w00004-p00001-a0")
    age(Path(uri) / crashed_old[0].path, 8)
    age(Path(uri) / crashed_recent[0].path, 6)  # may be a concurrent run about to commit
    theirs = foreign_files(Path(uri))

    removed = vacuum_after_run(uri, RUN)

    assert removed == sorted([failed_attempt[0].path, crashed_old[0].path])
    assert {name: (Path(uri) / name).read_bytes() for name in theirs} == theirs
    assert (Path(uri) / crashed_recent[0].path).exists() and (Path(uri) / committed[0].path).exists()
    assert keys_of(uri) == [(1, 0, "v1-1")]


def test_a_folder_that_is_not_a_delta_table_is_foreign_unless_empty_or_only_ours(tmp_path: Path) -> None:
    assert foreign_entries(str(tmp_path / "new")) == []
    (tmp_path / "empty").mkdir()
    assert foreign_entries(str(tmp_path / "empty")) == []
    ours = write(str(tmp_path / "crashed"), rows([(1, 0)]), f"part-{RUN}-w00000-p00000-a0")
    assert foreign_entries(str(tmp_path / "crashed")) == []  # a first wave that never committed
    (tmp_path / "file.parquet").write_bytes(b"x")
    assert foreign_entries(str(tmp_path / "file.parquet")) == ["file.parquet"]
    theirs = foreign_files(tmp_path / "crashed")
    assert foreign_entries(str(tmp_path / "crashed")) == sorted(theirs)
    assert ours[0].path not in foreign_entries(str(tmp_path / "crashed"))


def test_a_delta_table_holding_foreign_files_is_still_a_delta_table(uri: str) -> None:
    commit(uri, [(1, 0)], RUN, 0)
    foreign_files(Path(uri))
    assert foreign_entries(uri) == []


def test_apply_pending_replaces_ids_once_and_a_second_apply_after_a_crash_only_drops(
    uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparkembed.sinks import apply_pending, pending_location
    from sparkembed.sinks import pending as pending_module

    first = write_part(uri, rows([(1, 0), (1, 1), (2, 0), (3, 0)]), schema=SCHEMA, file_prefix="t")
    commit_files(uri, first, schema=SCHEMA, mode="append", app_id="r", version=0)
    pending = pending_location(uri)
    for wave, keys in enumerate([[(1, 0)], [(3, 0), (3, 1)]]):  # id 1 lost a chunk, id 3 gained one
        prefix = f"part-{RUN}-w{wave:05d}-p00000-a0"  # a run's name: the drop removes it
        files = write_part(pending, rows(keys, "v2"), schema=SCHEMA, file_prefix=prefix)
        commit_files(pending, files, schema=SCHEMA, mode="append", app_id="r2", version=wave)

    def crash(_: str) -> list[str]:
        raise KeyboardInterrupt("killed after the apply's commit")

    monkeypatch.setattr(pending_module, "drop_staging", crash)
    with pytest.raises(KeyboardInterrupt):
        apply_pending(uri, id_col="id", run_id="r3", expected_version=0)
    monkeypatch.undo()
    assert table_version(uri) == 1  # one commit: adds, rewrites and removes together
    assert apply_pending(uri, id_col="id", run_id="r3") == 1  # already applied: only the drop
    assert table_version(uri) == 1 and not os.path.exists(pending)
    got = read_table(uri).sort_by([("id", "ascending"), ("chunk_index", "ascending")])
    keys = got.select(["id", "chunk_index", "text_hash"]).to_pylist()
    want = [(1, 0, "v2-1"), (2, 0, "v1-2"), (3, 0, "v2-3"), (3, 1, "v2-3")]  # 1's chunk 1 is gone
    assert [tuple(k.values()) for k in keys] == want
    assert apply_pending(uri, id_col="id", run_id="r4") is None  # nothing pending
