"""Run reports: what a run did, at a glance, from its log.

``sparkembed report RUN_ID`` reads ``runs/<run_id>/summary.json`` and ``timeline.json``
(written by :func:`sparkembed.job.save_run_log`; the timeline holds one
:class:`~sparkembed.metrics.RequestRecord` per HTTP attempt) and writes ``report.html``
with its charts embedded, plus the same charts as PNG files beside it:

- ``throughput.png``: tokens in the trailing minute against the TPM quota line, and
  inputs embedded per second; spans with 429 answers are shaded red.
- ``throttling.png``: attempts per time bin by outcome (ok, 429, other error, no answer)
  and the retries among them.
- ``latency.png``: how long attempts took, successful and not.

    sparkembed report 20260101T000000Z-abcd1234 --tpm 350000

Charts need matplotlib (``pip install 'sparkembed[report]'``); the pyplot state machine
is never used, so rendering is safe beside a notebook's own plots.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sparkembed.core.metrics import RequestRecord
from sparkembed.core.summary import RunSummary, deployment_usage
from sparkembed.core.types import Status

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TARGET_BINS = 60
"""Time charts split the run into about this many bins ..."""
BIN_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)
"""... of one of these widths, in seconds."""
QUOTA_WINDOW_S = 60.0
"""The TPM quota meters tokens per minute: the chart sums tokens over a trailing minute."""
THROTTLE_COLOR = "#d62728"
OK_COLOR = "#2ca02c"
ERROR_COLOR = "#ff7f0e"
NO_ANSWER_COLOR = "#7f7f7f"
_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))


@dataclass(frozen=True)
class RunLog:
    """One run's log as saved by the job.

    Attributes:
        run_id: the run's id.
        summary: the run summary, read back from ``summary.json``.
        records: one record per HTTP attempt, in no particular order.
    """

    run_id: str
    summary: RunSummary
    records: list[RequestRecord]


def load_run_log(run_id: str, runs_dir: str | Path = "runs") -> RunLog:
    """Read ``runs_dir/run_id``'s summary and timeline (a missing timeline is an empty one).

    Raises:
        FileNotFoundError: no ``summary.json`` for that run.
    """
    folder = Path(runs_dir) / run_id
    summary = RunSummary.from_file(json.loads((folder / "summary.json").read_text()))
    timeline_file = folder / "timeline.json"
    raw = json.loads(timeline_file.read_text()) if timeline_file.exists() else []
    records = [RequestRecord(**{k: r[k] for k in _RECORD_FIELDS if k in r}) for r in raw]
    return RunLog(run_id=run_id, summary=summary, records=records)


# -- time bins ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bins:
    """Equal time bins over a run; times are seconds since the first attempt started."""

    t0: float
    width_s: float
    edges: np.ndarray

    @classmethod
    def over(cls, records: list[RequestRecord]) -> _Bins:
        t0 = min(r.start_s for r in records)
        duration = max(max(r.end_s for r in records) - t0, 1e-3)
        width = next((w for w in BIN_STEPS_S if duration / w <= TARGET_BINS), BIN_STEPS_S[-1])
        count = max(1, math.ceil(duration / width))
        return cls(t0, float(width), np.arange(count + 1) * float(width))

    def count(self, records: list[RequestRecord], weight: str | None = None) -> np.ndarray:
        """Per bin: records whose answer arrived in it, or the sum of ``weight`` over them."""
        ends = np.array([r.end_s - self.t0 for r in records], dtype=float)
        weights = None if weight is None else np.array([getattr(r, weight) for r in records], dtype=float)
        counts, _ = np.histogram(ends, bins=self.edges, weights=weights)
        return counts

    def spans(self, mask: np.ndarray) -> list[tuple[float, float]]:
        """Contiguous runs of bins where ``mask`` holds, as (start, end) seconds."""
        spans: list[tuple[float, float]] = []
        for i in np.flatnonzero(mask):
            start, end = float(self.edges[i]), float(self.edges[i + 1])
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        return spans


def trailing_minute_tokens(records: list[RequestRecord], at_s: np.ndarray, t0: float) -> np.ndarray:
    """Prompt tokens answered in the ``QUOTA_WINDOW_S`` seconds up to each time in ``at_s``.

    Args:
        records: the attempts (failed ones carry 0 tokens).
        at_s: times in seconds since ``t0``.
        t0: epoch seconds of time 0.
    """
    done = sorted((r.end_s - t0, r.prompt_tokens) for r in records if r.prompt_tokens)
    if not done:
        return np.zeros_like(at_s, dtype=float)
    times = np.array([t for t, _ in done])
    cumulative = np.concatenate([[0.0], np.cumsum([n for _, n in done], dtype=float)])
    upto = cumulative[np.searchsorted(times, at_s, side="right")]
    before = cumulative[np.searchsorted(times, at_s - QUOTA_WINDOW_S, side="right")]
    return upto - before


# -- charts --------------------------------------------------------------------------------


def _new_figure(height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(10, height), dpi=100, layout="constrained")


def _shade_throttling(ax: Axes, bins: _Bins, throttled: np.ndarray, *, label: bool) -> None:
    """Shade the bins that saw 429 answers, so throttling lines up across the panels."""
    for i, (start, end) in enumerate(bins.spans(throttled > 0)):
        ax.axvspan(
            start,
            end,
            color=THROTTLE_COLOR,
            alpha=0.15,
            lw=0,
            label="429 answers in this span" if label and i == 0 else None,
        )


def throughput_figure(records: list[RequestRecord], tokens_per_minute: int | None = None) -> Figure:
    """Tokens in the trailing minute against the quota line, and inputs per second.

    Args:
        records: the run's attempts (at least one).
        tokens_per_minute: the deployment's TPM quota; None draws no quota line.
    """
    bins = _Bins.over(records)
    throttled = bins.count([r for r in records if r.status == 429])
    fig = _new_figure(6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])

    at = np.linspace(0.0, float(bins.edges[-1]), 400)
    top.plot(
        at,
        trailing_minute_tokens(records, at, bins.t0),
        color="#1f77b4",
        lw=2,
        label="prompt tokens answered in the trailing 60 s",
    )
    if tokens_per_minute:
        top.axhline(
            tokens_per_minute, color="black", ls="--", lw=1.5, label=f"quota {tokens_per_minute:,} tokens/min"
        )
    _shade_throttling(top, bins, throttled, label=True)
    top.set_ylim(bottom=0)
    top.set_ylabel("tokens per minute")
    top.set_title(
        "Tokens per minute against the quota\n(a fresh deployment lets a minute's quota through at "
        "once, so the first minute may pass the line)",
        fontsize="medium",
    )
    top.yaxis.set_major_formatter(_thousands())
    top.legend(loc="lower right", fontsize="small")

    ok = [r for r in records if r.status == 200]
    rate = bins.count(ok, "n_inputs") / bins.width_s
    bottom.stairs(rate, bins.edges, fill=True, color=OK_COLOR, alpha=0.6)
    _shade_throttling(bottom, bins, throttled, label=False)
    bottom.set_ylabel("inputs per second")
    bottom.set_xlabel(f"seconds since the first request (bins of {bins.width_s:g} s)")
    bottom.set_title("Throughput: inputs embedded per second")
    bottom.set_xlim(0, float(bins.edges[-1]))
    return fig


def throttling_figure(records: list[RequestRecord]) -> Figure:
    """Failed attempts per time bin (429s, other errors, no answer) and the retries sent.

    Successes are left out (the throughput chart shows them), so a single 429 stands out.
    """
    bins = _Bins.over(records)
    outcomes = [
        ("429 throttled", THROTTLE_COLOR, lambda r: r.status == 429),
        ("other HTTP error", ERROR_COLOR, lambda r: r.status not in (0, 200, 429)),
        ("no answer (timeout, reset)", NO_ANSWER_COLOR, lambda r: r.status == 0),
    ]
    fig = _new_figure(5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    base = np.zeros(len(bins.edges) - 1)
    for label, color, keep in outcomes:
        counts = bins.count([r for r in records if keep(r)])
        top.bar(
            bins.edges[:-1],
            counts,
            width=bins.width_s,
            bottom=base,
            align="edge",
            color=color,
            label=f"{label}: {int(counts.sum()):,}",
        )
        base += counts
    failed = int(base.sum())
    top.set_title(f"Failed attempts over time: {failed:,} of {len(records):,} attempts")
    top.set_ylabel(f"attempts per {bins.width_s:g} s")
    top.set_ylim(0, max(1.0, float(base.max())) * 1.25)  # room for the legend
    top.yaxis.set_major_locator(_integers())
    top.legend(loc="upper right", fontsize="small", ncols=3)

    retries = bins.count([r for r in records if r.attempt > 1])
    bottom.bar(bins.edges[:-1], retries, width=bins.width_s, align="edge", color="#9467bd")
    bottom.set_title(f"Retries sent: {int(retries.sum()):,}")
    bottom.set_ylabel(f"retries per {bins.width_s:g} s")
    bottom.set_ylim(0, max(1.0, float(retries.max())) * 1.1)
    bottom.yaxis.set_major_locator(_integers())
    bottom.set_xlabel(f"seconds since the first request (bins of {bins.width_s:g} s)")
    bottom.set_xlim(0, float(bins.edges[-1]))
    return fig


def latency_figure(records: list[RequestRecord]) -> Figure:
    """Histogram of attempt latency (ms), successful and failed, with p50/p95/p99 marked."""
    fig = _new_figure(4.0)
    ax = fig.subplots()
    ms = np.array([(r.end_s - r.start_s) * 1000.0 for r in records])
    ok = np.array([r.status == 200 for r in records])
    low, high = max(float(ms.min()), 0.1), max(float(ms.max()), 1.0)
    log_scale = high / low > 50  # a long tail (timeouts) would squash the rest into one bar
    spaced = np.geomspace(low, high * 1.01, 50) if log_scale else np.linspace(0, high * 1.01, 50)
    edges = [float(x) for x in spaced]
    ax.hist(ms[ok], bins=edges, color=OK_COLOR, alpha=0.7, label=f"ok ({int(ok.sum()):,})")
    if (~ok).any():
        ax.hist(
            ms[~ok],
            bins=edges,
            color=THROTTLE_COLOR,
            alpha=0.6,
            label=f"not ok: 429, error, no answer ({int((~ok).sum()):,})",
        )
    if ok.any():
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            value = float(np.percentile(ms[ok], q))
            ax.axvline(value, color="black", ls=style, lw=1, label=f"p{q} ok {value:,.0f} ms")
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel("attempt latency, ms (send to answer)")
    ax.set_ylabel("attempts")
    ax.set_title("Latency")
    ax.legend(fontsize="small")
    return fig


def _integers() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:,.0f}")


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# -- the report ----------------------------------------------------------------------------


def write_report(log: RunLog, out_dir: str | Path, tokens_per_minute: int | None = None) -> Path:
    """Write ``report.html`` (charts embedded) and the charts as PNGs into ``out_dir``.

    Args:
        log: the run log.
        out_dir: folder to write; created if missing.
        tokens_per_minute: TPM quota for the quota line; default the summary's, if any.

    Returns:
        The path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tpm = tokens_per_minute or log.summary.tokens_per_minute
    charts: list[tuple[str, str]] = []
    if log.records:
        figures = {
            "throughput": throughput_figure(log.records, tpm),
            "throttling": throttling_figure(log.records),
            "latency": latency_figure(log.records),
        }
        for name, fig in figures.items():
            png = figure_png(fig)
            (out / f"{name}.png").write_bytes(png)
            charts.append((name, base64.b64encode(png).decode()))
    path = out / "report.html"
    path.write_text(render_html(log, charts, tpm))
    return path


def render_html(log: RunLog, charts: list[tuple[str, str]], tokens_per_minute: int | None) -> str:
    """The report page; ``charts`` are (name, base64 PNG) pairs."""
    s = log.summary
    sections = [
        f"<h1>sparkembed run {_e(log.run_id)}</h1>",
        "<h2>Rows</h2>" + _rows_table(s),
        "<h2>Top error reasons</h2>" + _reasons_table(s),
        "<h2>Requests</h2>" + _requests_table(s, log.records, tokens_per_minute),
        "<h2>Deployments</h2>" + _deployments_table(s, log.records),
        "<h2>Tokens and cost</h2>" + _cost_table(s),
    ]
    if charts:
        sections.append("<h2>Charts</h2>")
        sections += [f'<p><img alt="{name}" src="data:image/png;base64,{data}"></p>' for name, data in charts]
    else:
        sections.append("<p>No request timeline in this run log: no charts.</p>")
    style = (
        "body{font-family:sans-serif;max-width:1050px;margin:2em auto}"
        "table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:3px 10px;text-align:left}"
        "td.n{text-align:right}img{max-width:100%}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>sparkembed run {_e(log.run_id)}'
        f"</title><style>{style}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _rows_table(s: RunSummary) -> str:
    statuses = (Status.OK, Status.SKIPPED, Status.FAILED)
    counts = {status.value: s.counts[f"{status.value}_rows"] for status in statuses}
    total = sum(counts.values())
    rows = [(k, f"{n:,}", f"{100 * n / total:.1f} %" if total else "") for k, n in counts.items()]
    return _table(("status", "rows", "share"), rows)


def _reasons_table(s: RunSummary) -> str:
    if not s.counts["failed_rows"]:
        return "<p>None: no row failed.</p>"
    top = sorted(s.error_reasons.items(), key=lambda kv: -kv[1])[:10]
    if not top:
        return "<p>Not recorded in this run log.</p>"
    return _table(("reason", "rows"), [(reason, f"{n:,}") for reason, n in top])


def _requests_table(s: RunSummary, records: list[RequestRecord], tpm: int | None) -> str:
    statuses = Counter("no answer" if r.status == 0 else str(r.status) for r in records)
    rows = [
        ("HTTP attempts", f"{s.counts['requests'] or len(records):,}"),
        ("retries", f"{s.counts['retries']:,}"),
        ("answered 429", f"{s.counts['throttled'] or statuses.get('429', 0):,}"),
        ("attempts by status", ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())) or "none"),
        ("seconds", f"{s.seconds:,.1f}"),
        ("rows per second", f"{s.to_json()['rows_per_s']:,.1f}"),
        (
            "seconds waiting on the rate limiter (summed over requests)",
            f"{s.limiter_wait_s:,.1f}",
        ),
        ("TPM quota", f"{tpm:,}" if tpm else "not given (pass --tpm)"),
        ("RPM quota", f"{s.requests_per_minute:,}" if s.requests_per_minute else "not given"),
    ]
    ok_ms = [(r.end_s - r.start_s) * 1000.0 for r in records if r.status == 200]
    if ok_ms:
        p50, p95, p99 = np.percentile(ok_ms, [50, 95, 99])
        rows.append(("latency of ok attempts p50 / p95 / p99", f"{p50:,.0f} / {p95:,.0f} / {p99:,.0f} ms"))
    return _table(("", ""), rows)


def _deployments_table(s: RunSummary, records: list[RequestRecord]) -> str:
    """Tokens per minute per deployment against its quota (a pool's, or the one URL's)."""
    usage = s.deployments or deployment_usage([asdict(r) for r in records])
    if not usage:
        return "<p>Not recorded in this run log.</p>"
    rows = []
    for name, row in usage.items():
        quota, share = row.get("quota_tokens_per_minute"), row.get("share_of_quota")
        rows.append((
            name or "(not recorded)",
            f"{row['prompt_tokens']:,}",
            f"{row['tokens_per_minute']:,}",
            f"{quota:,}" if quota else "not given",
            f"{100 * share:.0f} %" if share is not None else "",
            f"{row['requests']:,}",
            f"{row['throttled_429']:,}",
            f"{row['errors']:,}",
        ))  # fmt: skip
    header = ("deployment", "tokens", "tokens/min", "TPM quota", "of quota", "attempts", "429", "errors")
    return _table(header, rows)


def _cost_table(s: RunSummary) -> str:
    spent = s.to_json()
    billed, kept = spent["tokens_billed"], spent["tokens_in_table"]
    waste = billed - kept
    share = f" ({100 * waste / billed:.1f} %)" if billed else ""
    rows = [
        ("prompt tokens", f"{s.counts['prompt_tokens']:,}"),
        ("tokens billed (every answered request)", f"{billed:,}"),
        ("tokens in the table", f"{kept:,}"),
        ("waste: billed, not in the table (retried task attempts, lost races)", f"{waste:,}{share}"),
        ("total tokens", f"{s.counts['total_tokens']:,}"),
        ("price per 1M tokens", f"${s.price_per_million_tokens:g}"),
    ]
    cost = float(spent["estimated_cost_usd"])
    rows.append(("estimated cost", f"${cost:,.2f}" if cost >= 1 else f"${cost:.3g}"))
    return _table(("", ""), rows)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header) if any(header) else ""
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i else ''}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _e(text: object) -> str:
    return html.escape(str(text))


def main(argv: list[str] | None = None) -> int:
    """``sparkembed report RUN_ID [--runs-dir runs] [--out DIR] [--tpm N]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="sparkembed report", description="Write a run's HTML report.")
    parser.add_argument("run_id", help="the run's id (a folder under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where runs are logged (run.log_dir)")
    parser.add_argument("--out", help="output folder (default RUNS_DIR/RUN_ID/report)")
    parser.add_argument("--tpm", type=int, help="TPM quota to draw (default: the run's, if logged)")
    args = parser.parse_args(argv)
    try:
        log = load_run_log(args.run_id, args.runs_dir)
    except FileNotFoundError:
        print(f"no run log at {Path(args.runs_dir) / args.run_id}/summary.json", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as exc:
        print(f"unreadable run log for {args.run_id}: {exc}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("sparkembed report needs matplotlib: pip install 'sparkembed[report]'", file=sys.stderr)
        return 2
    out = args.out or Path(args.runs_dir) / args.run_id / "report"
    print(f"wrote {write_report(log, out, args.tpm)}")
    return 0
