"""``sparkembed report``: charts and tables from the log of a real, throttled engine run."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from support import DIMS, corpus

from sparkembed.backends import make_backend
from sparkembed.config import validate_config
from sparkembed.core.engine import Embedder
from sparkembed.core.metrics import Metrics, RequestRecord
from sparkembed.core.ratelimit import RateLimiter
from sparkembed.core.summary import RunSummary
from sparkembed.report import (
    THROTTLE_COLOR,
    RunLog,
    load_run_log,
    main,
    render_html,
    throughput_figure,
    trailing_minute_tokens,
)

QUOTA_TPM = 6000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHARTS = ("throughput", "throttling", "latency")


@pytest.fixture(scope="module")
def throttled_run(start_endpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Metrics]:
    """A run saved by the job's own ``save_run_log``: ~6,600 tokens against a 6,000 TPM
    quota, with the limiter told twice the quota and a service that never says what room
    is left, so it answers 429s."""
    from sparkembed.spark.driver import save_run_log

    endpoint = start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--tpm", str(QUOTA_TPM), "--no-auth", "--no-quota-headers"),
        *("--window-scale", "0.1"),  # a 6 s minute, the limiter's too: seconds, not a minute
    )
    runs = tmp_path_factory.mktemp("runs")
    config = validate_config(
        {
            "endpoint": {"url": endpoint.url},
            "auth": {"mode": "none"},
            "batching": {"max_inputs": 16},
            "limits": {"concurrency": 4, "tokens_per_minute": 2 * QUOTA_TPM},
            "retry": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "max_attempts": 12},
            "run": {"log_dir": str(runs)},
        }
    )
    limiter = RateLimiter(2 * QUOTA_TPM, None, minute_s=6.0)
    embedder = Embedder(config, make_backend(config), limiter=limiter)
    metrics = Metrics()
    started = time.monotonic()
    try:
        results = list(embedder.embed_stream([corpus(400)], metrics))
    finally:
        embedder.close()
    assert results[0].status == ["ok"] * 400
    summary = RunSummary(run_id="throttled", price_per_million_tokens=0.02)
    summary.add(metrics.to_dict(timeline=True))
    summary.seconds = time.monotonic() - started
    save_run_log(config, summary)
    return runs, metrics


def test_report_of_a_throttled_run_draws_the_quota_and_the_429s(throttled_run: tuple[Path, Metrics]) -> None:
    runs, metrics = throttled_run
    assert metrics.throttled > 0  # the run did see 429s
    log = load_run_log("throttled", runs)
    assert len(log.records) == metrics.requests

    fig = throughput_figure(log.records, QUOTA_TPM)
    tokens_axes = fig.axes[0]
    quota_lines = [line for line in tokens_axes.get_lines() if str(line.get_label()).startswith("quota")]
    assert len(quota_lines) == 1
    assert list(quota_lines[0].get_ydata()) == [QUOTA_TPM, QUOTA_TPM]  # horizontal, at the quota
    # Every 429 answer falls in a red span.
    spans = [_x_range(p) for p in tokens_axes.patches if _is_color(p.get_facecolor(), THROTTLE_COLOR)]
    t0 = min(r.start_s for r in log.records)
    throttled_at = [r.end_s - t0 for r in log.records if r.status == 429]
    assert spans and all(any(lo <= t <= hi for lo, hi in spans) for t in throttled_at)


def test_the_command_writes_valid_pngs_and_a_self_contained_page(
    throttled_run: tuple[Path, Metrics], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, metrics = throttled_run
    out = tmp_path / "report"
    assert main(["throttled", "--runs-dir", str(runs), "--out", str(out), "--tpm", str(QUOTA_TPM)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'report.html'}"
    page = (out / "report.html").read_text()
    for name in CHARTS:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert imread(out / f"{name}.png").shape[2] == 4  # decodes as an RGBA image
        assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert f"<td>answered 429</td><td class=n>{metrics.throttled:,}</td>" in page
    assert f"<td>TPM quota</td><td class=n>{QUOTA_TPM:,}</td>" in page
    assert "<td>ok</td><td class=n>400</td><td class=n>100.0 %</td>" in page


def test_a_missing_run_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope", "--runs-dir", str(tmp_path)]) == 2
    assert "no run log at" in capsys.readouterr().err


def test_tables_escape_error_reasons_and_say_when_there_is_no_timeline() -> None:
    summary = {"rows_ok": 3, "rows_failed": 2, "error_reasons": {"400 bad <input>": 2}}
    page = render_html(RunLog("r1", RunSummary.from_file(summary), []), [], None)
    assert "<td>400 bad &lt;input&gt;</td><td class=n>2</td>" in page
    assert "<td>failed</td><td class=n>2</td><td class=n>40.0 %</td>" in page
    assert "No request timeline in this run log: no charts." in page
    assert "not given (pass --tpm)" in page


def test_trailing_minute_counts_tokens_answered_in_the_last_60_s() -> None:
    records = [
        RequestRecord(100.0, 101.0, 1, 500, 200, 1),
        RequestRecord(100.0, 130.0, 1, 0, 429, 1),
        RequestRecord(130.0, 150.0, 1, 200, 200, 2),
        RequestRecord(150.0, 170.0, 1, 100, 200, 1),
    ]
    at = np.array([0.0, 1.0, 50.0, 61.0, 70.0, 130.0])
    np.testing.assert_array_equal(trailing_minute_tokens(records, at, 100.0), [0, 500, 700, 200, 300, 0])


def _x_range(patch: Any) -> tuple[float, float]:
    """A span's x extent in data coordinates (a Rectangle or a Polygon, by matplotlib version)."""
    xs = patch.get_patch_transform().transform(patch.get_path().vertices)[:, 0]
    return float(xs.min()), float(xs.max())


def _is_color(rgba: tuple[float, ...], hex_color: str) -> bool:
    from matplotlib.colors import to_rgb

    return np.allclose(rgba[:3], to_rgb(hex_color))


def test_the_summary_file_reads_back_as_the_summary_the_run_wrote() -> None:
    summary = RunSummary(run_id="r1", rows_total=9, price_per_million_tokens=0.02, tokens_per_minute=6000)
    summary.add({"ok_rows": 5, "skipped_rows": 1, "failed_rows": 3, "requests": 7, "retries": 2,
                 "throttled": 1, "prompt_tokens": 900, "total_tokens": 900, "dropped_tokens": 40,
                 "reused_tokens": 60, "limiter_wait_s": 1.5})  # fmt: skip
    summary.tokens_billed, summary.waves, summary.stopped = 1_000, 3, "signal"
    summary.error_reasons, summary.error_examples = {"400 too long": 3}, {"400 too long": "id 7"}
    back = RunSummary.from_file(json.loads(json.dumps(summary.to_file())))
    assert back == summary
    assert back.to_json() == summary.to_json()


def test_tokens_billed_but_not_in_the_table_show_as_waste() -> None:
    summary = {"rows_ok": 3, "prompt_tokens": 900, "tokens_in_table": 900, "tokens_billed": 1_000}
    page = render_html(RunLog("r1", RunSummary.from_file(summary), []), [], None)
    assert "<td>tokens billed (every answered request)</td><td class=n>1,000</td>" in page
    assert "retried task attempts, lost races)</td><td class=n>100 (10.0 %)</td>" in page


def test_the_report_shows_tokens_per_minute_per_deployment_against_its_quota() -> None:
    summary = RunSummary(run_id="pool", deployment_quotas={"a.example/openai/v1": 240_000, "b.example": None})
    summary.timeline = [
        asdict(RequestRecord(0.0, 30.0, 10, 90_000, 200, 1, "a.example/openai/v1")),
        asdict(RequestRecord(30.0, 60.0, 10, 30_000, 200, 1, "a.example/openai/v1")),
        asdict(RequestRecord(0.0, 60.0, 10, 60_000, 200, 1, "b.example")),
        asdict(RequestRecord(0.0, 1.0, 10, 0, 429, 1, "b.example")),
    ]
    summary.count_deployments()
    assert summary.deployments["a.example/openai/v1"] == {
        "prompt_tokens": 120_000, "requests": 2, "throttled_429": 0, "errors": 0,
        "tokens_per_minute": 120_000, "quota_tokens_per_minute": 240_000, "share_of_quota": 0.5,
    }  # fmt: skip
    assert summary.deployments["b.example"]["throttled_429"] == 1
    back = RunSummary.from_file(json.loads(json.dumps(summary.to_file())))
    assert back.deployments == summary.deployments
    assert back.deployment_quotas == summary.deployment_quotas
    page = render_html(RunLog("pool", back, []), [], None)
    assert (
        "<td>a.example/openai/v1</td><td class=n>120,000</td><td class=n>120,000</td>"
        "<td class=n>240,000</td><td class=n>50 %</td>"
    ) in page
    b_row = "<td>b.example</td><td class=n>60,000</td><td class=n>60,000</td><td class=n>not given</td>"
    assert b_row in page
