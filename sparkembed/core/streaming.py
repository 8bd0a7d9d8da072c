"""The caller's side of the engine: rows in, requests out, and results back per chunk.

:class:`RowStream` runs on the thread that owns the input iterator (a Spark task).
It skips blank rows, packs the rest into requests across chunk boundaries, hands
each request to ``send`` (which runs it on the engine's event loop), keeps at most
``concurrency`` of them in flight, and scatters every answered :class:`Segment`
back into the :class:`ChunkAssembly` of the chunks its rows came from.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sparkembed.core.batching import SKIPPED_EMPTY, Packer, apportion, is_blank
from sparkembed.core.metrics import Metrics
from sparkembed.core.tokens import estimate_tokens
from sparkembed.core.types import BackendResponse, Status
from sparkembed.errors import SparkEmbedError

if TYPE_CHECKING:
    from sparkembed.core.answers import Answer, AnswerLog


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, stop)`` of a request's batch, answered by one request or failed together.

    Attributes:
        attempts: HTTP attempts of the request (0: never sent).
        response: the answer, when ok.
        error: why the rows failed, when not.
        failure: the last error, for bisection and for preflight to raise.
        unsent: the run is stopping and the rows were not sent (they are neither ok nor failed).
        deployment: the deployment that answered (when failed: the last one tried).
    """

    start: int
    stop: int
    attempts: int
    response: BackendResponse | None = None
    error: str | None = None
    failure: SparkEmbedError | None = None
    unsent: bool = False
    deployment: str | None = None


Send = Callable[[list[str], np.ndarray], "concurrent.futures.Future[list[Segment]]"]
"""Starts one batch (texts, estimated tokens per text); its future gives segments covering it."""


@dataclass
class EmbedResults:
    """Per-row results, columnar, in the order of one input chunk.

    Attributes:
        vectors: float32 ``(n, d)``; rows that are not ok are zeros; ``d`` is 0 when unknown.
        status: ``ok``, ``skipped`` or ``failed`` per row; :attr:`Status.UNSENT` when the run stopped.
        error: None when ok, else the reason (``400 context_length_exceeded: ...``).
        prompt_tokens: int64 share of the request's reported usage (shares sum exactly).
        total_tokens: int64, likewise.
        attempts: int32 HTTP attempts of the request that produced the row (0 if skipped).
        request_id: the response ``id`` of that request.
        model: the model the service reported.
        deployment: the deployment of a pool that served the row (when failed: the last one tried).
    """

    vectors: np.ndarray
    status: list[str]
    error: list[str | None]
    prompt_tokens: np.ndarray
    total_tokens: np.ndarray
    attempts: np.ndarray
    request_id: list[str | None]
    model: list[str | None]
    deployment: list[str | None]

    def __len__(self) -> int:
        return len(self.status)


class ChunkAssembly:
    """The results of one input chunk, filled in as its requests finish (any order)."""

    __slots__ = ("pending", "_n", "_filled", "_vectors", "_results")

    def __init__(self, n: int) -> None:
        self.pending = n
        self._n = n
        self._filled = 0  # ok rows, whose vectors are set
        self._vectors: np.ndarray | None = None  # allocated once the vector size is known
        self._results = EmbedResults(
            vectors=np.zeros((n, 0), dtype=np.float32),
            status=[Status.FAILED] * n,
            error=[None] * n,
            prompt_tokens=np.zeros(n, dtype=np.int64),
            total_tokens=np.zeros(n, dtype=np.int64),
            attempts=np.zeros(n, dtype=np.int32),
            request_id=[None] * n,
            model=[None] * n,
            deployment=[None] * n,
        )

    @property
    def done(self) -> bool:
        return self.pending == 0

    def finish_rows(self, rows: Sequence[int], status: str, error: str | None) -> None:
        """Mark rows without a vector: ``skipped`` or ``failed`` with the reason."""
        r = self._results
        for row in rows:
            r.status[row] = status
            r.error[row] = error
        self.pending -= len(rows)

    def fail(self, rows: np.ndarray, error: str, attempts: int, deployment: str | None = None) -> None:
        """Mark rows failed with ``error`` after ``attempts`` HTTP attempts (the last to ``deployment``)."""
        self._results.attempts[rows] = attempts
        for row in rows.tolist():
            self._results.deployment[row] = deployment
        self.finish_rows(rows.tolist(), Status.FAILED, error)

    def fill(
        self,
        rows: np.ndarray,
        vectors: np.ndarray,
        prompt_tokens: np.ndarray,
        total_tokens: np.ndarray,
        *,
        attempts: int,
        request_id: str | None,
        model: str | None,
        deployment: str | None = None,
    ) -> None:
        """Store ok rows: ``vectors[i]`` belongs to ``rows[i]``."""
        if self._vectors is None:
            # Not np.zeros: ok rows are overwritten anyway, and the others are zeroed at the
            # end, so most chunks never write a zero into their megabytes of vectors.
            self._vectors = np.empty((self._n, vectors.shape[1]), dtype=np.float32)
        r = self._results
        first, count = int(rows[0]), len(rows)
        self._filled += count
        r.prompt_tokens[rows] = prompt_tokens
        r.total_tokens[rows] = total_tokens
        r.attempts[rows] = attempts
        if int(rows[-1]) - first + 1 == count and np.all(np.diff(rows) == 1):
            # The usual case, consecutive rows: a memcpy, and list slices set in C.
            self._vectors[first : first + count] = vectors
            span = slice(first, first + count)
            r.request_id[span] = [request_id] * count
            r.model[span] = [model] * count
            r.deployment[span] = [deployment] * count
            r.status[span] = [Status.OK] * count
            r.error[span] = [None] * count
            self.pending -= count
            return
        self._vectors[rows] = vectors
        for row in rows.tolist():
            r.request_id[row] = request_id
            r.model[row] = model
            r.deployment[row] = deployment
        self.finish_rows(rows.tolist(), Status.OK, None)

    def results(self, dims: int | None) -> EmbedResults:
        """The finished results; ``dims`` sizes the zero vectors when no row is ok."""
        if self._vectors is not None:
            if self._filled < self._n:  # rows that are not ok get zero vectors
                self._vectors[[status != Status.OK for status in self._results.status]] = 0
            self._results.vectors = self._vectors
        elif dims:
            self._results.vectors = np.zeros((self._n, dims), dtype=np.float32)
        return self._results


_Row = tuple[ChunkAssembly, int, str, int]
"""(chunk, row in chunk, text, estimated tokens)."""


class RowStream:
    """Pack rows of successive chunks into requests; yield chunk results in input order.

    Args:
        send: starts one batch on the engine's loop.
        max_inputs: inputs per request.
        max_request_tokens: estimated tokens per request.
        concurrency: requests in flight at most.
        dimensions: the vector size, if known, for chunks with no ok row.
        metrics: row counts go here.
        stop: true once the run is stopping: rows not yet sent end :attr:`Status.UNSENT`.
        answers: where answered requests are kept, and earlier attempts' answers looked up
            (:mod:`sparkembed.core.answers`); texts found there are filled without being sent.
    """

    def __init__(
        self,
        send: Send,
        *,
        max_inputs: int,
        max_request_tokens: int,
        concurrency: int,
        dimensions: Callable[[], int | None],
        metrics: Metrics,
        stop: Callable[[], bool] = lambda: False,
        answers: AnswerLog | None = None,
    ) -> None:
        self._send = send
        self._stop = stop
        self._answers = answers
        self._packer: Packer[_Row] = Packer(max_inputs=max_inputs, max_request_tokens=max_request_tokens)
        self._concurrency = concurrency
        self._dimensions = dimensions
        self._metrics = metrics
        self._chunks: deque[ChunkAssembly] = deque()
        self._inflight: dict[concurrent.futures.Future[list[Segment]], list[_Row]] = {}

    def feed(self, texts: Sequence[Any], tokens: Sequence[int] | None = None) -> None:
        """Take one input chunk: skip blanks, fail non-text, pack the rest.

        ``tokens`` are exact counts per text when known; otherwise they are estimated.

        Blocks while ``concurrency`` requests are in flight.
        """
        chunk = ChunkAssembly(len(texts))
        self._chunks.append(chunk)
        blank, not_text = [], []
        costs = tokens.tolist() if isinstance(tokens, np.ndarray) else tokens  # ints, not numpy scalars
        for row, text in enumerate(texts):
            if is_blank(text):
                blank.append(row)
            elif not isinstance(text, str):
                not_text.append(row)
            elif self._answers is not None and (known := self._answers.lookup(text)) is not None:
                _fill_known(chunk, row, known)
                self._metrics.reused_tokens += known.prompt_tokens
            else:
                cost = int(costs[row]) if costs is not None else estimate_tokens(text)
                if batch := self._packer.add((chunk, row, text, cost), cost):
                    self._submit(batch)
        chunk.finish_rows(blank, Status.SKIPPED, SKIPPED_EMPTY)
        for row in not_text:
            chunk.finish_rows([row], Status.FAILED, f"input is {type(texts[row]).__name__}, not text")

    def ready(self) -> Iterator[EmbedResults]:
        """Yield finished chunks from the front, in input order."""
        while self._chunks and self._chunks[0].done:
            results = self._chunks.popleft().results(self._dimensions())
            self._metrics.count_rows(results.status)
            yield results

    def finish(self) -> Iterator[EmbedResults]:
        """Send the last partial request, then drain everything in flight."""
        if last := self._packer.flush():
            self._submit(last)
        while self._inflight:
            self._wait_one()
            yield from self.ready()
        yield from self.ready()

    def cancel(self) -> None:
        """Abandon the requests still in flight (the consumer stopped, or one raised)."""
        for future in self._inflight:
            future.cancel()
        self._inflight.clear()

    def _submit(self, batch: list[_Row]) -> None:
        while len(self._inflight) >= self._concurrency:
            self._wait_one()
        if self._stop():
            for chunk, positions in _runs_by_chunk(batch):
                chunk.finish_rows(positions.tolist(), Status.UNSENT, None)
            return
        texts = [row[2] for row in batch]
        estimates = np.fromiter((row[3] for row in batch), dtype=np.int64, count=len(batch))
        self._inflight[self._send(texts, estimates)] = batch

    def _wait_one(self) -> None:
        done, _ = concurrent.futures.wait(self._inflight, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            batch = self._inflight.pop(future)
            for segment in future.result():  # raises config errors and quota "stop"
                _scatter(batch[segment.start : segment.stop], segment, self._answers)


def _fill_known(chunk: ChunkAssembly, row: int, known: Answer) -> None:
    """A text an earlier attempt of this task was answered for: its row, without a request."""
    chunk.fill(
        np.array([row]),
        known.vector[None, :],
        np.array([known.prompt_tokens]),
        np.array([known.total_tokens]),
        attempts=known.attempts,
        request_id=known.request_id,
        model=known.model,
        deployment=known.deployment,
    )


def _scatter(rows: list[_Row], segment: Segment, answers: AnswerLog | None = None) -> None:
    """Store one segment's outcome into the chunks its rows came from (and keep it, if asked)."""
    response = segment.response
    if response is not None:
        weights = [row[3] for row in rows]
        prompt = apportion(response.prompt_tokens, weights)
        total = apportion(response.total_tokens, weights)
        if answers is not None:
            answers.record(
                [row[2] for row in rows], response.vectors, prompt, total,
                attempts=segment.attempts, request_id=response.request_id, model=response.model,
                deployment=segment.deployment,
            )  # fmt: skip
    offset = 0
    for chunk, positions in _runs_by_chunk(rows):
        part = slice(offset, offset + len(positions))
        offset += len(positions)
        if segment.unsent:
            chunk.finish_rows(positions.tolist(), Status.UNSENT, None)
            continue
        if response is None:
            chunk.fail(positions, segment.error or "failed", segment.attempts, segment.deployment)
            continue
        chunk.fill(
            positions,
            response.vectors[part],
            prompt[part],
            total[part],
            attempts=segment.attempts,
            request_id=response.request_id,
            model=response.model,
            deployment=segment.deployment,
        )


def _runs_by_chunk(rows: list[_Row]) -> Iterator[tuple[ChunkAssembly, np.ndarray]]:
    """Consecutive rows of the same chunk, as (chunk, row positions)."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][0] is not rows[start][0]:
            positions = np.fromiter((r[1] for r in rows[start:i]), dtype=np.int64)
            yield rows[start][0], positions
            start = i
