"""The fault soak (scripts/soak.py) at CI size: 2,000 rows through the whole job under faults,
an endpoint outage, a killed Python worker, and a Ctrl-C mid-wave followed by a rerun."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pyspark.sql import SparkSession

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_soak_ci_size_loses_fails_and_corrupts_nothing(spark: SparkSession, tmp_path: Path) -> None:
    soak = load_script()
    report_path = tmp_path / "soak.json"

    status = soak.main(
        ["--rows", "2000", "--commit-every", "1000", "--workdir", str(tmp_path / "work"),
         "--json", str(report_path), "--outage-s", "5", "--kill-workers", "1", "--interrupt"]
    )  # fmt: skip

    report = json.loads(report_path.read_text())
    print("texts billed more than once:", report["texts_billed_more_than_once"])
    assert status == 0
    assert (report["ok"], report["failed"], report["lost"], report["duplicated"]) == (2000, 0, 0, 0)
    assert report["mismatched"] == 0
    # Every row's tokens were counted once in the table, whatever the server billed twice.
    assert report["table_prompt_tokens"] == report["corpus_tokens"]
    # The faults really happened, and the engine absorbed them.
    responses = report["server_responses"]
    assert responses.get("500", 0) + responses.get("503", 0) > 0
    assert report["retries"] > 0
    assert (report["workers_killed"], report["interrupted"], report["runs"]) == (1, True, 2)
    # Paid twice: at most the killed task's part of one wave, plus answers held past the
    # client's timeout (2 % of requests, 32 inputs each, billed by the server regardless).
    slow_bound = int(0.02 * report["requests"] * 32) + 32
    assert report["texts_billed_more_than_once"] <= report["one_wave_rows"] + slow_bound
    # The summaries count what the server billed, short only of those abandoned slow answers.
    assert report["tokens_billed_reported"] <= report["server_prompt_tokens"]
    assert report["tokens_billed_reported"] >= report["table_prompt_tokens"]
