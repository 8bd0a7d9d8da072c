"""The driver side of a run: check, preflight, then embed and commit wave by wave."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkembed import waves as wave_sinks
from sparkembed.config import EmbedConfig
from sparkembed.engine import Embedder
from sparkembed.errors import ConfigError
from sparkembed.incremental import other_fingerprint_ids, plan_work, read_target
from sparkembed.sources import check_ids, read_source, select_input
from sparkembed.transport import check_endpoint_url, hide_bridge_traffic

log = logging.getLogger(__name__)

COUNTERS = ("ok_rows", "skipped_rows", "failed_rows", "requests", "retries", "throttled",
            "prompt_tokens", "total_tokens")  # fmt: skip


@dataclass
class RunSummary:
    run_id: str
    rows_total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    limiter_wait_s: float = 0.0
    pruned: int = 0
    seconds: float = 0.0
    price_per_million_tokens: float = 0.0
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    error_reasons: dict[str, int] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def add(self, metrics: dict[str, Any]) -> None:
        for key in COUNTERS:
            self.counts[key] += int(metrics.get(key, 0))
        self.limiter_wait_s += float(metrics.get("limiter_wait_s", 0.0))
        self.timeline.extend(metrics.get("timeline", []))

    def to_json(self) -> dict[str, Any]:
        done = sum(self.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
        extra = {"top_errors": self.error_reasons} if self.error_reasons else {}
        return extra | {
            "run_id": self.run_id,
            "rows_ok": self.counts["ok_rows"],
            "rows_skipped": self.counts["skipped_rows"],
            "rows_failed": self.counts["failed_rows"],
            "requests": self.counts["requests"],
            "retries": self.counts["retries"],
            "throttled_429": self.counts["throttled"],
            "prompt_tokens": self.counts["prompt_tokens"],
            "limiter_wait_s": round(self.limiter_wait_s, 3),
            "pruned_ids": self.pruned,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(done / self.seconds, 1) if self.seconds else 0.0,
            "estimated_cost_usd": round(
                self.counts["prompt_tokens"] * self.price_per_million_tokens / 1e6, 6
            ),
        }

    @property
    def failed_fraction(self) -> float:
        done = sum(self.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
        return self.counts["failed_rows"] / done if done else 0.0


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def refuse_speculation(spark: SparkSession) -> None:
    """A speculative copy of a task pays for the same tokens twice."""
    if (spark.conf.get("spark.speculation", "false") or "false").lower() == "true":
        raise ConfigError("spark.speculation is on; it would pay for tokens twice. Set it to false")


def prepare(
    spark: SparkSession, config: EmbedConfig, source: DataFrame | None = None
) -> tuple[DataFrame, EmbedConfig, int]:
    """Validate source and endpoint before any money is spent; hand each task its quota share.

    Returns:
        The selected source, the config for the run, and the source's row count.
    """
    refuse_speculation(spark)
    check_endpoint_url(config.endpoint.url, allow_insecure_http=config.endpoint.allow_insecure_http)
    hide_bridge_traffic()
    if not config.target.path:
        raise ConfigError("no target given: pass --target PATH|TABLE or set target.path")
    config = _absolute_target(config)
    if source is None:
        source = read_source(spark, config.source)
    df = select_input(source, config.source)
    rows = check_ids(df, config.source.id_col)
    preflight = Embedder(config)
    try:
        dims, model = preflight.preflight()
    finally:
        preflight.close()
    log.info("preflight ok: model %s, %d dimensions", model, dims)
    endpoint = config.endpoint.model_copy(update={"served_model": model, "served_dimensions": dims})
    parallelism = default_parallelism(spark, config)
    workers = min(config.run.partitions or parallelism, parallelism)
    limits = config.limits.model_copy(update={"workers": max(1, workers)})
    return df, config.model_copy(update={"limits": limits, "endpoint": endpoint}), rows


def _materialize(todo: DataFrame) -> DataFrame:
    """Compute the rows to do once: waves then slice a fixed set, without re-reading the
    source and redoing the anti-join per wave, and a non-deterministic source cannot
    hand two waves different rows. Kept on the executors' memory and disk."""
    try:
        return todo.localCheckpoint(eager=True)
    except Exception as exc:  # e.g. Spark Connect 3.5 has no localCheckpoint
        log.warning("could not checkpoint the rows to do (%s); each wave recomputes them", exc)
        return todo


def _absolute_target(config: EmbedConfig) -> EmbedConfig:
    """Executors may run in other folders: a local target path must be absolute."""
    path = str(config.target.path)
    if "://" in path or not ("/" in path or os.path.exists(path)) or os.path.isabs(path):
        return config
    target = config.target.model_copy(update={"path": os.path.abspath(path)})
    return config.model_copy(update={"target": target})


def default_parallelism(spark: SparkSession, config: EmbedConfig) -> int:
    """Task slots: the context's parallelism, or conf/``run.partitions`` on Spark Connect."""
    try:
        return max(1, spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect sessions have no SparkContext
        fallback = spark.conf.get("spark.default.parallelism", None) or config.run.partitions
        if not fallback:
            raise ConfigError("cannot tell the cluster's parallelism here: set run.partitions") from None
        return max(1, int(fallback))


def run(
    spark: SparkSession,
    config: EmbedConfig,
    *,
    source: DataFrame | None = None,
    run_id: str | None = None,
    progress: Callable[[str], None] = print,
) -> RunSummary:
    """Embed ``source`` (default: read ``config.source``) into ``config.target``.

    Only rows the target lacks are embedded (see :mod:`sparkembed.incremental`).
    Commits every ``run.commit_every_rows`` rows, so a crash loses one wave at most.
    """
    started = time.monotonic()
    summary = RunSummary(
        run_id=run_id or new_run_id(),
        price_per_million_tokens=config.endpoint.price_per_million_tokens,
        tokens_per_minute=config.limits.tokens_per_minute,
        requests_per_minute=config.limits.requests_per_minute,
    )
    df, config, source_rows = prepare(spark, config, source)
    plan = plan_work(spark, df, config)
    if plan.failed_left:
        progress(
            f"{plan.failed_left} ids have failed rows from earlier runs; left as they are "
            "(rerun with --retry-failed to embed them again)"
        )
    todo = _materialize(plan.todo)
    total = source_rows if plan.whole_source else todo.count()
    summary.rows_total = total
    waves = math.ceil(total / config.run.commit_every_rows)
    progress(f"{total} source rows to embed in {waves} wave(s)")
    partitions = config.run.partitions or default_parallelism(spark, config)
    sink = wave_sinks.choose_sink(spark, config)
    id_col = config.source.id_col
    for wave in range(waves):
        part = todo
        if waves > 1:
            part = todo.filter(F.expr(f"pmod(xxhash64(`{id_col}`), {waves})") == wave)
        metrics = sink.write_wave(part.repartition(partitions), config, summary.run_id, wave)
        summary.add(metrics)
        _report_progress(progress, summary, wave, waves, time.monotonic() - started)
    if plan.prune is not None:
        summary.pruned = sink.prune(plan.prune, config, summary.run_id, version=waves)
        progress(f"pruned {summary.pruned} ids that are gone from the source")
    stale = other_fingerprint_ids(spark, config) if plan.retire_other_fingerprints else None
    if stale is not None:
        retired = sink.prune(stale, config, summary.run_id, version=waves + 1)
        progress(f"deleted {retired} ids left with vectors of the old fingerprint")
    sink.finish(config, summary.run_id)
    if summary.counts["failed_rows"]:
        summary.error_reasons = top_errors(spark, config, summary.run_id)
    summary.seconds = time.monotonic() - started
    save_run_log(config, summary)
    return summary


def _report_progress(
    progress: Callable[[str], None], summary: RunSummary, wave: int, waves: int, elapsed: float
) -> None:
    done = sum(summary.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
    eta = elapsed / (wave + 1) * (waves - wave - 1)  # waves are about equal in size
    progress(
        f"wave {wave + 1}/{waves} committed: {done} output rows (chunks included) from "
        f"{summary.rows_total} source rows, {summary.counts['prompt_tokens']} tokens, "
        f"{done / elapsed if elapsed else 0:.0f} rows/s, ETA {eta:.0f} s"
    )


def top_errors(spark: SparkSession, config: EmbedConfig, run_id: str, limit: int = 10) -> dict[str, int]:
    """The most common reasons this run's rows failed, read back from the target."""
    table = read_target(spark, config)
    if table is None:
        return {}
    rows = (
        table.filter((F.col("run_id") == run_id) & (F.col("status") == "failed"))
        .groupBy("error")
        .count()
        .orderBy(F.desc("count"))
        .limit(limit)
        .collect()
    )
    return {str(r["error"]): int(r["count"]) for r in rows}


def save_run_log(config: EmbedConfig, summary: RunSummary) -> Path:
    """The summary and per-request timeline, for ``sparkembed report``."""
    folder = Path(config.run.log_dir) / summary.run_id
    folder.mkdir(parents=True, exist_ok=True)
    details = {
        "tokens_per_minute": summary.tokens_per_minute,
        "requests_per_minute": summary.requests_per_minute,
        "total_tokens": summary.counts["total_tokens"],
        "price_per_million_tokens": summary.price_per_million_tokens,
        "error_reasons": summary.error_reasons,
    }
    (folder / "summary.json").write_text(json.dumps(summary.to_json() | details, indent=2))
    (folder / "timeline.json").write_text(json.dumps(summary.timeline))
    return folder
