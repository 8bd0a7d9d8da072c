"""Run metrics: counters for the run summary and a per-attempt request timeline.

A :class:`Metrics` is written by the engine's event loop while a stream runs and
read after it ends. Executors' metrics are combined with :meth:`Metrics.merge`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sparkembed.core.types import Status


@dataclass(frozen=True)
class RequestRecord:
    """One HTTP attempt.

    Attributes:
        start_s: wall-clock send time, seconds since the epoch.
        end_s: wall-clock time the answer (or error) arrived, seconds since the epoch.
        n_inputs: texts in the request.
        prompt_tokens: reported usage; 0 unless the attempt succeeded.
        status: HTTP status; 0 when there was no HTTP answer (timeout, reset).
        attempt: 1 for the first try of a request, 2 for its first retry, ...
        deployment: the deployment it went to ("" in logs from before pools).
    """

    start_s: float
    end_s: float
    n_inputs: int
    prompt_tokens: int
    status: int
    attempt: int
    deployment: str = ""


@dataclass
class Metrics:
    """Counters for one stream, a task, or (merged) a whole run.

    Attributes:
        requests: HTTP attempts sent, retries included.
        retries: attempts beyond the first of their request.
        throttled: attempts answered 429.
        prompt_tokens: reported ``usage.prompt_tokens`` summed over successful responses.
        total_tokens: reported ``usage.total_tokens``, likewise.
        ok_rows, failed_rows, skipped_rows: rows by final status.
        limiter_wait_s: seconds requests spent waiting on the rate limiter (summed over requests).
        dropped_tokens: billed tokens of rows a stopping run left out (texts it did not finish).
        reused_tokens: tokens of rows filled from an earlier attempt's answers (billed then).
        unsent_rows: output rows a stopping run left out, not sent (the next run embeds them).
        copied_chunks: long-text units not sent because their task had sent the same text
            (:mod:`sparkembed.core.chunkdedup`).
        timeline: one :class:`RequestRecord` per attempt.
        on_record: called after each attempt is counted (on the engine's loop: keep it quick).
    """

    requests: int = 0
    retries: int = 0
    throttled: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0
    ok_rows: int = 0
    failed_rows: int = 0
    skipped_rows: int = 0
    limiter_wait_s: float = 0.0
    dropped_tokens: int = 0
    reused_tokens: int = 0
    unsent_rows: int = 0
    copied_chunks: int = 0
    timeline: list[RequestRecord] = field(default_factory=list)
    on_record: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def record(self, record: RequestRecord, *, total_tokens: int = 0) -> None:
        """Count one finished attempt."""
        self.requests += 1
        self.retries += record.attempt > 1
        self.throttled += record.status == 429
        self.prompt_tokens += record.prompt_tokens
        self.total_tokens += total_tokens
        self.timeline.append(record)
        if self.on_record is not None:
            self.on_record()

    def count_rows(self, status: list[str], sign: int = 1) -> None:
        """Count final row statuses of one finished chunk (``sign=-1`` takes them back)."""
        ok = status.count(Status.OK)
        skipped = status.count(Status.SKIPPED)
        self.ok_rows += sign * ok
        self.skipped_rows += sign * skipped
        self.failed_rows += sign * (len(status) - ok - skipped)

    def merge(self, other: Metrics) -> None:
        """Add ``other``'s counters and timeline into this one, in place."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.timeline.extend(other.timeline)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        metrics = cls(**{name: data[name] for name in _SUMMED if name in data})
        metrics.timeline = [RequestRecord(**r) for r in data.get("timeline", [])]
        return metrics

    def to_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        """Plain dict for the run summary; the timeline only on request (it can be long)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _SUMMED}
        out["limiter_wait_s"] = round(self.limiter_wait_s, 3)
        if timeline:
            out["timeline"] = [asdict(r) for r in self.timeline]
        return out


COUNTERS = (
    "requests",
    "retries",
    "throttled",
    "prompt_tokens",
    "total_tokens",
    "ok_rows",
    "failed_rows",
    "skipped_rows",
    "dropped_tokens",
    "reused_tokens",
    "unsent_rows",
    "copied_chunks",
)
"""The integer counters of a :class:`Metrics`, which a run summary adds up: defined here only."""
_SUMMED = (*COUNTERS, "limiter_wait_s")
