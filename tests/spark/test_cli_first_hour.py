"""The first hour (issue 17): every mistake a new user makes ends in one line, the README's
exit code and the hint that fixes it, before Spark starts and before anything is paid for.

Each case runs the real CLI in its own process against a real local endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkembed.config import parse_override
from sparkembed.errors import ConfigError
from sparkembed.server.launch import LocalEndpoint

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", "16")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a b", "c d"], "category": ["x", "y"]}), path)
    return path


def sparkembed(cwd: Path, key: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AZURE_INFERENCE_CREDENTIAL": key}
    env.pop("SPARKEMBED_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "sparkembed.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, hint: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(lines) <= 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("sparkembed: error: ") and hint in lines[-1], lines[-1]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["error"]


def test_a_source_that_does_not_exist(endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path) -> None:
    proc = sparkembed(
        tmp_path, endpoint_key, "run", "--source", "nope.parquet", "--target", "./t",
        "--endpoint", endpoint.url,
    )  # fmt: skip
    assert_one_line_error(proc, 2, "source nope.parquet does not exist")
    assert endpoint.stats(billed=False)["requests"] == 0


def test_a_host_that_does_not_exist_fails_at_once_and_masks_nothing(source: Path, tmp_path: Path) -> None:
    proc = sparkembed(
        tmp_path, "k", "run", "--source", str(source), "--target", "./t",
        "--endpoint", "https://nope-sparkembed.invalid/models",
    )  # fmt: skip
    hint = "cannot connect to host nope-sparkembed.invalid port 443: not found (DNS): check endpoint.url"
    assert_one_line_error(proc, 2, hint)
    assert "***" not in proc.stderr  # the key was "k": no word with a k in it got masked
    assert "API key is only 1 characters long" in proc.stderr


def test_a_wrong_key_is_reported_by_the_preflight_before_spark_starts(
    endpoint: LocalEndpoint, source: Path, tmp_path: Path
) -> None:
    proc = sparkembed(
        tmp_path, "wrong-key-0123456789", "run", "--source", str(source), "--target", "./t",
        "--endpoint", endpoint.url,
    )  # fmt: skip
    assert_one_line_error(proc, 2, "401 error: ")
    assert "check the API key in $AZURE_INFERENCE_CREDENTIAL" in proc.stderr
    assert "401 401" not in proc.stderr
    assert "SparkContext" not in proc.stderr and "log4j" not in proc.stderr  # Spark never started


def test_a_wrong_route_names_the_url_to_check(
    endpoint: LocalEndpoint, endpoint_key: str, source: Path, tmp_path: Path
) -> None:
    proc = sparkembed(
        tmp_path, endpoint_key, "run", "--source", str(source), "--target", "./t",
        "--endpoint", f"{endpoint.url}/wrong/route",
    )  # fmt: skip
    assert_one_line_error(proc, 2, "404 ")
    fix = "Fix: check endpoint.url (the v1 route: https://<resource>.openai.azure.com/openai/v1)"
    assert fix in proc.stderr


def test_a_folder_of_other_files_as_target(
    endpoint: LocalEndpoint, endpoint_key: str, source: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.txt").write_text("mine")
    (folder / "docs.csv").write_text("a,b")
    proc = sparkembed(
        tmp_path, endpoint_key, "run", "--source", str(source), "--target", str(folder),
        "--endpoint", endpoint.url,
    )  # fmt: skip
    assert_one_line_error(proc, 2, "is not a Delta table (docs.csv, readme.txt)")
    assert sorted(p.name for p in folder.iterdir()) == ["docs.csv", "readme.txt"]


def test_a_bare_folder_name_as_target_is_refused_before_the_preflight(
    endpoint: LocalEndpoint, endpoint_key: str, source: Path, tmp_path: Path
) -> None:
    endpoint.reset()
    proc = sparkembed(
        tmp_path, endpoint_key, "run", "--source", str(source), "--target", "tgt", "--endpoint", endpoint.url
    )  # fmt: skip
    assert_one_line_error(proc, 2, "give a path, e.g. --target ./tgt")
    assert endpoint.stats(billed=False)["requests"] == 0


def test_a_config_key_typo_gets_the_key_it_meant(source: Path, tmp_path: Path) -> None:
    proc = sparkembed(
        tmp_path, "key-0123456789abcdef", "run", "--source", str(source), "--target", "./t",
        "--endpoint", "local", "--set", "limits.tokens_per_minut=5",
    )  # fmt: skip
    assert_one_line_error(proc, 2, "did you mean 'limits.tokens_per_minute'?")


def test_values_mean_what_was_typed() -> None:
    assert parse_override("endpoint.api_version=2024-10-21") == ("endpoint.api_version", "2024-10-21")
    assert parse_override("source.passthrough=category") == ("source.passthrough", ("category",))
    assert parse_override("source.passthrough=a, b") == ("source.passthrough", ("a", "b"))
    assert parse_override("source.passthrough=[a]") == ("source.passthrough", ["a"])
    assert parse_override("endpoint.model='007'") == ("endpoint.model", "007")
    assert parse_override("limits.concurrency=8") == ("limits.concurrency", 8)
    assert parse_override("run.max_failed_fraction=0.1") == ("run.max_failed_fraction", 0.1)
    with pytest.raises(ConfigError, match="did you mean 'limits.tokens_per_minute'"):
        parse_override("tokens_per_minute=5")


def test_help_lists_every_command_and_the_exit_codes(tmp_path: Path) -> None:
    top = sparkembed(tmp_path, "", "--help")
    assert top.returncode == 0
    for command in ("run", "estimate", "serve", "report", "cache-tokenizer"):
        assert f"\n  {command} " in top.stdout
    run = sparkembed(tmp_path, "", "run", "--help")
    assert "130  stopped by Ctrl-C" in run.stdout and "--passthrough" in run.stdout
    estimate = sparkembed(tmp_path, "", "estimate", "--help")
    assert "one preflight request, nothing embedded" in estimate.stdout
    assert "Embed a table into Delta" not in estimate.stdout


@pytest.mark.spark
@pytest.mark.slow
def test_passthrough_flag_and_a_date_like_api_version_run_and_stay_quiet(
    endpoint: LocalEndpoint, endpoint_key: str, source: Path, tmp_path: Path
) -> None:
    proc = sparkembed(
        tmp_path, endpoint_key, "run", "--source", str(source), "--target", "./t", "--endpoint", endpoint.url,
        "--passthrough", "category", "--set", "endpoint.api_version=2024-10-21",
        "--set", f"run.log_dir={tmp_path / 'runs'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rows_ok"] == 2
    # azure-core's request dumps stay off at INFO; so does py4j's shutdown notice.
    assert "Request headers:" not in proc.stderr and "REDACTED" not in proc.stderr
    assert "clientserver" not in proc.stderr
    from sparkembed.sinks import read_table

    assert read_table(str(tmp_path / "t")).column("category").to_pylist() in (["x", "y"], ["y", "x"])
