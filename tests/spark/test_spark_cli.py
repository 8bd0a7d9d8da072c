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
from spark_cluster import python_workers, standalone_cluster

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
    assert codes == [0, 2], [(code, out.strip().splitlines()[-1:]) for code, out in outcomes]
    loser = next(out for code, out in outcomes if code == 2)
    last = json.loads(loser.strip().splitlines()[-1])
    assert last["error_type"] == "ConcurrentWriteError"
    # The loser says what it spent, the wave it could not commit included.
    assert last["tokens_billed"] > last["tokens_in_table"]

    rows = read_table(str(target)).to_pandas()
    assert not rows.duplicated(["id", "chunk_index"]).any()
    assert len(rows) == 600  # the winner committed everything


def test_quota_exhausted_with_stop_ends_the_run_with_a_clear_error(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    # No quota headers: the pacer cannot learn the limit and wait it out; the 429 tells.
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--tpm", "60", "--no-quota-headers")
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


# -- fault injection: never destroy, never strand paid work (issue 13) ----------------


def preflight_tokens(endpoint: LocalEndpoint, key: str) -> int:
    """What one preflight bills, asked of the endpoint itself."""
    import urllib.request

    body = json.dumps({"input": ["sparkembed preflight"]}).encode()
    request = urllib.request.Request(
        f"{endpoint.url}/embeddings", data=body, headers={"api-key": key, "content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read())["usage"]["prompt_tokens"])


def start_run(args: list[str], key: str) -> subprocess.Popen[str]:
    """The CLI in its own session, as a terminal would start it: a signal to the group reaches
    the driver, its JVM and Spark's Python workers, like Ctrl-C."""
    env = {**os.environ, "AZURE_INFERENCE_CREDENTIAL": key}
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for_billed(endpoint: LocalEndpoint, driver: subprocess.Popen[str], texts: int) -> None:
    deadline = time.monotonic() + 240
    while endpoint.stats(billed=False)["texts_billed"] < texts:
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def billed_twice(endpoint: LocalEndpoint) -> int:
    """Texts the endpoint billed more than once, the preflight's text left out."""
    return sum(1 for n in endpoint.stats()["billed"].values() if n > 1) - 1


SLOW = ("--model", "hash", "--dims", str(DIMS), "--latency-ms", "400")
SMALL_REQUESTS = ("--set", "batching.max_inputs=10", "--set", "limits.concurrency=1")


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-in-a-terminal", "sigterm-from-a-scheduler"],
)
def test_a_signal_mid_wave_commits_every_answered_row_and_the_rerun_bills_none_again(
    start_endpoint, endpoint_key: str, tmp_path: Path, signum: int, to_group: bool
) -> None:
    endpoint = start_endpoint(*SLOW)
    per_preflight = preflight_tokens(endpoint, endpoint_key)
    endpoint.reset()
    source = write_source(tmp_path / "src.parquet", 600)  # one wave of 60 slow requests
    target = tmp_path / "target"
    args = cli(endpoint, endpoint_key, source, target, *SMALL_REQUESTS)
    driver = start_run(args, endpoint_key)
    wait_for_billed(endpoint, driver, 1 + 100)
    (os.killpg if to_group else os.kill)(driver.pid, signum)
    out, err = driver.communicate(timeout=180)

    assert driver.returncode == 128 + signum, err[-3000:]
    assert "rerun the same command to continue" in err.splitlines()[-1]
    assert "Traceback" not in err and "reentrant call" not in err
    # Only sparkembed's lines reach the terminal: the preflight, the stop, the result.
    assert len([line for line in err.splitlines() if line.strip()]) <= 3, err
    assert "WARN" in (target.parent / "runs" / "spark.log").read_text()  # Spark's own, kept
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "signal"
    stats = endpoint.stats()
    table = read_table(str(target)).to_pandas()
    ok = table[table["status"] == "ok"]
    # Every text the endpoint answered is in the table: nothing paid was thrown away.
    assert 100 <= len(ok) == stats["texts_billed"] - 1 < 598
    assert summary["tokens_billed"] == summary["tokens_in_table"] == stats["prompt_tokens"] - per_preflight
    assert int(ok["prompt_tokens"].sum()) == summary["tokens_in_table"]

    rerun = run_cli(args, endpoint_key)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert billed_twice(endpoint) == 0
    assert summary_of(rerun)["rows_ok"] == 598 - len(ok)
    assert len(read_table(str(target))) == 600


def test_a_killed_python_worker_is_retried_and_what_it_spent_is_reported(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    endpoint = start_endpoint(*SLOW)
    per_preflight = preflight_tokens(endpoint, endpoint_key)
    endpoint.reset()
    source = write_source(tmp_path / "src.parquet", 600)
    target = tmp_path / "target"
    driver = start_run(cli(endpoint, endpoint_key, source, target, *SMALL_REQUESTS), endpoint_key)
    wait_for_billed(endpoint, driver, 1 + 100)  # both tasks of the one wave are mid-way
    workers = python_workers(driver.pid)
    assert workers, "no Python worker found"
    os.kill(workers[0], signal.SIGKILL)
    out, err = driver.communicate(timeout=300)

    assert driver.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["rows_ok"], summary["rows_skipped"], summary["rows_failed"]) == (598, 2, 0)
    assert len(read_table(str(target))) == 600
    # The retry reuses what the killed attempt was answered: only the request that was on the
    # wire (concurrency 1, 10 inputs) can be paid twice.
    assert billed_twice(endpoint) <= 10
    assert summary["tokens_reused"] > 0  # the kill came mid-task: its answers were reused
    table = read_table(str(target)).to_pandas()
    assert summary["tokens_in_table"] == int(table["prompt_tokens"].sum())
    # The summary counts what the endpoint billed, short at most of that one answer.
    billed = endpoint.stats(billed=False)["prompt_tokens"] - per_preflight
    one_request = 10 * 14  # 10 inputs of at most 14 tokens
    assert billed - one_request <= summary["tokens_billed"] <= billed
    assert summary["tokens_billed"] >= summary["tokens_in_table"]


def test_a_folder_that_is_not_a_delta_table_is_refused_before_anything_is_sent(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS))
    source = write_source(tmp_path / "src.parquet", 20)
    target = tmp_path / "docs"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    old_part = target / "part-00000-1b2c3d4e-c000.snappy.parquet"
    pq.write_table(pa.table({"x": [1]}), old_part)
    three_days_ago = time.time() - 3 * 86_400
    os.utime(old_part, (three_days_ago, three_days_ago))

    proc = run_cli(cli(endpoint, endpoint_key, source, target), endpoint_key)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not a Delta table" in summary_of(proc)["error"]
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", old_part.name]
    assert old_part.stat().st_mtime == pytest.approx(three_days_ago)
    assert endpoint.stats(billed=False)["requests"] == 0  # not even the preflight


def test_failed_rows_left_from_before_can_fail_a_rerun_and_foreign_files_stay(
    start_endpoint, endpoint_key: str, tmp_path: Path
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", str(DIMS), "--fail-text", "subject 7.")
    source = write_source(tmp_path / "src.parquet", 100)
    target = tmp_path / "target"
    args = cli(endpoint, endpoint_key, source, target)
    first = run_cli(args, endpoint_key)
    assert first.returncode == 1, first.stderr[-3000:]
    failed = summary_of(first)["rows_failed"]
    assert failed == sum(1 for i in range(2, 100) if i % 13 == 7)
    [reason] = summary_of(first)["top_errors"]  # one cause, one key
    # Someone else's files in the table's folder, of every age: never ours to delete.
    theirs = {}
    for days in (0, 3, 8, 400):
        path = target / f"part-0000{days % 10}-{days}d-c000.snappy.parquet"
        path.write_bytes(b"theirs")
        os.utime(path, (time.time() - days * 86_400,) * 2)
        theirs[path.name] = path.stat().st_mtime

    plain = run_cli(args, endpoint_key)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert f"{failed} ids have failed rows from earlier runs" in plain.stdout
    strict = run_cli([*args, "--fail-on-existing-failures"], endpoint_key)
    assert strict.returncode == 1, strict.stderr[-3000:]
    assert "--retry-failed" in strict.stderr.strip().splitlines()[-1]
    assert summary_of(strict)["failed_before"] == failed
    assert {name: (target / name).stat().st_mtime for name in theirs} == theirs
