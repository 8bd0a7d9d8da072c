"""The README stays true: every config key is documented, CI runs its test command, and its
notebook snippet runs as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkembed.config import EmbedConfig
from sparkembed.sinks import read_table

ROOT = Path(__file__).resolve().parents[2]


def config_keys() -> list[str]:
    keys = []
    for section, field in EmbedConfig.model_fields.items():
        for name in field.annotation.model_fields:  # type: ignore[union-attr]
            if (section, name) != ("auth", "key"):  # never set by users
                keys.append(f"{section}.{name}")
    return keys


def test_every_config_key_is_in_the_readme_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in config_keys() if f"`{k}`" not in readme.split("### Configuration reference")[1]]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert quickstart is not None
    commands = [line.split("#")[0].strip() for line in quickstart.group(1).splitlines() if line.strip()]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n./scripts/test.sh\n" in ci


def notebook_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme.split("From a notebook", 1)[1]
    found = re.search(r"```python\n(.*?)```", after, re.S)
    assert found is not None
    return found.group(1)


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("workers_python", ["venv", "path"])
def test_the_readme_notebook_snippet_runs_as_a_plain_script(
    start_endpoint, endpoint_key: str, tmp_path: Path, workers_python: str
) -> None:
    endpoint = start_endpoint("--model", "hash", "--dims", "16")
    (tmp_path / "data").mkdir()
    texts = [f"document {i} about topic {i % 5}" for i in range(40)]
    pq.write_table(pa.table({"id": list(range(40)), "text": texts}), tmp_path / "data" / "sample.parquet")
    (tmp_path / "snippet.py").write_text(notebook_snippet())
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "AZURE_INFERENCE", "SPARKEMBED"))
    }
    env |= {"AZURE_INFERENCE_ENDPOINT": endpoint.url, "AZURE_INFERENCE_CREDENTIAL": endpoint_key}
    if workers_python == "venv":  # as the README says to run it
        env["PYSPARK_PYTHON"] = sys.executable
    else:  # as a user who skipped that line: workers get python3 from a PATH without the venv
        env["PATH"] = "/usr/bin:/bin"
    proc = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    if workers_python == "venv":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "'rows_ok': 40" in proc.stdout
        assert len(read_table(str(tmp_path / "out" / "docs_vectors"))) == 40
    else:
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("sparkembed.errors.ConfigError: Spark's Python workers cannot import"), last
        assert f"Set PYSPARK_PYTHON={sys.executable}" in last


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.slow
def test_the_readme_quickstart_and_spark_submit_run_as_written(tmp_path: Path) -> None:
    """``./scripts/demo.sh`` twice (the second sends nothing but the preflight), then the
    README's spark-submit line after its venv line, on the local config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_HOME", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a fresh shell: the venv is not active

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )

    first = bash("./scripts/demo.sh")
    assert first.returncode == 0, first.stderr[-3000:]
    again = bash("./scripts/demo.sh")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["requests"], summary["rows_ok"]) == (0, 0)  # nothing left to embed

    readme = (ROOT / "README.md").read_text()
    activate = next(line for line in readme.splitlines() if line.startswith(". .venv/bin/activate"))
    submit = f"spark-submit jobs/embed_table.py --config conf/local.yaml --target {tmp_path / 'submitted'}"
    proc = bash(f"{activate.split('#')[0]} && {submit} --set run.log_dir={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    submitted = json.loads(proc.stdout.strip().splitlines()[-1])
    assert submitted["rows_failed"] == 0 and submitted["rows_ok"] > 0
