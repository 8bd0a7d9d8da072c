"""The run summary: counters summed over a run's tasks, and what the run spent.

One typed object from the driver to the CLI's JSON line, ``summary.json`` and
``sparkembed report``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sparkembed.core.metrics import COUNTERS


def deployment_usage(
    timeline: Iterable[Mapping[str, Any]], quotas: Mapping[str, int | None] | None = None
) -> dict[str, dict[str, Any]]:
    """Per deployment: tokens per minute against its quota, from a run's request timeline.

    The rate is over the whole run's span of requests (first sent to last answered), so the
    deployments' rates add up to the run's, and one taken out midway shows it.

    Args:
        timeline: :class:`~sparkembed.core.metrics.RequestRecord` dicts.
        quotas: TPM quota per deployment name, where known.
    """
    records = list(timeline)
    quotas = quotas or {}
    if not records:
        return {}
    span_s = max(r["end_s"] for r in records) - min(r["start_s"] for r in records)
    minutes = max(span_s, 1e-3) / 60.0
    usage: dict[str, dict[str, Any]] = {}
    for record in records:
        name = record.get("deployment") or ""
        row = usage.setdefault(name, {"prompt_tokens": 0, "requests": 0, "throttled_429": 0, "errors": 0})
        row["prompt_tokens"] += record["prompt_tokens"]
        row["requests"] += 1
        row["throttled_429"] += record["status"] == 429
        row["errors"] += record["status"] not in (200, 429)
    for name, row in usage.items():
        rate, quota = row["prompt_tokens"] / minutes, quotas.get(name)
        row["tokens_per_minute"] = round(rate)
        row["quota_tokens_per_minute"] = quota
        row["share_of_quota"] = round(rate / quota, 3) if quota else None
    return dict(sorted(usage.items()))


@dataclass
class RunSummary:
    """What a run did and spent: printed by the CLI, saved as ``summary.json``, read by the report.

    ``counts`` holds :data:`~sparkembed.core.metrics.COUNTERS`, summed over the run's tasks.
    """

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
    error_examples: dict[str, str] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    tokens_billed: int = 0
    """Every successful response's usage, task attempts that failed or never committed included."""
    failed_before: int = 0
    """Ids with failed rows from earlier runs, left as they are."""
    waves: int = 0
    stopped: str | None = None
    """``signal`` when SIGINT/SIGTERM stopped the run after committing what was done; ``budget``
    when it reached ``run.max_tokens``/``run.max_cost_usd`` (with ``run.allow_partial``)."""
    deduplicated: int = 0
    """Rows that copied the vector of a row with the same text instead of being sent (dedup)."""
    from_cache: int = 0
    """Rows written from the cache (``cache.path``) instead of being sent, chunks included."""
    cache_added: int = 0
    """Rows this run added to the cache, chunks included."""
    stop_signal: int | None = None
    error: str | None = None
    migration: dict[str, Any] | None = None
    """A migration run's outcome: staging table, ``state`` (``switched``, ``held``, ``stopped``,
    ``incomplete``, ``failed_rows``), the switch's target version, the ``--check-sample`` report."""

    deployment_quotas: dict[str, int | None] = field(default_factory=dict)
    """TPM quota per deployment name (a pool's entries, or the one URL's ``limits.tokens_per_minute``)."""
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per deployment: tokens, tokens per minute and its quota, requests, 429s and errors
    (:func:`deployment_usage`, set at the end of the run)."""

    def count_deployments(self) -> None:
        """Fill :attr:`deployments` from the timeline and the quotas."""
        self.deployments = deployment_usage(self.timeline, self.deployment_quotas)

    def add(self, metrics: dict[str, Any]) -> None:
        for key in COUNTERS:
            self.counts[key] += int(metrics.get(key, 0))
        self.limiter_wait_s += float(metrics.get("limiter_wait_s", 0.0))
        self.timeline.extend(metrics.get("timeline", []))

    def to_json(self) -> dict[str, Any]:
        done = sum(self.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
        extra: dict[str, Any] = {"top_errors": self.error_reasons} if self.error_reasons else {}
        if self.stopped:
            extra["stopped"] = self.stopped
        if self.error:
            extra["error"] = self.error
        if self.migration is not None:
            extra["migration"] = self.migration
        if self.deployments:
            extra["deployments"] = self.deployments
        counts = self.counts
        in_table = counts["prompt_tokens"] + counts["reused_tokens"] - counts["dropped_tokens"]
        return extra | {
            "run_id": self.run_id,
            "rows_ok": self.counts["ok_rows"],
            "rows_skipped": self.counts["skipped_rows"],
            "rows_failed": self.counts["failed_rows"],
            "rows_deduplicated": self.deduplicated,
            "chunks_deduplicated": counts["copied_chunks"],
            "rows_from_cache": self.from_cache,
            "cache_rows_added": self.cache_added,
            "requests": self.counts["requests"],
            "retries": self.counts["retries"],
            "throttled_429": self.counts["throttled"],
            "prompt_tokens": self.counts["prompt_tokens"],
            "tokens_in_table": in_table,
            "tokens_reused": counts["reused_tokens"],
            "tokens_billed": max(self.tokens_billed, self.counts["prompt_tokens"]),
            "failed_before": self.failed_before,
            "waves": self.waves,
            "limiter_wait_s": round(self.limiter_wait_s, 3),
            "pruned_ids": self.pruned,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(done / self.seconds, 1) if self.seconds else 0.0,
            "estimated_cost_usd": round(
                max(self.tokens_billed, self.counts["prompt_tokens"]) * self.price_per_million_tokens / 1e6, 6
            ),
        }

    def to_file(self) -> dict[str, Any]:
        """``summary.json``: :meth:`to_json` and what the report needs besides."""
        return self.to_json() | {
            "rows_total": self.rows_total,
            "tokens_per_minute": self.tokens_per_minute,
            "requests_per_minute": self.requests_per_minute,
            "total_tokens": self.counts["total_tokens"],
            "price_per_million_tokens": self.price_per_million_tokens,
            "error_reasons": self.error_reasons,
            "error_examples": self.error_examples,
        }

    @classmethod
    def from_file(cls, data: dict[str, Any]) -> RunSummary:
        """Inverse of :meth:`to_file`; keys an older ``summary.json`` lacks take their defaults.

        The timeline is not in the file (``timeline.json`` holds it).
        """
        prompt, reused = int(data.get("prompt_tokens", 0)), int(data.get("tokens_reused", 0))
        counts = dict.fromkeys(COUNTERS, 0) | {
            "ok_rows": int(data.get("rows_ok", 0)),
            "skipped_rows": int(data.get("rows_skipped", 0)),
            "failed_rows": int(data.get("rows_failed", 0)),
            "requests": int(data.get("requests", 0)),
            "retries": int(data.get("retries", 0)),
            "throttled": int(data.get("throttled_429", 0)),
            "prompt_tokens": prompt,
            "total_tokens": int(data.get("total_tokens", 0)),
            "reused_tokens": reused,
            "copied_chunks": int(data.get("chunks_deduplicated", 0)),
            "dropped_tokens": prompt + reused - int(data.get("tokens_in_table", prompt + reused)),
        }
        deployments = dict(data.get("deployments") or {})
        reasons = data.get("error_reasons") or data.get("top_errors") or {}
        pairs = reasons.items() if isinstance(reasons, dict) else reasons  # or [reason, rows] pairs
        return cls(
            run_id=str(data.get("run_id", "")),
            rows_total=int(data.get("rows_total", 0)),
            counts=counts,
            limiter_wait_s=float(data.get("limiter_wait_s", 0.0)),
            pruned=int(data.get("pruned_ids", 0)),
            seconds=float(data.get("seconds", 0.0)),
            price_per_million_tokens=float(data.get("price_per_million_tokens") or 0.0),
            tokens_per_minute=data.get("tokens_per_minute"),
            requests_per_minute=data.get("requests_per_minute"),
            error_reasons={str(reason): int(rows) for reason, rows in pairs},
            error_examples=dict(data.get("error_examples") or {}),
            tokens_billed=int(data.get("tokens_billed", prompt)),
            failed_before=int(data.get("failed_before", 0)),
            waves=int(data.get("waves", 0)),
            deduplicated=int(data.get("rows_deduplicated", 0)),
            from_cache=int(data.get("rows_from_cache", 0)),
            cache_added=int(data.get("cache_rows_added", 0)),
            stopped=data.get("stopped"),
            error=data.get("error"),
            migration=data.get("migration"),
            deployment_quotas={
                name: row.get("quota_tokens_per_minute") for name, row in deployments.items()
            },
            deployments=deployments,
        )

    @property
    def failed_fraction(self) -> float:
        done = sum(self.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
        return self.counts["failed_rows"] / done if done else 0.0
