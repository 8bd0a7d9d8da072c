"""Model migrations (issue 19): a new fingerprint is built in a staging table beside the target
and switched in one Delta commit; readers of the target never see two vector spaces.

Real Spark (local[2]), the real local endpoint over HTTP, real Delta through delta-rs.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import SparkSession
from support import build_config, die_at_wave

from sparkembed import cli
from sparkembed.config import EmbedConfig
from sparkembed.core.engine import PREFLIGHT_TEXT
from sparkembed.core.neighbours import neighbour_agreement
from sparkembed.errors import ConfigError
from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import migration_status, read_table, staging_location
from sparkembed.spark import driver, migration

pytestmark = [pytest.mark.spark, pytest.mark.integration]

OLD_DIMS, NEW_DIMS = 64, 32
ROWS = 600


def write_source(tmp_path: Path, n: int = ROWS) -> str:
    texts: list[str | None] = [f"Document {i} is about topic {i % 17} and item {i * 7}." for i in range(n)]
    texts[1] = None
    path = tmp_path / "source.parquet"
    pq.write_table(pa.table({"id": [f"doc-{i:04d}" for i in range(n)], "text": texts}), path)
    return str(path)


def make_config(endpoint: LocalEndpoint, key: str, source: str, target: str, **sets: Any) -> EmbedConfig:
    overrides = {
        "endpoint.url": endpoint.url,
        "source.path": source,
        "target.path": target,
        "batching.max_inputs": 50,
        "limits.concurrency": 4,
        "run.commit_every_rows": 150,
        "run.log_dir": str(Path(target).parent / "runs"),
        **sets,
    }
    return build_config(sets=overrides, key=key)


def migrating(endpoint: LocalEndpoint, key: str, source: str, target: str, **sets: Any) -> EmbedConfig:
    """The migration: a new ``dimensions``, allowed by ``--reembed-all``."""
    return make_config(
        endpoint, key, source, target, **{"endpoint.dimensions": NEW_DIMS, "run.reembed_all": True, **sets}
    )


def billed_texts(endpoint: LocalEndpoint) -> Counter[str]:
    """Times each text was billed since the last reset, the preflight's text left out."""
    billed = Counter(endpoint.stats()["billed"])
    billed.pop(hashlib.sha256(PREFLIGHT_TEXT.encode()).hexdigest(), None)
    return billed


def read_version(target: str, version: int) -> pa.Table:
    """One version of the target, as a reader with time travel sees it."""
    fs = pafs.SubTreeFileSystem(target, pafs.LocalFileSystem())
    table = DeltaTable(target, version=version)
    return table.to_pyarrow_table(columns=["id", "dimensions", "embedding_fingerprint"], filesystem=fs)


@pytest.fixture()
def hash_endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", str(OLD_DIMS))


@pytest.fixture()
def old_target(spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path) -> str:
    """A target embedded at the old dimensions; the endpoint's stats reset afterwards."""
    target = str(tmp_path / "target")
    config = make_config(hash_endpoint, endpoint_key, write_source(tmp_path), target)
    driver.run(spark, config, progress=lambda _: None)
    hash_endpoint.reset()
    return target


def test_a_migration_killed_midway_leaves_the_target_whole_and_its_rerun_switches_once(
    spark: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    old_target: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, source = old_target, str(tmp_path / "source.parquet")
    before = read_table(target).sort_by([("id", "ascending"), ("chunk_index", "ascending")])
    version_before = DeltaTable(target).version()
    with pytest.raises(ConfigError, match="--reembed-all"):  # a new fingerprint still needs the flag
        driver.run(spark, make_config(hash_endpoint, endpoint_key, source, target, **{
            "endpoint.dimensions": NEW_DIMS}), progress=lambda _: None)  # fmt: skip

    # The migration's driver dies after its second wave is committed (to staging).
    die_at_wave(monkeypatch, 2)
    config = migrating(hash_endpoint, endpoint_key, source, target)
    with pytest.raises(KeyboardInterrupt):
        driver.run(spark, config, progress=lambda _: None)
    monkeypatch.undo()

    # The target is untouched: same version, same rows, one fingerprint, the old vectors.
    assert DeltaTable(target).version() == version_before
    assert read_table(target).sort_by([("id", "ascending"), ("chunk_index", "ascending")]).equals(before)
    staging = staging_location(target)
    staged = read_table(staging).to_pandas()
    assert 0 < staged["id"].nunique() < ROWS and set(staged["dimensions"].dropna()) == {NEW_DIMS}
    status = migration_status(target)
    assert status is not None and status.ids_done == staged["id"].nunique() and status.source_rows == ROWS
    assert status.prompt_tokens == int(staged["prompt_tokens"].sum()) > 0
    assert status.cost_usd == round(status.prompt_tokens * 0.02 / 1e6, 6)

    # The rerun resumes the staging table and switches in one commit.
    lines: list[str] = []
    summary = driver.run(spark, config, progress=lines.append)
    assert summary.migration is not None and summary.migration["state"] == "switched"
    assert summary.migration["target_version"] == version_before + 1 == DeltaTable(target).version()
    after = read_table(target).to_pandas()
    assert after["embedding_fingerprint"].nunique() == 1
    assert set(after["dimensions"].dropna()) == {NEW_DIMS}
    assert (
        set(after["id"]) == set(before["id"].to_pylist())
        and not after.duplicated(["id", "chunk_index"]).any()
    )
    # No text was billed twice: the wave in flight never started, the rerun skipped staged rows.
    billed = billed_texts(hash_endpoint)
    assert max(billed.values()) == 1
    assert sum(billed.values()) == int((after["status"] == "ok").sum()) == ROWS - 1
    assert summary.counts["ok_rows"] == ROWS - 1 - int((staged["status"] == "ok").sum())
    # The staging table is gone; the old vectors stay in the target's history.
    assert not Path(staging).exists()
    old = read_version(target, version_before)
    assert set(old["dimensions"].to_pylist()) - {None} == {OLD_DIMS} and len(old) == len(before)
    # A rerun is an ordinary one: nothing to do, nothing billed.
    hash_endpoint.reset()
    driver.run(spark, config, progress=lambda _: None)
    assert sum(billed_texts(hash_endpoint).values()) == 0


def test_a_reader_polling_the_target_never_sees_two_fingerprints_or_a_missing_id(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path, old_target: str
) -> None:
    target, source = old_target, str(tmp_path / "source.parquet")
    ids = set(read_table(target).column("id").to_pylist())
    first = DeltaTable(target).version()
    seen: dict[int, tuple[str, ...]] = {}
    reads = 0
    errors: list[BaseException] = []
    done = threading.Event()

    def check(version: int) -> None:
        table = read_version(target, version)
        fingerprints = tuple(sorted(set(table.column("embedding_fingerprint").to_pylist())))
        assert len(fingerprints) == 1, f"version {version} holds fingerprints {fingerprints}"
        assert set(table.column("id").to_pylist()) == ids, f"version {version} misses ids"
        seen[version] = fingerprints

    def poll() -> None:
        nonlocal reads
        try:
            while not done.is_set():
                latest = DeltaTable(target).version()
                for version in range(first, latest + 1):
                    check(version)  # every version, again and again, while the migration runs
                reads += 1
                time.sleep(0.02)
        except BaseException as exc:  # surfaced in the test's thread
            errors.append(exc)

    reader = threading.Thread(target=poll, name="target-reader")
    reader.start()
    try:
        summary = driver.run(spark, migrating(hash_endpoint, endpoint_key, source, target), progress=print)
    finally:
        done.set()
        reader.join(timeout=60)
    assert not errors, errors[0]
    assert summary.waves >= 4 and summary.migration is not None and summary.migration["state"] == "switched"
    last = DeltaTable(target).version()
    for version in range(first, last + 1):  # and once more after the end: the whole history
        check(version)
    assert reads > 10
    assert last == first + 1  # the migration made one commit on the target: the switch
    assert seen[first] != seen[last]


def test_check_sample_and_no_switch_hold_a_complete_staging_table_for_a_later_switch(
    spark: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    old_target: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target, source = old_target, str(tmp_path / "source.parquet")
    version = DeltaTable(target).version()
    held = migrating(
        hash_endpoint, endpoint_key, source, target, **{"run.switch": False, "run.check_sample": 40}
    )
    lines: list[str] = []
    summary = driver.run(spark, held, progress=lines.append)
    assert summary.migration is not None and summary.migration["state"] == "held"
    check = summary.migration["check"]
    assert (
        check["sample"] == 40
        and check["k"] == 10
        and 0 <= check["min_agreement"] <= check["mean_agreement"] <= 1
    )
    assert any(line.startswith("check-sample: 40 ids, top-10") for line in lines)
    assert DeltaTable(target).version() == version  # held: the target is as it was

    assert cli.main(["migrate", "status", target]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("migration pending: ") and "ids done: 600 of 600 (100.0 %)" in out[1]
    status = json.loads(out[-1])
    assert status["pending"] and status["ids_done"] == 600 and status["prompt_tokens"] > 0
    assert status["cost_usd"] > 0 and status["eta_seconds"] is not None

    # The later run switches without embedding anything: staging is complete.
    hash_endpoint.reset()
    summary = driver.run(
        spark, migrating(hash_endpoint, endpoint_key, source, target), progress=lambda _: None
    )
    assert summary.migration is not None and summary.migration["state"] == "switched"
    assert sum(billed_texts(hash_endpoint).values()) == 0
    assert set(read_table(target).column("dimensions").to_pylist()) - {None} == {NEW_DIMS}
    assert cli.main(["migrate", "status", target]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"pending": False}


def test_abort_drops_the_staging_table_but_never_a_foreign_file(
    spark: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    old_target: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target, source = old_target, str(tmp_path / "source.parquet")
    before = read_table(target)
    driver.run(
        spark, migrating(hash_endpoint, endpoint_key, source, target, **{"run.switch": False}),
        progress=lambda _: None,
    )  # fmt: skip
    staging = Path(staging_location(target))
    (staging / "notes.txt").write_text("someone else's file")

    assert cli.main(["migrate", "abort", target]) == 0
    assert "kept 1 entries sparkembed did not write: notes.txt" in capsys.readouterr().out
    assert sorted(p.name for p in staging.iterdir()) == ["notes.txt"]
    assert read_table(target).equals(before)
    assert cli.main(["migrate", "status", target]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"pending": False}


def test_failed_rows_hold_the_switch_unless_max_failed_fraction_allows_them(
    spark: SparkSession, hash_endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = {"id": ["a", "b", "c", "d"], "text": ["one", "two", "three", " ".join(["word"] * 9000)]}
    source = tmp_path / "source.parquet"
    pq.write_table(pa.table(rows), source)
    target = str(tmp_path / "target")
    driver.run(spark, make_config(hash_endpoint, endpoint_key, str(source), target), progress=lambda _: None)
    version = DeltaTable(target).version()

    # The new long-text strategy fails the long text instead of chunking it.
    failing = migrating(hash_endpoint, endpoint_key, str(source), target, **{"long_text.strategy": "fail"})
    summary = driver.run(spark, failing, progress=lambda _: None)
    assert summary.migration is not None and summary.migration["state"] == "failed_rows"
    assert DeltaTable(target).version() == version

    allowed = failing.with_overrides({"run.max_failed_fraction": 0.25})
    summary = driver.run(spark, allowed, progress=lambda _: None)
    assert summary.migration is not None and summary.migration["state"] == "switched"
    table = read_table(target).to_pandas().set_index("id")
    assert table.loc["d", "status"] == "failed" and table["embedding_fingerprint"].nunique() == 1


def test_neighbour_agreement_is_one_for_a_rotation_and_low_for_unrelated_vectors() -> None:
    rng = np.random.default_rng(7)
    old = rng.normal(size=(200, 16))
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert neighbour_agreement(old, old @ rotation).mean == 1.0  # cosine neighbourhoods survive a rotation
    unrelated = neighbour_agreement(old, rng.normal(size=(200, 8)))
    assert unrelated.k == 10 and unrelated.mean < 0.2
    assert neighbour_agreement(old[:3], old[:3] * 2).k == 2  # capped at the sample size - 1


def test_a_run_stopped_between_the_switch_and_the_drop_leaves_staging_that_the_next_run_drops(
    spark: SparkSession,
    hash_endpoint: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    old_target: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, source = old_target, str(tmp_path / "source.parquet")
    config = migrating(hash_endpoint, endpoint_key, source, target)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt("driver killed")

    monkeypatch.setattr(migration, "drop", killed)
    with pytest.raises(KeyboardInterrupt):
        driver.run(spark, config, progress=lambda _: None)
    monkeypatch.undo()
    switched = DeltaTable(target).version()
    assert set(read_table(target).column("dimensions").to_pylist()) - {None} == {NEW_DIMS}
    assert Path(staging_location(target)).exists()

    hash_endpoint.reset()
    summary = driver.run(spark, config, progress=lambda _: None)
    assert summary.migration is None and summary.counts["ok_rows"] == 0
    assert not Path(staging_location(target)).exists()
    history = DeltaTable(target).history()
    overwrites = [c for c in history if c.get("operationParameters", {}).get("mode") == "Overwrite"]
    assert len(overwrites) == 1 and overwrites[0]["version"] == switched  # switched once, not twice
    assert sum(billed_texts(hash_endpoint).values()) == 0


@pytest.mark.slow
def test_the_cli_killed_mid_migration_leaves_the_target_whole_and_the_rerun_pays_one_wave_again_at_most(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys

    endpoint = start_endpoint("--model", "hash", "--dims", str(OLD_DIMS), "--latency-ms", "100")
    source, target = write_source(tmp_path), tmp_path / "target"
    wave_rows = 100
    base = [
        sys.executable, "-m", "sparkembed.cli", "run", "--source", source, "--target", str(target),
        "--endpoint", endpoint.url, "--set", f"run.log_dir={tmp_path / 'runs'}",
        "--set", "batching.max_inputs=20", "--set", "limits.concurrency=1",
        "--set", f"run.commit_every_rows={wave_rows}",
    ]  # fmt: skip
    env = {**os.environ, "AZURE_INFERENCE_CREDENTIAL": endpoint_key}
    first = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = read_table(str(target)).sort_by([("id", "ascending")])
    endpoint.reset()

    args = [*base, "--reembed-all", "--set", f"endpoint.dimensions={NEW_DIMS}"]
    run = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = Path(staging_location(str(target))) / "_delta_log"
    deadline = time.monotonic() + 240
    while not (log.exists() and len(list(log.glob("*.json"))) >= 2):  # two waves in staging
        assert run.poll() is None, "the migration ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGKILL)  # the driver and its JVM, at once
    run.wait()
    assert read_table(str(target)).sort_by([("id", "ascending")]).equals(before)

    status = subprocess.run(
        [sys.executable, "-m", "sparkembed.cli", "migrate", "status", str(target)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0 and json.loads(status.stdout.splitlines()[-1])["pending"]

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.splitlines()[-1])["migration"]["state"] == "switched"
    after = read_table(str(target)).to_pandas()
    assert after["embedding_fingerprint"].nunique() == 1 and set(after["dimensions"].dropna()) == {NEW_DIMS}
    assert set(after["id"]) == set(before.column("id").to_pylist())
    billed = billed_texts(endpoint)
    assert sum(1 for n in billed.values() if n > 1) <= wave_rows  # only the wave in flight paid twice
    assert len(billed) == ROWS - 1  # every text was paid for, none left out
