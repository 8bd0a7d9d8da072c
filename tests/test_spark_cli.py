"""The CLI as users run it, in its own driver process: a standalone cluster, a driver
killed mid-run, and two runs racing on one target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from spark_cluster import standalone_cluster

from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import read_table

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]

DIMS = 32


def write_source(path: Path, n: int) -> str:
    texts: list[str | None] = [f"Row {i}: a sentence about subject {i % 13}." for i in range(n)]
    texts[0], texts[1] = None, " "
    pq.write_table(pa.table({"id": list(range(n)), "text": texts}), path)
    return str(path)


def cli(endpoint: LocalEndpoint, key: str, source: str, target: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sparkembed.cli", "run",
        "--source", source, "--target", str(target), "--endpoint", endpoint.url,
        "--set", f"run.log_dir={target.parent / 'runs'}",
        "--set", "batching.max_inputs=50",
        *extra,
    ]  # fmt: skip


def run_cli(args: list[str], key: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AZURE_INFERENCE_CREDENTIAL": key}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table_rows(target: Path) -> dict[tuple[int, int], tuple[str, str, bytes]]:
    t = read_table(str(target)).to_pylist()
    return {
        (r["id"], r["chunk_index"]): (
            r["status"],
            r["text_hash"],
            np.asarray(r["embedding"] or [], dtype=np.float32).tobytes(),
        )
        for r in t
    }


def test_cli_on_a_standalone_cluster(start_endpoint, endpoint_key: str, tmp_path: Path) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS))
    source = write_source(tmp_path / "src.parquet", 500)
    target = tmp_path / "target"
    with standalone_cluster(tmp_path / "cluster") as master:
        proc = run_cli(
            cli(endpoint, endpoint_key, source, target, "--set", f"run.spark_master={master}"), endpoint_key
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert summary["rows_ok"] == 498 and summary["rows_skipped"] == 2 and summary["rows_failed"] == 0
    rows = table_rows(target)
    assert len(rows) == 500
    stats = endpoint.stats()
    assert stats["texts_billed"] == 498 + 1  # and the preflight
    # One client per executor Python worker (2 cores, concurrency 8), plus the driver's preflight.
    assert stats["connections"] <= 2 * 8 + 1
    # Executors ran in the worker's own JVM, with Python workers there.
    assert list((tmp_path / "cluster" / "work").glob("app-*/*/stderr"))


def test_driver_killed_mid_run_then_rerun_equals_a_clean_run(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--latency-ms", "150")
    wave_rows = 200
    source = write_source(tmp_path / "src.parquet", 1200)
    target = tmp_path / "target"
    args = cli(
        endpoint, endpoint_key, source, target,
        "--set", f"run.commit_every_rows={wave_rows}", "--set", "limits.concurrency=1",
    )  # fmt: skip
    env = {**os.environ, "AZURE_INFERENCE_CREDENTIAL": endpoint_key}
    driver = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = target / "_delta_log"
    deadline = time.monotonic() + 240
    while not (log.exists() and len(list(log.glob("*.json"))) >= 2):  # two waves committed
        assert driver.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its JVM, at once
    driver.wait()
    committed = len(read_table(str(target)))
    assert 0 < committed < 1200

    rerun = run_cli(args, endpoint_key)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    billed = Counter(endpoint.stats()["billed"])

    clean_target = tmp_path / "clean"
    clean = run_cli(cli(endpoint, endpoint_key, source, clean_target), endpoint_key)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert table_rows(target) == table_rows(clean_target)

    twice = sum(1 for text_hash, n in billed.items() if n > 1) - 1  # minus the preflight text
    assert twice <= wave_rows, f"{twice} texts billed twice; one wave is {wave_rows}"


def test_concurrent_runs_on_one_target_fail_cleanly(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--latency-ms", "200")
    source = write_source(tmp_path / "src.parquet", 600)
    target = tmp_path / "target"
    args = cli(
        endpoint, endpoint_key, source, target,
        "--set", "run.commit_every_rows=200", "--set", "limits.concurrency=1",
    )  # fmt: skip
    env = {**os.environ, "AZURE_INFERENCE_CREDENTIAL": endpoint_key}
    runs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in "ab"
    ]
    outcomes = [(p.wait(timeout=300), p.stdout.read() if p.stdout else "") for p in runs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(out for code, out in outcomes if code == 2)
    assert "ConcurrentWriteError" in loser.strip().splitlines()[-1]

    rows = read_table(str(target)).to_pandas()
    assert not rows.duplicated(["id", "chunk_index"]).any()
    assert len(rows) == 600  # the winner committed everything


def test_quota_exhausted_with_stop_ends_the_run_with_a_clear_error(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--tpm", "60")
    source = write_source(tmp_path / "src.parquet", 50)
    args = cli(
        endpoint, endpoint_key, source, tmp_path / "target",
        "--set", "retry.on_quota_exhausted=stop", "--set", "retry.max_wait_s=1",
    )  # fmt: skip
    proc = run_cli(args, endpoint_key)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = summary_of(proc)
    assert last["error_type"] == "QuotaExhaustedError"
    assert "retry.max_wait_s" in str(last["error"]) or "quota" in str(last["error"]).lower()
