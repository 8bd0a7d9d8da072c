"""How the rows to do are cut into waves, each committed on its own.

A row's wave is decided by a hash bucket of its id, ``pmod(xxhash64(id), BUCKETS)`` (of its
group instead, for long texts that share a chunk: see ``sparkembed.spark.chunkgroups``):
each wave takes the next range of buckets. A wave is sized so that it holds at most
``run.commit_every_rows`` rows, about ``run.commit_every_tokens`` estimated tokens, and,
when the quota is known, about ``run.commit_every_seconds`` of work at that quota.
After each wave, the range shrinks if the wave took longer or billed more than that,
so a slow endpoint or an unknown quota still gives short waves: a crash, a kill or a
Ctrl-C never strands more than one short wave of paid work.

    planner = WavePlanner(rows=10_000, tokens=550_000, limits=WaveLimits(tokens_per_minute=2_000))
    while (wave := planner.next_wave()) is not None:
        lo, hi = wave          # rows whose bucket is in [lo, hi)
        ...
        planner.record(seconds=elapsed, tokens=billed)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUCKETS = 1 << 20


@dataclass(frozen=True)
class WaveLimits:
    """What one wave may hold (``run.commit_every_*``), and the job's TPM quota if known."""

    rows: int = 50_000
    tokens: int = 5_000_000
    seconds: float = 300.0
    tokens_per_minute: int | None = None


class WavePlanner:
    """Hands out bucket ranges, one per wave, sized by :class:`WaveLimits`.

    Args:
        rows: rows to do.
        tokens: their estimated tokens.
        limits: the bounds of one wave.
    """

    __slots__ = ("_limits", "_width", "_next", "_started")

    def __init__(self, rows: int, tokens: int, limits: WaveLimits) -> None:
        self._limits = limits
        waves = max(1, math.ceil(rows / limits.rows), math.ceil(tokens / limits.tokens))
        if limits.tokens_per_minute:
            seconds = tokens / limits.tokens_per_minute * 60
            waves = max(waves, math.ceil(seconds / limits.seconds))
        self._width = max(1, math.ceil(BUCKETS / min(waves, BUCKETS)))
        self._next = 0
        self._started = 0

    @property
    def whole(self) -> bool:
        """One wave holds every row: no filter is needed."""
        return self._width >= BUCKETS

    @property
    def waves_done(self) -> int:
        return self._started

    @property
    def waves_planned(self) -> int:
        """Waves started plus those still to come at the current width."""
        return self._started + math.ceil((BUCKETS - self._next) / self._width)

    def next_wave(self) -> tuple[int, int] | None:
        """The next wave's bucket range ``[lo, hi)``, or None when every bucket is done."""
        if self._next >= BUCKETS:
            return None
        lo, self._next = self._next, min(BUCKETS, self._next + self._width)
        self._started += 1
        return lo, self._next

    def record(self, *, seconds: float, tokens: int) -> None:
        """Learn from the wave just done: narrow the next ones if it ran long or billed much."""
        factor = 1.0
        if seconds > self._limits.seconds:
            factor = min(factor, self._limits.seconds / seconds)
        if tokens > self._limits.tokens:
            factor = min(factor, self._limits.tokens / tokens)
        if factor < 1.0:
            self._width = max(1, math.floor(self._width * factor))
