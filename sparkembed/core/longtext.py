"""Texts over the model's input limit: chunk, mean, truncate or fail, decided before sending.

:class:`LongTextPlanner` turns source rows into *units* to send, and :func:`combine` turns the
units' results back into output rows. Texts within ``batching.max_input_tokens`` pass through
as one unit; blank texts pass through unchanged (the engine marks them skipped). Long ones
follow ``long_text.strategy``:

- ``chunk``: one unit and one output row per chunk, at most ``chunk_tokens`` tokens each
  (counted exactly on the chunk's own text), ``overlap_tokens`` shared with the next, cut at a
  paragraph, line, sentence or word end where one lies in the chunk's last half, else at a
  token boundary (CJK text, base64 blobs).
- ``mean``: the same chunks, combined into one output row: the token-weighted mean of the
  chunks' vectors, L2-renormalised, with their token usage summed.
- ``truncate``: one unit, the text's first ``max_input_tokens`` tokens.
- ``fail``: no unit is sent; the row is ``failed`` with ``input too long: N tokens > limit``.

Example::

    planner = LongTextPlanner(config)
    plan = planner.plan(texts)                 # plan.texts go to the engine, in order
    results = await engine.embed(plan.texts)   # one result per unit
    rows = combine(plan, results)              # columnar output rows, rows.row = source row
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

import numpy as np

from sparkembed.config import EmbedConfig
from sparkembed.core.batching import is_blank
from sparkembed.core.streaming import EmbedResults
from sparkembed.core.tokenizers import TokenCounter, counter_for
from sparkembed.core.types import Status

NO_OFFSET = -1
"""``chunk_start``/``chunk_end`` of an output row that stands for a whole text (null in tables)."""

_VERIFY_BATCH = 64
"""Chunks counted exactly per batch: a chunk over the limit re-proposes the ones after it."""
_SENTENCE_ENDS = ".!?…"
_CJK_SENTENCE_ENDS = "。！？"  # CJK sentences end without a following space
# Every code point for which str.isspace() is true lies below U+3001.
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


class Unit(NamedTuple):  # a tuple: built once per row, a third of a frozen dataclass's cost
    """One input to send: a whole text, a chunk ``text[start:end]`` of it, or nothing.

    Attributes:
        row: position of the source text in the planned sequence.
        chunk_index: 0 for a whole text, k for chunk k.
        start, end: char offsets of the chunk in the source text; None for a whole text.
        text: what to send; None (or a blank text) is never sent.
        tokens: the unit's tokens by the planner's counter (0 for blanks).
    """

    row: int
    chunk_index: int
    start: int | None
    end: int | None
    text: str | None
    tokens: int


@dataclass
class Plan:
    """The units for a sequence of texts, in row order (each row has at least one unit).

    Attributes:
        units: what to send, in order.
        unit_errors: unit position -> reason, for units that are failed without sending.
        strategy: the ``long_text.strategy`` that made the plan (``mean`` merges rows back).
    """

    units: list[Unit]
    unit_errors: dict[int, str] = field(default_factory=dict)
    strategy: str = "chunk"

    @property
    def texts(self) -> list[str | None]:
        """The units' texts, to hand to the engine."""
        return [unit.text for unit in self.units]

    @property
    def tokens(self) -> np.ndarray:
        """The units' token counts (int64), for packing requests."""
        return np.fromiter((u.tokens for u in self.units), dtype=np.int64, count=len(self.units))


class LongTextPlanner:
    """Plans units for texts under one config; see the module docstring.

    Args:
        config: reads ``batching.max_input_tokens`` and the ``long_text`` section.
        counter: the token counter; by default :func:`counter_for` the config's model.
    """

    __slots__ = ("counter", "strategy", "max_input_tokens", "chunk_tokens", "overlap_tokens")

    def __init__(self, config: EmbedConfig, counter: TokenCounter | None = None) -> None:
        self.counter = counter if counter is not None else counter_for(config)
        self.strategy = config.long_text.strategy
        self.max_input_tokens = config.batching.max_input_tokens
        # A chunk must also fit the model, and must leave room to move forward.
        self.chunk_tokens = min(config.long_text.chunk_tokens, self.max_input_tokens)
        self.overlap_tokens = min(config.long_text.overlap_tokens, self.chunk_tokens - 1)

    def plan(self, texts: Sequence[str | None]) -> Plan:
        """Units for ``texts``, in order; long texts follow the strategy."""
        units: list[Unit] = []
        errors: dict[int, str] = {}
        skip = [not isinstance(t, str) or is_blank(t) for t in texts]
        sendable = [t for t, s in zip(texts, skip, strict=True) if not s and isinstance(t, str)]
        counts = iter(self.counter.count_many(sendable).tolist())
        for row, text in enumerate(texts):
            if skip[row] or not isinstance(text, str):
                units.append(Unit(row, 0, None, None, text, 0))
                continue
            tokens = next(counts)
            if tokens <= self.max_input_tokens:
                units.append(Unit(row, 0, None, None, text, tokens))
            elif self.strategy == "fail":
                errors[len(units)] = self._too_long(tokens)
                units.append(Unit(row, 0, None, None, None, tokens))
            elif self.strategy == "truncate":
                ends = self.counter.boundaries(text)
                end, kept = _truncate(text, ends, self.counter, self.max_input_tokens)
                units.append(Unit(row, 0, 0, end, text[:end], kept))
            else:
                chunker = _Chunker(text, self.counter, self.chunk_tokens, self.overlap_tokens)
                units.extend(
                    Unit(row, k, start, end, text[start:end], kept)
                    for k, ((start, end), kept) in enumerate(chunker.chunks())
                )
        return Plan(units, errors, self.strategy)

    def _too_long(self, tokens: int) -> str:
        reason = f"input too long: {tokens} tokens > {self.max_input_tokens}"
        if not self.counter.exact:
            reason += " (UTF-8 bytes, an upper bound: no tokenizer available for this model)"
        return reason


def _tokens_between(ends: np.ndarray, start: int, end: int) -> int:
    """Tokens that overlap ``[start, end)``: those ending in ``(start, end]``, plus one that
    ``end`` falls inside. Re-tokenizing the slice on its own gives about as many."""
    inside = int(ends.searchsorted(end, "right") - ends.searchsorted(start, "right"))
    cut_inside = end < ends[-1] and not _is_boundary(ends, end)
    return inside + int(cut_inside)


def _is_boundary(ends: np.ndarray, position: int) -> bool:
    index = int(ends.searchsorted(position))
    return index < len(ends) and int(ends[index]) == position


def _end_within(ends: np.ndarray, first: int, budget: int) -> int:
    """The furthest token end reached by at most ``budget`` tokens from token ``first``.

    Always past token ``first``'s start: at least one token (or one character) is taken.
    """
    last = min(first + max(budget, 1), len(ends)) - 1
    end = int(ends[last])
    if last + 1 < len(ends) and int(ends[last + 1]) == end:
        # Byte pieces of one character end together: stop before that character.
        before = int(ends.searchsorted(end)) - 1
        if before >= first:
            end = int(ends[before])
    return end


def _truncate(text: str, ends: np.ndarray, counter: TokenCounter, limit: int) -> tuple[int, int]:
    """End offset and exact tokens of the longest prefix of at most ``limit`` tokens."""
    budget = limit
    while True:
        end = _end_within(ends, 0, budget)
        tokens = counter.count(text[:end])
        if tokens <= limit or budget <= 1:
            return end, tokens
        budget = min(budget, _tokens_between(ends, 0, end)) - (tokens - limit)


class _Cuts:
    """Where a chunk may end (best first) and where an overlapping chunk may start."""

    __slots__ = ("ends_by_level", "word_starts")

    def __init__(self, text: str) -> None:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        space = np.isin(points, _WHITESPACE)
        # A chunk ends just before a run of whitespace, so it ends on its last word.
        word_ends = np.flatnonzero(space[1:] & ~space[:-1]) + 1
        self.word_starts = np.flatnonzero(space[:-1] & ~space[1:]) + 1
        non_space = np.flatnonzero(~space)
        run_ends = non_space[np.minimum(non_space.searchsorted(word_ends), non_space.size - 1)]
        run_ends = np.where(run_ends > word_ends, run_ends, len(text))
        newlines = np.concatenate(([0], np.cumsum(points == 10)))
        breaks = newlines[run_ends] - newlines[word_ends]
        sentence = np.isin(points[word_ends - 1], _code_points(_SENTENCE_ENDS))
        cjk = np.flatnonzero(np.isin(points[:-1], _code_points(_CJK_SENTENCE_ENDS)) & ~space[1:])
        self.ends_by_level = (
            word_ends[breaks >= 2],  # paragraph
            word_ends[breaks == 1],  # line
            np.union1d(word_ends[(breaks == 0) & sentence], cjk + 1),  # sentence
            word_ends[(breaks == 0) & ~sentence],  # word
        )

    def best_end(self, low: int, high: int) -> int | None:
        """The last cut in ``(low, high]`` of the best level that has one."""
        for cuts in self.ends_by_level:
            index = int(cuts.searchsorted(high, "right")) - 1
            if index >= 0 and cuts[index] > low:
                return int(cuts[index])
        return None

    def nearest_start(self, target: int, low: int, high: int) -> int | None:
        """The word start in ``[low, high]`` nearest to ``target``."""
        index = int(self.word_starts.searchsorted(target))
        near = [
            int(self.word_starts[i])
            for i in (index - 1, index)
            if 0 <= i < self.word_starts.size and low <= self.word_starts[i] <= high
        ]
        return min(near, key=lambda start: abs(start - target), default=None)


def _code_points(chars: str) -> np.ndarray:
    return np.array([ord(c) for c in chars], dtype=np.uint32)


class _Chunker:
    """Cuts one long text into overlapping spans of at most ``chunk_tokens`` exact tokens.

    Spans are proposed from the whole text's token boundaries, then counted exactly on their
    own text, a batch at a time. A slice can tokenize a little differently than in context:
    a span over the limit is proposed again with fewer tokens, the spans after it too, and
    later spans keep that much room (``margin``).
    """

    __slots__ = ("text", "ends", "counter", "chunk_tokens", "overlap_tokens", "cuts", "margin")

    def __init__(self, text: str, counter: TokenCounter, chunk_tokens: int, overlap: int) -> None:
        self.text = text
        self.ends = counter.boundaries(text)
        self.counter = counter
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap
        self.cuts = _Cuts(text)
        self.margin = 0

    def chunks(self) -> list[tuple[tuple[int, int], int]]:
        """``((start, end), exact tokens)`` per chunk, in order; together they cover the text."""
        done: list[tuple[tuple[int, int], int]] = []
        budget = self.chunk_tokens
        proposals = self._propose(0, budget, 0)
        while batch := list(islice(proposals, _VERIFY_BATCH)):
            exact = self.counter.count_many([self.text[s:e] for s, e in batch]).tolist()
            for span, tokens in zip(batch, exact, strict=True):
                if tokens > self.chunk_tokens and budget > 1:
                    break
                done.append((span, tokens))
                budget = self.chunk_tokens - self.margin
            else:
                continue
            excess = tokens - self.chunk_tokens
            self.margin = min(self.margin + excess, self.chunk_tokens // 4)
            budget = max(1, min(budget, _tokens_between(self.ends, *span)) - excess)
            proposals = self._propose(span[0], budget, done[-1][0][1] if done else 0)
        return done

    def _propose(self, start: int, budget: int, previous_end: int) -> Iterator[tuple[int, int]]:
        """Spans from ``start`` to the end of the text, by the whole text's token boundaries.

        The first span gets ``budget`` tokens, the others ``chunk_tokens - margin``. Every
        span ends past ``previous_end`` (the end of the one before it): chunks move forward.
        """
        ends, size = self.ends, len(self.text)
        while True:
            first = int(ends.searchsorted(start, "right"))
            if len(ends) - first <= budget:
                yield start, size
                return
            end = _end_within(ends, first, budget)
            if end <= previous_end:
                # A shrunken budget cannot reach past the previous chunk: drop the overlap.
                start = previous_end
                first = int(ends.searchsorted(start, "right"))
                end = _end_within(ends, first, budget)
            half = int(ends[min(first + budget // 2, len(ends)) - 1]) if budget > 1 else start
            end = self.cuts.best_end(max(half, previous_end, start), end) or end
            yield start, end
            if end == size:  # only zero-width byte pieces were left
                return
            start, previous_end = self._overlap_start(start, end), end
            budget = self.chunk_tokens - self.margin

    def _overlap_start(self, start: int, end: int) -> int:
        """Where the chunk after ``[start, end)`` starts: ~``overlap_tokens`` before ``end``."""
        if self.overlap_tokens == 0:
            return end
        ends = self.ends
        ended = int(ends.searchsorted(end, "right"))
        target = ended - self.overlap_tokens
        # Snap to a word start within a quarter of the overlap, keeping the next chunk's
        # share of new text above half its budget.
        slack = max(1, min(self.overlap_tokens // 4, (self.chunk_tokens - self.overlap_tokens) // 2))
        low = int(ends[target - slack - 1]) if target - slack >= 1 else 0
        high = int(ends[min(target + slack, ended) - 1]) if target + slack >= 1 else 0
        exact = int(ends[target - 1]) if target >= 1 else 0
        snapped = self.cuts.nearest_start(exact, low, min(high, end))
        chosen = snapped if snapped is not None else exact
        if chosen <= start:  # always move forward
            chosen = min(int(ends[ends.searchsorted(start, "right")]), end)
        return chosen


@dataclass
class Combined(EmbedResults):
    """Output rows: the engine's result columns plus where each row comes from.

    Attributes:
        row: int64 source row of each output row.
        chunk_index: int32, 0 for a whole text.
        chunk_start, chunk_end: int64 char offsets into the source text, :data:`NO_OFFSET`
            for a row that stands for the whole text.
    """

    row: np.ndarray
    chunk_index: np.ndarray
    chunk_start: np.ndarray
    chunk_end: np.ndarray


def combine(plan: Plan, results: EmbedResults) -> Combined:
    """Output rows from the results of ``plan.units`` (one result per unit, in order).

    Units in ``plan.unit_errors`` become ``failed`` with that reason. Under ``mean`` each
    source row becomes one output row: see :func:`_mean_rows`; otherwise each unit is one.

    Raises:
        ValueError: ``results`` does not hold one result per unit.
    """
    units = plan.units
    if len(results.status) != len(units) or len(results.vectors) != len(units):
        raise ValueError(f"expected results for {len(units)} units, got {len(results.status)}")
    status, error, vectors = list(results.status), list(results.error), results.vectors
    if plan.unit_errors:
        vectors = vectors.copy()
        for position, reason in plan.unit_errors.items():
            status[position], error[position] = Status.FAILED, reason
            vectors[position] = 0
    combined = Combined(
        row=np.fromiter((u.row for u in units), dtype=np.int64, count=len(units)),
        chunk_index=np.fromiter((u.chunk_index for u in units), dtype=np.int32, count=len(units)),
        chunk_start=_offsets(u.start for u in units),
        chunk_end=_offsets(u.end for u in units),
        vectors=vectors,
        status=status,
        error=error,
        prompt_tokens=np.asarray(results.prompt_tokens, dtype=np.int64),
        total_tokens=np.asarray(results.total_tokens, dtype=np.int64),
        attempts=np.asarray(results.attempts, dtype=np.int32),
        request_id=list(results.request_id),
        model=list(results.model),
        deployment=list(results.deployment),
    )
    if plan.strategy != "mean" or not units:
        return combined
    return _mean_rows(combined, plan.tokens)


def _offsets(values: Iterable[int | None]) -> np.ndarray:
    return np.array([NO_OFFSET if v is None else v for v in values], dtype=np.int64)


def _mean_rows(units: Combined, tokens: np.ndarray) -> Combined:
    """One output row per source row from its units' rows.

    A row with one unit keeps that unit's result unchanged. A row of chunks gets the
    token-weighted mean of its ok chunks' vectors, L2-renormalised; tokens summed, the most
    attempts, the first chunk's request id, model and deployment. It is ``failed`` with the first failed
    chunk's error if any chunk failed; blank chunks (whitespace runs) are left out.
    """
    n = len(units)
    firsts = np.flatnonzero(np.concatenate(([True], units.row[1:] != units.row[:-1])))
    sizes = np.diff(np.append(firsts, n))
    status = np.asarray(units.status)
    ok = status == Status.OK.value
    weights = np.where(ok, tokens, 0).astype(np.float64)
    vectors = units.vectors[firsts].copy()
    chunked = np.flatnonzero(sizes > 1)
    if chunked.size and vectors.shape[1]:
        sums = np.add.reduceat(units.vectors * weights[:, None], firsts)[chunked]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        vectors[chunked] = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    out_status: list[str] = []
    out_error: list[str | None] = []
    for first, size in zip(firsts.tolist(), sizes.tolist(), strict=True):
        group = slice(first, first + size)
        failed = [i for i in range(first, first + size) if status[i] == Status.FAILED]
        if failed:
            out_status.append(Status.FAILED)
            out_error.append(units.error[failed[0]])
        elif ok[group].any():
            out_status.append(Status.OK)
            out_error.append(None)
        else:
            out_status.append(str(status[first]))
            out_error.append(units.error[first])
    vectors[np.asarray(out_status) != Status.OK.value] = 0
    return Combined(
        row=units.row[firsts],
        chunk_index=np.zeros(len(firsts), dtype=np.int32),
        chunk_start=np.full(len(firsts), NO_OFFSET, dtype=np.int64),
        chunk_end=np.full(len(firsts), NO_OFFSET, dtype=np.int64),
        vectors=vectors.astype(np.float32, copy=False),
        status=out_status,
        error=out_error,
        prompt_tokens=np.add.reduceat(units.prompt_tokens, firsts),
        total_tokens=np.add.reduceat(units.total_tokens, firsts),
        attempts=np.maximum.reduceat(units.attempts, firsts),
        request_id=[units.request_id[i] for i in firsts],
        model=[units.model[i] for i in firsts],
        deployment=[units.deployment[i] for i in firsts],
    )
