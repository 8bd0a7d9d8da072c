"""Writing one wave to Delta: through Spark's own Delta, or through delta-rs.

delta-rs path: executors embed and write parquet files in parallel inside
``mapInArrow``; each task returns only file metadata and its metrics. The driver
commits the files of the successful task attempts in one Delta transaction
(app id = run id, txn version = wave), so a retried commit is a no-op and files
of failed attempts are never referenced.

Upserts are deferred, in both sinks: a wave whose rows replace rows of the target appends
them to the target's pending table (:mod:`sparkembed.sinks.pending`); a wave of new ids only
goes straight to the target. :meth:`WaveSink.apply_pending` then replaces the old rows by
the pending ones in one target commit, so each touched target file is rewritten once per
run, not once per wave. :func:`apply_pending` at a run's start finishes what a crashed run
left there, before planning, so none of it is paid for twice.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any, Literal, Protocol

import pyarrow as pa
from pyspark import TaskContext
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkembed import sinks
from sparkembed.config import EmbedConfig
from sparkembed.core.context import RunContext
from sparkembed.core.metrics import Metrics
from sparkembed.core.runlog import read_task_metrics
from sparkembed.errors import ConfigError
from sparkembed.spark import delta_native
from sparkembed.spark.partition import PartitionJob, make_job, to_arrow_schema
from sparkembed.spark.planning import REPLACES
from sparkembed.spark.targets import is_path, read_target


class WaveSink(Protocol):
    def write_wave(
        self, df: DataFrame, config: EmbedConfig, context: RunContext, wave: int
    ) -> dict[str, Any]: ...

    def write_rows(
        self, rows: DataFrame, config: EmbedConfig, run_id: str, version: int
    ) -> dict[str, Any]: ...

    def apply_pending(self, config: EmbedConfig, run_id: str) -> None: ...

    def prune(self, ids: DataFrame, config: EmbedConfig, run_id: str, version: int) -> int: ...

    def finish(self, config: EmbedConfig, run_id: str) -> None: ...


def choose_sink(spark: SparkSession, config: EmbedConfig, run_dir: str | None = None) -> WaveSink:
    """The sink for this session; ``run_dir`` is where tasks log their spend (:mod:`..core.runlog`)."""
    if check_sink(spark, config) == "native":
        return NativeSink(spark, run_dir)
    return DeltaRsSink(str(config.target.path), run_dir)


def check_sink(spark: SparkSession, config: EmbedConfig) -> Literal["native", "delta-rs"]:
    """The sink a run will use (:func:`sink_kind`), refused before anything is paid for when
    it cannot write the target.

    Raises:
        ConfigError: a catalog table target, where the session has no Delta.
    """
    kind = sink_kind(spark, config)
    target = str(config.target.path)
    if kind == "delta-rs" and not is_path(target):
        raise ConfigError(
            f"target {target!r} looks like a catalog table, but this session has no Delta "
            "(the delta-rs sink writes paths only): give a path, or run where Delta is installed"
        )
    return kind


def sink_kind(spark: SparkSession, config: EmbedConfig) -> Literal["native", "delta-rs"]:
    """``target.sink``, with ``auto`` decided by whether this session has Delta: on Spark
    Connect, whether the server has it (:func:`~.delta_native.native_available`)."""
    kind = config.target.sink
    if kind == "auto":
        return "native" if delta_native.native_available(spark) else "delta-rs"
    return kind


def apply_pending(spark: SparkSession, config: EmbedConfig, run_id: str) -> None:
    """Apply the target's pending table, if a crashed run left one (see the module docstring)."""
    target = str(config.target.path)
    if sink_kind(spark, config) == "native":
        delta_native.apply_pending(spark, target, id_col=config.source.id_col)
    elif is_path(target):
        sinks.apply_pending(target, id_col=config.source.id_col, run_id=run_id)


def defers(config: EmbedConfig, replacing: int) -> bool:
    """Whether a wave's rows go to the pending table: an upsert replacing ``replacing`` > 0 ids."""
    return config.target.mode == "upsert" and replacing > 0


def _write_partition(
    job: PartitionJob, target: str, wave: int, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """Executor side: embed a partition, write parquet, yield file metadata then metrics."""
    ctx = TaskContext.get()
    part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
    metrics = Metrics()
    prefix = f"part-{job.context.run_id}-w{wave:05d}-p{part:05d}-a{attempt}"
    files = sinks.write_part(
        target, job.embed_batches(batches, metrics), schema=job.arrow_schema, file_prefix=prefix
    )
    yield task_report(files, metrics)


def _write_ready(
    target: str, schema: pa.Schema, prefix: str, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """Executor side of :meth:`DeltaRsSink.write_rows`: write parquet, yield file metadata
    then the rows counted by status."""
    ctx = TaskContext.get()
    part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
    metrics = Metrics()

    def counted() -> Iterator[pa.RecordBatch]:
        for batch in batches:
            metrics.count_rows(batch.column("status").to_pylist())
            yield batch

    files = sinks.write_part(target, counted(), schema=schema, file_prefix=f"{prefix}-p{part:05d}-a{attempt}")
    yield task_report(files, metrics)


META_SCHEMA = "kind string, payload string"
"""What a writing task returns: one row per file written, and one with its metrics."""


def task_report(files: list[sinks.FileMeta], metrics: Metrics) -> pa.RecordBatch:
    """Executor side: the rows of :data:`META_SCHEMA` for one task."""
    rows = [("file", json.dumps(dataclasses.asdict(f))) for f in files]
    rows.append(("metrics", json.dumps(metrics.to_dict(timeline=True))))
    return pa.RecordBatch.from_arrays(
        [pa.array([k for k, _ in rows]), pa.array([p for _, p in rows])],
        names=["kind", "payload"],
    )


def read_reports(rows: list[Any]) -> tuple[list[sinks.FileMeta], dict[str, Any]]:
    """Driver side: the files and the summed metrics of collected :data:`META_SCHEMA` rows."""
    files = [sinks.FileMeta(**json.loads(r.payload)) for r in rows if r.kind == "file"]
    total = Metrics()
    for r in rows:
        if r.kind == "metrics":
            total.merge(Metrics.from_dict(json.loads(r.payload)))
    return files, total.to_dict(timeline=True)


class DeltaRsSink:
    """For sessions without Delta jars (pip-installed local Spark, CI).

    Each commit names the table version it expects, so a concurrent run on the same
    target makes one of them fail cleanly with ConcurrentWriteError.
    """

    def __init__(self, target: str, run_dir: str | None = None) -> None:
        # The version the run planned against: any other writer's commit since then
        # makes our next commit fail instead of mixing two runs' rows.
        self._expected = sinks.table_version(target)
        self._pending = sinks.pending_location(target)
        self._pending_expected = sinks.table_version(self._pending)
        self._run_dir = run_dir
        self._columns_checked = False

    def write_wave(
        self, df: DataFrame, config: EmbedConfig, context: RunContext, wave: int
    ) -> dict[str, Any]:
        job, _ = make_job(df.drop(REPLACES), config, context, run_dir=self._run_dir, wave=wave)
        run_id = context.run_id
        replacing: pa.Array | None = None
        if REPLACES in df.columns:
            if config.target.mode == "upsert":
                # Only ids with old rows make the upsert rewrite files; a growing table's new
                # rows are just added, without scanning the table for them.
                known = df.filter(F.col(REPLACES)).select(job.id_col).collect()
                replacing = pa.array([r[0] for r in known], job.arrow_schema.field(job.id_col).type)
            df = df.drop(REPLACES)
        target = str(config.target.path)
        self._add_columns(target, job.arrow_schema, config)
        folder = self._folder(config, replacing)
        meta = df.mapInArrow(
            lambda batches: _write_partition(job, folder, wave, batches), META_SCHEMA
        ).collect()
        files, metrics = read_reports(meta)
        self._commit(files, job.arrow_schema, config, run_id, wave, replacing)
        return metrics

    def write_rows(self, rows: DataFrame, config: EmbedConfig, run_id: str, version: int) -> dict[str, Any]:
        """Write rows that need no request (dedup's copies), in the output schema plus
        :data:`REPLACES`, as one commit at ``version``."""
        id_col, target = config.source.id_col, str(config.target.path)
        schema = to_arrow_schema(rows.drop(REPLACES).schema)
        replacing = None
        if config.target.mode == "upsert":
            known = rows.filter(F.col(REPLACES)).select(id_col).distinct().collect()
            replacing = pa.array([r[0] for r in known], schema.field(id_col).type)
        self._add_columns(target, schema, config)
        prefix = f"part-{run_id}-v{version:05d}-copies"
        folder = self._folder(config, replacing)
        meta = rows.drop(REPLACES).mapInArrow(
            lambda batches: _write_ready(folder, schema, prefix, batches), META_SCHEMA
        ).collect()
        files, metrics = read_reports(meta)
        self._commit(files, schema, config, run_id, version, replacing)
        return metrics

    def _add_columns(self, target: str, schema: pa.Schema, config: EmbedConfig) -> None:
        if not self._columns_checked and config.target.mode != "overwrite":
            # A table from an older release lacks newer columns (deployment, dedup_of): add them first.
            self._expected = sinks.add_columns(target, schema, expected_version=self._expected)
            self._columns_checked = True

    def _folder(self, config: EmbedConfig, replacing: pa.Array | None) -> str:
        """Where a wave's files go: the pending table when they replace rows, else the target."""
        return self._pending if defers(config, len(replacing or [])) else str(config.target.path)

    def _commit(
        self,
        files: list[sinks.FileMeta],
        schema: pa.Schema,
        config: EmbedConfig,
        run_id: str,
        version: int,
        replacing: pa.Array | None,
    ) -> None:
        target, mode = str(config.target.path), config.target.mode
        if defers(config, len(replacing or [])):
            # Appended: a run's waves hold distinct ids, and the pending table starts empty.
            self._pending_expected = sinks.commit_files(
                self._pending, files, schema=schema, mode="append", app_id=run_id, version=version,
                expected_version=self._pending_expected,
            )  # fmt: skip
        elif mode == "upsert" and not files and replacing is not None and self._expected != sinks.ABSENT:
            return  # an empty wave: nothing to add, nothing to replace, no commit
        elif mode == "upsert":
            self._expected = sinks.upsert_files(
                target, files, schema=schema, id_col=config.source.id_col, app_id=run_id,
                version=version, rewrite_prefix=f"part-{run_id}-w{version:05d}-rw",
                expected_version=self._expected, replace_ids=replacing,
            )  # fmt: skip
        else:
            self._expected = sinks.commit_files(
                target, files, schema=schema,
                mode="overwrite" if mode == "overwrite" and version == 0 else "append",
                app_id=run_id, version=version, expected_version=self._expected,
            )  # fmt: skip

    def prune(self, ids: DataFrame, config: EmbedConfig, run_id: str, version: int) -> int:
        """Delete the rows of ``ids`` (gone from the source) in one idempotent commit."""
        from deltalake import DeltaTable

        target = str(config.target.path)
        gone = [r[0] for r in ids.collect()]  # ids only, and only the deleted ones
        if gone:
            schema = pa.schema(DeltaTable(target).schema().to_arrow())
            self._expected = sinks.delete_ids(
                target, pa.array(gone, schema.field(config.source.id_col).type), schema=schema,
                id_col=config.source.id_col, app_id=run_id, version=version,
                rewrite_prefix=f"part-{run_id}-prune-rw", expected_version=self._expected,
            )  # fmt: skip
        return len(gone)

    def apply_pending(self, config: EmbedConfig, run_id: str) -> None:
        """Replace the old rows by the pending ones in one target commit (each touched file
        rewritten once), then drop the pending table."""
        applied = sinks.apply_pending(
            str(config.target.path), id_col=config.source.id_col, run_id=run_id,
            expected_version=self._expected,
        )  # fmt: skip
        if applied is not None:
            self._expected = applied
        self._pending_expected = sinks.ABSENT

    def finish(self, config: EmbedConfig, run_id: str) -> None:
        """Delete files sparkembed wrote that no commit references; never anyone else's."""
        sinks.vacuum_after_run(str(config.target.path), run_id)


class _MetricsParam(AccumulatorParam):  # type: ignore[type-arg]
    """Adds tasks' metrics dicts (counters and timelines) on the driver."""

    def zero(self, value: dict[str, Any]) -> dict[str, Any]:
        return {}

    def addInPlace(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        total = Metrics.from_dict(a)
        total.merge(Metrics.from_dict(b))
        return total.to_dict(timeline=True)


def embed_with_metrics(
    df: DataFrame, config: EmbedConfig, context: RunContext, *, run_dir: str | None = None, wave: int = 0
) -> tuple[DataFrame, Any]:
    """The embedded rows, lazily, and an accumulator its tasks add their metrics to.

    The accumulator is None where the session has no SparkContext (Spark Connect).
    """
    job, schema = make_job(df, config, context, run_dir=run_dir, wave=wave)
    try:
        accumulator = df.sparkSession.sparkContext.accumulator({}, _MetricsParam())
    except Exception:
        accumulator = None

    def embed_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        metrics = Metrics()
        yield from job.embed_batches(batches, metrics)
        if accumulator is not None:
            accumulator.add(metrics.to_dict(timeline=True))

    return df.mapInArrow(embed_partition, schema), accumulator


class NativeSink:
    """Spark's own Delta (Databricks, Synapse, Fabric, spark-submit with the Delta package)."""

    def __init__(self, spark: SparkSession, run_dir: str | None = None) -> None:
        self._spark = spark
        self._reported: dict[str, int] = {}
        self._run_dir = run_dir
        self._columns_checked = False

    def write_wave(
        self, df: DataFrame, config: EmbedConfig, context: RunContext, wave: int
    ) -> dict[str, Any]:
        out, accumulator = embed_with_metrics(
            df.drop(REPLACES), config, context, run_dir=self._run_dir, wave=wave
        )
        run_id = context.run_id
        mode = config.target.mode
        if not self._columns_checked and mode != "overwrite":
            delta_native.add_columns(out.sparkSession, str(config.target.path), out.schema)
            self._columns_checked = True
        if mode == "overwrite" and wave > 0:
            mode = "append"
        where, mode = self._where(df, config, mode)
        delta_native.write_native(
            out, where, mode=mode, id_col=config.source.id_col, app_id=run_id, version=wave
        )
        if accumulator is not None:
            return dict(accumulator.value)
        return self._counted_without_accumulator(df.sparkSession, config, run_id, wave)

    def _counted_without_accumulator(
        self, spark: SparkSession, config: EmbedConfig, run_id: str, wave: int
    ) -> dict[str, Any]:
        """Spark Connect: the wave's rows and usage counted from the table (the rows never pass
        the driver), its requests, retries, 429s and timeline from the tasks' spend files
        (:func:`~sparkembed.core.runlog.read_task_metrics`; where ``run.log_dir`` is a path this
        process sees)."""
        so_far = _counts_from_target(spark, config, run_id)
        wave_counts = {k: v - self._reported.get(k, 0) for k, v in so_far.items()}
        self._reported = so_far
        if self._run_dir is None:
            return wave_counts
        sent = read_task_metrics(self._run_dir, wave=wave).to_dict(timeline=True)
        return {k: v for k, v in sent.items() if k not in _TABLE_COUNTS} | wave_counts

    def write_rows(self, rows: DataFrame, config: EmbedConfig, run_id: str, version: int) -> dict[str, Any]:
        """Write rows that need no request (dedup's copies) as one commit at ``version``."""
        out = rows.drop(REPLACES)
        mode = config.target.mode
        if not self._columns_checked and mode != "overwrite":
            delta_native.add_columns(out.sparkSession, str(config.target.path), out.schema)
            self._columns_checked = True
        by_status = out.groupBy("status").agg(F.count("*").alias("n")).collect()
        counts = {r["status"]: int(r["n"]) for r in by_status}
        where, mode = self._where(rows, config, "append" if mode == "overwrite" else mode)
        delta_native.write_native(
            out, where, mode=mode, id_col=config.source.id_col, app_id=run_id, version=version
        )
        return {f"{status}_rows": n for status, n in counts.items()}

    def _where(
        self, rows: DataFrame, config: EmbedConfig, mode: Literal["append", "overwrite", "upsert"]
    ) -> tuple[str, Literal["append", "overwrite", "upsert"]]:
        """The pending table (appended) when ``rows`` replace target rows, else the target."""
        replacing = REPLACES in rows.columns and bool(rows.filter(F.col(REPLACES)).limit(1).count())
        if defers(config, int(replacing)):
            return sinks.pending_location(str(config.target.path)), "append"
        return str(config.target.path), mode

    def apply_pending(self, config: EmbedConfig, run_id: str) -> None:
        """One MERGE of the pending rows into the target, then drop the pending table."""
        delta_native.apply_pending(self._spark, str(config.target.path), id_col=config.source.id_col)

    def prune(self, ids: DataFrame, config: EmbedConfig, run_id: str, version: int) -> int:
        count = ids.count()
        if count:
            delta_native.delete_native(
                ids, str(config.target.path), id_col=config.source.id_col, app_id=run_id,
                version=version,
            )  # fmt: skip
        return count

    def finish(self, config: EmbedConfig, run_id: str) -> None:
        """Nothing to clean: Spark's Delta writer never leaves uncommitted files visible."""


_TABLE_COUNTS = ("ok_rows", "skipped_rows", "failed_rows", "prompt_tokens", "total_tokens")
"""What :func:`_counts_from_target` counts: the committed rows, exactly."""


def _counts_from_target(spark: SparkSession, config: EmbedConfig, run_id: str) -> dict[str, int]:
    """This run's rows so far, in the target and in its pending table (never the same ids), by
    status, and their usage."""
    pending = config.with_overrides({"target.path": sinks.pending_location(str(config.target.path))})
    found = [t for t in (read_target(spark, config), read_target(spark, pending)) if t is not None]
    columns = ("status", "prompt_tokens", "total_tokens")
    tables = [t.filter(F.col("run_id") == run_id).select(*columns) for t in found]
    out = dict.fromkeys(_TABLE_COUNTS, 0)
    if not tables:
        return out
    table = tables[0] if len(tables) == 1 else tables[0].unionByName(tables[1])
    rows = table.groupBy("status").agg(
        F.count("*").alias("n"), F.sum("prompt_tokens").alias("t"), F.sum("total_tokens").alias("all")
    )
    for r in rows.collect():
        out[f"{r.status}_rows"] = r.n
        out["prompt_tokens"] += r.t or 0
        out["total_tokens"] += r["all"] or 0
    return out
