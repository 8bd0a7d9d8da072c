"""Spark glue: run the engine over each partition with ``mapInArrow``.

``mapInArrow`` (Spark 3.3+) streams a partition as Arrow record batches and lets
the output row count differ from the input's, so requests span batch
boundaries and one text may become several chunk rows. Vectors go from numpy
to Arrow as one flat float32 buffer: no Python float objects.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import TaskContext
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from sparkembed.backends import make_backend
from sparkembed.backends.transport import hide_bridge_traffic
from sparkembed.config import EmbedConfig
from sparkembed.core.answers import AnswerLog
from sparkembed.core.budget import BudgetGuard
from sparkembed.core.chunkdedup import ChunkDedup, Split, dedup_of_rows
from sparkembed.core.context import RunContext
from sparkembed.core.engine import Embedder, get_embedder
from sparkembed.core.longtext import NO_OFFSET, Combined, LongTextPlanner, Plan, combine
from sparkembed.core.metrics import Metrics
from sparkembed.core.runlog import TaskLog, attempt_name, read_spend, wave_lock
from sparkembed.core.streaming import EmbedResults
from sparkembed.core.types import Status

OUTPUT_FIELDS = (
    ("chunk_index", T.IntegerType()),
    ("chunk_start", T.IntegerType()),
    ("chunk_end", T.IntegerType()),
    ("text_hash", T.StringType()),
    ("embedding", T.ArrayType(T.FloatType())),
    ("dimensions", T.IntegerType()),
    ("model", T.StringType()),
    ("input_type", T.StringType()),
    ("prompt_tokens", T.LongType()),
    ("total_tokens", T.LongType()),
    ("status", T.StringType()),
    ("error", T.StringType()),
    ("attempts", T.IntegerType()),
    ("request_id", T.StringType()),
    ("run_id", T.StringType()),
    ("embedded_at", T.TimestampType()),
    ("embedding_fingerprint", T.StringType()),
)
DEDUP_OF = "dedup_of"
"""Null when the row's text was sent; else the id whose request paid for the same text."""
CACHED_FROM = "cached_from"
"""Null unless the row's vector came from the cache (``cache.path``); then the run that paid for it."""
LATER_FIELDS: tuple[tuple[str, T.DataType | None], ...] = (
    ("deployment", T.StringType()),
    (DEDUP_OF, None),
    (CACHED_FROM, T.StringType()),
)
"""Columns added since the first tables were written: they come last, after the passthrough
columns, where adding them to an existing table puts them (see :func:`add_new_columns`).
A type of None: the id column's type."""


def output_schema(input_schema: T.StructType, id_col: str, passthrough: tuple[str, ...]) -> T.StructType:
    """The output table: id, the fixed columns of DESIGN.md, passthrough columns, then the
    columns added since (:data:`LATER_FIELDS`)."""
    id_type = input_schema[id_col].dataType
    fields = [input_schema[id_col]]
    fields += [T.StructField(name, dtype, nullable=True) for name, dtype in OUTPUT_FIELDS]
    fields += [input_schema[c] for c in passthrough]
    fields += [T.StructField(name, dtype or id_type, nullable=True) for name, dtype in LATER_FIELDS]
    return T.StructType(fields)


@dataclass(frozen=True)
class PartitionJob:
    """Everything an executor needs; pickled into the task closure, never into Spark conf."""

    config: EmbedConfig
    context: RunContext
    id_col: str
    text_col: str
    passthrough: tuple[str, ...]
    arrow_schema: pa.Schema
    run_dir: str | None = None
    """The run's shared folder (:mod:`sparkembed.core.runlog`); None: no spend files, no stop."""
    wave: int = 0

    def embed_batches(
        self, batches: Iterator[pa.RecordBatch], metrics: Metrics | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Output record batches for a partition's input batches, in input order.

        When the driver asks the run to stop, rows not yet sent leave no output row
        (nor do the other chunks of their text): the next run embeds them. When this is the
        retry of an attempt whose Python worker died, what that attempt was answered is
        reused (:mod:`sparkembed.core.answers`).
        """
        metrics = metrics if metrics is not None else Metrics()
        embedder = get_embedder(self.config, make_backend, self.context.quota_share)
        if self.run_dir is None:
            yield from self._embed(embedder, batches, metrics, lambda: False)
            return
        ctx = TaskContext.get()
        part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
        answers = AnswerLog(Path(self.run_dir).parent, self.context.run_id, (self.wave, part, attempt))
        guards: list[BudgetGuard] = []  # the spend file publishes the guard's reservations
        reserved = lambda: guards[0].reserved if guards else 0  # noqa: E731
        task_log = TaskLog(
            self.run_dir,
            _attempt_name(self.wave),
            metrics,
            reserved=reserved,
            pacers=embedder.limiters,
            wave=self.wave,
            expected=self.context.workers,
            earlier_billed={attempt_name(self.wave, part, a): t for a, t in answers.earlier_billed.items()},
        )
        with task_log:
            stop = task_log.stop_requested
            if self.context.tokens_left is not None:
                guards.append(guard := self._budget(task_log))
                stop = lambda: task_log.stop_requested() or guard.exhausted  # noqa: E731
            yield from self._embed(embedder, batches, metrics, stop, answers, guards[0] if guards else None)
        answers.finish()  # reached only when every batch was handed on: a failed attempt's stay

    def _budget(self, task_log: TaskLog) -> BudgetGuard:
        """The run's cap for this attempt: what the wave may bill, less every other attempt's
        spend and reservations (their files, read before each request: one listing of the
        wave's spend files per request)."""
        assert self.context.tokens_left is not None and self.run_dir is not None
        run_dir, wave, own = self.run_dir, self.wave, task_log.path

        def others() -> tuple[int, int]:
            spend = read_spend(run_dir, wave=wave, exclude=own)
            return spend.tokens_billed, spend.tokens_reserved

        exclusive = lambda: wave_lock(run_dir, wave)  # noqa: E731
        return BudgetGuard(self.context.tokens_left, others, on_reserve=task_log.changed, exclusive=exclusive)

    def _embed(
        self,
        embedder: Embedder,
        batches: Iterator[pa.RecordBatch],
        metrics: Metrics,
        stop: Callable[[], bool],
        answers: AnswerLog | None = None,
        budget: BudgetGuard | None = None,
    ) -> Iterator[pa.RecordBatch]:
        planner = LongTextPlanner(self.config)
        dedup = ChunkDedup() if self.config.run.dedup else None  # chunks shared by long texts: sent once
        pending: deque[tuple[pa.RecordBatch, Split]] = deque()

        def plans() -> Iterator[Plan]:
            for batch in batches:
                if stop():
                    continue  # read the rest of the input, embed none of it
                plan = planner.plan(batch.column(self.text_col).to_pylist())
                id_of = partial(_id_at, batch.column(self.id_col))
                split = dedup.split(plan, id_of) if dedup else _unsplit(plan)
                pending.append((batch, split))
                yield split.send

        for sent in embedder.embed_stream(plans(), metrics, stop=stop, answers=answers, budget=budget):
            batch, split = pending.popleft()
            metrics.count_rows(sent.status, sign=-1)  # count output rows, not the engine's units
            results, dedup_of = dedup.join(split, sent) if dedup else (sent, [])
            metrics.copied_chunks += sum(results.status[i] != Status.UNSENT for i, _ in split.copies)
            plan = split.plan
            out = combine(plan, results)
            rows, status = self._to_arrow(batch, out, dedup_of_rows(plan, dedup_of)), out.status
            if Status.UNSENT in results.status:
                keep = _sent_rows(plan, results, out)
                metrics.dropped_tokens += int(out.prompt_tokens[~keep].sum())
                metrics.unsent_rows += int((~keep).sum())
                rows = rows.filter(pa.array(keep))
                status = [s for s, k in zip(status, keep, strict=True) if k]
            metrics.count_rows(status)
            yield rows

    def _to_arrow(self, batch: pa.RecordBatch, out: Combined, dedup_of: list[object]) -> pa.RecordBatch:
        """``out`` as output rows; ``dedup_of`` per row names the id that paid for a copied chunk
        (empty: none)."""
        n = len(out.status)
        id_type = self.arrow_schema.field(self.id_col).type
        rows = pa.array(out.row)
        hashes = text_hashes(batch.column(self.text_col))
        status = pa.array(out.status, pa.string())
        ok = pc.equal(status, Status.OK.value).to_numpy(zero_copy_only=False)
        whole = out.chunk_start == NO_OFFSET
        dims = out.vectors.shape[1] if out.vectors.ndim == 2 else 0
        now = datetime.now(timezone.utc)
        columns = {
            self.id_col: batch.column(self.id_col).take(rows),
            "chunk_index": pa.array(out.chunk_index.astype(np.int32)),
            "chunk_start": pa.array(out.chunk_start.astype(np.int32), mask=whole),
            "chunk_end": pa.array(out.chunk_end.astype(np.int32), mask=whole),
            "text_hash": hashes.take(rows),
            "embedding": vectors_to_arrow(out.vectors, ok),
            "dimensions": pa.array(np.where(ok, dims, 0).astype(np.int32), mask=~ok),
            "model": pa.array(out.model, pa.string()),
            "input_type": _repeat(self.config.endpoint.input_type or "text", pa.string(), n),
            "prompt_tokens": pa.array(out.prompt_tokens.astype(np.int64)),
            "total_tokens": pa.array(out.total_tokens.astype(np.int64)),
            "status": status,
            "error": pa.array(out.error, pa.string()),
            "attempts": pa.array(out.attempts.astype(np.int32)),
            "request_id": pa.array(out.request_id, pa.string()),
            "run_id": _repeat(self.context.run_id, pa.string(), n),
            "embedded_at": _repeat(now, pa.timestamp("us", tz="UTC"), n),
            "embedding_fingerprint": _repeat(self.config.fingerprint(self.context), pa.string(), n),
            "deployment": pa.array(out.deployment, pa.string()),
            DEDUP_OF: pa.array(dedup_of, id_type) if dedup_of else pa.nulls(n, id_type),
            CACHED_FROM: pa.nulls(n, pa.string()),
        }
        for name in self.passthrough:
            columns[name] = batch.column(name).take(rows)
        arrays = [columns[f.name].cast(f.type) for f in self.arrow_schema]
        return pa.RecordBatch.from_arrays(arrays, schema=self.arrow_schema)


def _id_at(ids: pa.Array, row: int) -> object:
    return ids[row].as_py()


def _unsplit(plan: Plan) -> Split:
    """A batch sent whole (``run.dedup: false``)."""
    return Split(plan, plan, np.arange(len(plan.units), dtype=np.int64), [], [])


def _sent_rows(plan: Plan, results: EmbedResults, out: Combined) -> np.ndarray:
    """Which output rows to keep: those of texts with no unsent unit."""
    unsent = [u.row for u, status in zip(plan.units, results.status, strict=True) if status == Status.UNSENT]
    return ~np.isin(out.row, unsent)


def _attempt_name(wave: int) -> str:
    """Names a task attempt's spend file: wave, partition, attempt, and Spark's task attempt id."""
    ctx = TaskContext.get()
    if ctx is None:
        return f"w{wave:05d}-driver"
    return f"{attempt_name(wave, ctx.partitionId(), ctx.attemptNumber())}-t{ctx.taskAttemptId()}"


def _repeat(value: object, type_: pa.DataType, n: int) -> pa.Array:
    """``n`` copies of ``value``, built in Arrow (a list of datetimes took 0.2-0.5 µs a row)."""
    return pa.repeat(pa.scalar(value, type_), n)


def text_hashes(texts: pa.Array) -> pa.Array:
    """Hex sha256 of each text's UTF-8, as Spark's ``sha2(text, 256)``; null for a null text.

    Read from the Arrow buffers, so no Python string is built for it.
    """
    wide = pa.types.is_large_string(texts.type)
    bounds = np.frombuffer(texts.buffers()[1], dtype=np.int64 if wide else np.int32)
    offsets = bounds[texts.offset : texts.offset + len(texts) + 1].tolist()
    data = memoryview(texts.buffers()[2] or b"")
    spans = zip(offsets[:-1], offsets[1:], strict=True)
    hexes = [hashlib.sha256(data[start:end]).hexdigest() for start, end in spans]
    nulls = texts.is_null().to_numpy(zero_copy_only=False) if texts.null_count else None
    return pa.array(hexes, pa.string(), mask=nulls)


def vectors_to_arrow(vectors: np.ndarray, ok: np.ndarray) -> pa.Array:
    """list<float32> from a (n, d) float32 matrix; rows not ok become null. One buffer copy."""
    n, dims = vectors.shape if vectors.ndim == 2 else (len(ok), 0)
    lengths = np.where(ok, dims, 0).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    kept = vectors if ok.all() else vectors[ok]  # no copy when every row is ok
    values = np.ascontiguousarray(kept, dtype=np.float32).reshape(-1)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values), type=pa.list_(pa.float32()), mask=pa.array(~ok)
    )


def to_arrow_schema(schema: T.StructType) -> pa.Schema:
    """Arrow schema for a Spark schema, as mapInArrow expects it."""
    try:
        from pyspark.sql.pandas.types import to_arrow_schema as convert

        return convert(schema, timezone="UTC")  # type: ignore[call-arg]
    except TypeError:  # Spark 3.5 has no timezone argument; it uses UTC already
        from pyspark.sql.pandas.types import to_arrow_schema as convert

        return convert(schema)


def make_job(
    df: DataFrame, config: EmbedConfig, context: RunContext, *, run_dir: str | None = None, wave: int = 0
) -> tuple[PartitionJob, T.StructType]:
    hide_bridge_traffic()  # the closure below carries the key: keep py4j's DEBUG dump of it out of logs
    src = config.source
    schema = output_schema(df.schema, src.id_col, src.passthrough)
    job = PartitionJob(
        config=config,
        context=context,
        id_col=src.id_col,
        text_col=src.text_col,
        passthrough=src.passthrough,
        arrow_schema=to_arrow_schema(schema),
        run_dir=run_dir,
        wave=wave,
    )
    return job, schema
