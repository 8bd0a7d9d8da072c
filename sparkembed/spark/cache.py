"""The shared embedding cache (``cache.path``): look texts up before sending, add what was paid for.

Lookup: the rows to do meet the cache in a Spark join on (``fingerprint``, ``text_hash``), under
this run's fingerprint (and its equivalents). A text the cache holds whole (every chunk) is not
sent: each of its rows is written from the cache, ``ok``, with usage 0 and ``cached_from``
naming the run that paid; ``attempts`` is 0 and ``request_id`` null, as no request was made.
Two runs that added the same text are both in the cache: the earliest addition is used.

Adding: after each wave commits, the rows that wave paid for (not copies: ``cached_from``
null, and ``dedup_of`` null on at least one of the id's rows, see :func:`paid_entries`), of
texts whose every chunk is ``ok``, are read back from the target and
appended to the cache in one commit (Delta ``txn`` = run id, wave: a retried commit adds
nothing twice). A chunked text is cached as all its chunks or not at all, under the hash of its
full text; its chunking is part of the fingerprint.

Crashes: a run marks its cache appends due in its run folder before its first wave and clears
the mark after its last (:func:`mark_due`). A run that dies between a wave's commit to the
target and that wave's append leaves the mark; the next run of the target with the cache
(before planning: reruns with nothing to do too) appends the marked runs' target rows as a
wave would, but the texts the cache holds already, and clears the marks (:func:`add_crashed`).
Without a mark, that costs one folder listing: no read of the target or the cache.

Cache hits win over in-run dedup (every row of a cached text is a hit); rows whose text the
target already holds keep copying it from the target (``dedup_of``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkembed import sinks
from sparkembed.config import EmbedConfig
from sparkembed.core import runlog
from sparkembed.core.context import RunContext
from sparkembed.core.metrics import Metrics
from sparkembed.core.types import Status
from sparkembed.errors import ConfigError
from sparkembed.spark import delta_native
from sparkembed.spark.dedup import COPY_OF, FROM_TARGET, HASH
from sparkembed.spark.partition import CACHED_FROM, DEDUP_OF
from sparkembed.spark.planning import REPLACES
from sparkembed.spark.sources import read_delta
from sparkembed.spark.targets import is_path, read_with_pending
from sparkembed.spark.writers import META_SCHEMA, read_reports, sink_kind, task_report

_ZERO = ("prompt_tokens", "total_tokens", "attempts")


def absolute_cache(config: EmbedConfig) -> EmbedConfig:
    """Executors may run in other folders: a local cache path must be absolute."""
    path = config.cache.path
    if not path or "://" in path or not is_path(path) or os.path.isabs(path):
        return config
    return config.model_copy(
        update={"cache": config.cache.model_copy(update={"path": os.path.abspath(path)})}
    )


def check_cache_location(spark: SparkSession, config: EmbedConfig) -> None:
    """Refuse, before anything is paid for, a ``cache.path`` that is not (or cannot become) a cache.

    Raises:
        ConfigError: the cache is the source or the target; a folder holding other files or
            another Delta table; a catalog table where this session has no Delta.
    """
    path = config.cache.path
    if not path:
        return
    if path.rstrip("/") in {str(config.target.path).rstrip("/"), str(config.source.path).rstrip("/")}:
        raise ConfigError(f"cache.path {path} is the source or the target: give the cache its own table")
    if sink_kind(spark, config) == "native":
        _cache_exists(spark, config)
        return
    if not is_path(path):
        raise ConfigError(
            f"cache.path {path!r} names a catalog table, but this session has no Delta: give a path"
        )
    from sparkembed.sinks.files import foreign_entries

    found = foreign_entries(path)
    if found:
        raise ConfigError(f"cache.path {path} holds other files ({', '.join(found[:5])}): give a new folder")
    _cache_exists(spark, config)


def _cache_exists(spark: SparkSession, config: EmbedConfig) -> bool:
    """Whether the cache exists; through Spark's Delta where the session has it, else delta-rs.

    Raises:
        ConfigError: a table is there, but not a sparkembed cache.
    """
    path = str(config.cache.path)
    if sink_kind(spark, config) != "native":
        try:
            return sinks.check_cache(path)
        except sinks.NotACacheError as exc:
            raise ConfigError(str(exc)) from exc
    from delta.tables import DeltaTable

    if not (DeltaTable.isDeltaTable(spark, path) if is_path(path) else spark.catalog.tableExists(path)):
        return False
    name = f"delta.`{path}`" if is_path(path) else path
    detail = spark.sql(f"DESCRIBE DETAIL {name}").first()
    columns = set(spark.sql(f"SELECT * FROM {name} LIMIT 0").columns)
    if (
        detail is None
        or detail["description"] != sinks.CACHE_DESCRIPTION
        or columns != set(sinks.CACHE_SCHEMA.names)
    ):
        raise ConfigError(f"cache.path {path} is a table but not a sparkembed cache: give a new one")
    return True


def read_cache(spark: SparkSession, config: EmbedConfig) -> DataFrame | None:
    """The cache as it is, or None when there is none yet (or no ``cache.path``)."""
    path = config.cache.path
    if not path or not _cache_exists(spark, config):
        return None
    if not is_path(path):
        return spark.table(path)
    return read_delta(spark, path)  # Spark's Delta where the session has it, else delta-rs's file list


def with_keys(todo: DataFrame, config: EmbedConfig) -> DataFrame:
    """``todo`` with the columns of :func:`sparkembed.spark.dedup.mark_copies` (without dedup:
    the hash, and nothing copied)."""
    if HASH in todo.columns:
        return todo
    text = F.col(config.source.text_col)
    id_type = todo.schema[config.source.id_col].dataType
    return (
        todo.withColumn(HASH, F.when(text.isNotNull() & ~text.rlike(r"^\s*$"), F.sha2(text, 256)))
        .withColumn(COPY_OF, F.lit(None).cast(id_type))
        .withColumn(FROM_TARGET, F.lit(False))
    )


def mark_cached(marked: DataFrame, entries: DataFrame) -> DataFrame:
    """``marked`` (:func:`with_keys`) with :data:`CACHED_FROM` set on rows whose text has
    ``entries`` (:func:`cache_entries`), except rows copying the target."""
    runs = entries.select(F.col("text_hash").alias("_cache_hash"), F.col("run_id").alias("_cache_run"))
    joined = marked.join(runs.distinct(), marked[HASH] == F.col("_cache_hash"), "left")
    hit = F.when(~F.col(FROM_TARGET), F.col("_cache_run"))
    return joined.withColumn(CACHED_FROM, hit).drop("_cache_hash", "_cache_run")


def cache_entries(cache: DataFrame, marked: DataFrame, config: EmbedConfig, context: RunContext) -> DataFrame:
    """The cache rows of the texts of ``marked`` (column :data:`HASH`), joined on (fingerprint,
    text_hash): per text, the rows of its earliest addition, and only when every chunk is there."""
    fingerprints = list(config.equivalent_fingerprints(context))
    hashes = marked.select(F.col(HASH).alias("_h")).where(F.col("_h").isNotNull()).distinct()
    mine = cache.filter(F.col("fingerprint").isin(fingerprints))
    rows = mine.join(hashes, mine["text_hash"] == hashes["_h"], "left_semi")
    per_text = Window.partitionBy("text_hash")  # both windows share one shuffle
    added = F.struct("created_at", "run_id")
    picked = rows.withColumn("_first", F.min(added).over(per_text)).filter(added == F.col("_first"))
    whole = picked.withColumn("_have", F.count("*").over(per_text)).filter(F.col("_have") == F.col("chunks"))
    return whole.select(
        "text_hash", "chunk_index", "chunk_start", "chunk_end", "embedding", "model", "run_id"
    )


def cached_rows(
    entries: DataFrame, hits: DataFrame, config: EmbedConfig, context: RunContext, schema: T.StructType
) -> DataFrame:
    """The output rows of ``hits`` (rows with :data:`CACHED_FROM`) from the cache ``entries``, in
    ``schema`` (the output table's), plus :data:`REPLACES`."""
    wanted = hits.select(config.source.id_col, HASH, REPLACES, *config.source.passthrough)
    joined = wanted.join(entries, wanted[HASH] == entries["text_hash"])
    made: dict[str, Column] = {
        "text_hash": F.col(HASH),
        "dimensions": F.size("embedding"),
        "input_type": F.lit(config.endpoint.input_type or "text"),
        "status": F.lit(Status.OK.value),
        "error": F.lit(None),
        "request_id": F.lit(None),
        "run_id": F.lit(context.run_id),
        "embedded_at": F.current_timestamp(),
        "embedding_fingerprint": F.lit(config.fingerprint(context)),
        "deployment": F.lit(None),
        DEDUP_OF: F.lit(None),
        CACHED_FROM: F.col("run_id"),
        **{name: F.lit(0) for name in _ZERO},
    }
    columns = [
        made.get(field.name, F.col(field.name)).cast(field.dataType).alias(field.name) for field in schema
    ]
    return joined.select(*columns, F.col(REPLACES))


def add_wave(
    spark: SparkSession,
    config: EmbedConfig,
    context: RunContext,
    wave: int,
    ids: DataFrame | None,
) -> int:
    """Append to the cache what wave ``wave`` paid for (the rows of ``ids``, one column; None:
    the whole run).

    Returns:
        The cache rows added (a chunked text adds one per chunk).
    """
    # An upsert wave's rows wait in the target's pending table until the run's end.
    target = read_with_pending(spark, config)
    if target is None or not config.cache.path:
        return 0
    id_col = config.source.id_col
    rows = target.filter(
        (F.col("run_id") == context.run_id) & (F.col("embedding_fingerprint") == config.fingerprint(context))
    )
    if ids is not None:
        rows = rows.join(ids, id_col, "left_semi")
    prefix = f"part-{context.run_id}-cache-w{wave:05d}"
    return _append(spark, paid_entries(rows, id_col), config, context.run_id, wave, prefix)


def mark_due(config: EmbedConfig, run_dir: str) -> None:
    """Before a run's first wave: mark its cache appends due, for :func:`add_crashed` should the
    run die before its last one (the driver clears the mark after it)."""
    runlog.mark_cache_due(run_dir, target=str(config.target.path), cache=str(config.cache.path))


def add_crashed(spark: SparkSession, config: EmbedConfig, context: RunContext) -> int:
    """Append to the cache what runs that died (their marks in ``run.log_dir``, see
    :func:`mark_due`) committed to this target but not to this cache, then clear their marks.

    Without a mark, nothing is read. With one: the target rows of those runs, as a wave's
    append takes them (:func:`paid_entries`), but the texts the cache already holds under
    their fingerprint.

    Returns:
        The cache rows added.
    """
    if not config.cache.path:
        return 0
    log_dir = os.path.abspath(config.run.log_dir)
    key = {"target": str(config.target.path), "cache": str(config.cache.path)}
    runs = [run for run in runlog.cache_due_runs(log_dir, **key) if run != context.run_id]
    target = read_with_pending(spark, config) if runs else None
    added = 0
    if target is not None:
        entries = paid_entries(target.filter(F.col("run_id").isin(runs)), config.source.id_col)
        store = read_cache(spark, config)
        if store is not None:
            held = store.select("fingerprint", "text_hash").distinct()
            entries = entries.join(held, ["fingerprint", "text_hash"], "left_anti")
        app_id = f"sparkembed-backfill-{context.run_id}"  # not the run's own: its waves use 0, 1, ...
        added = _append(spark, entries, config, app_id, 0, f"part-{context.run_id}-cache-backfill")
    for run in runs:
        runlog.clear_cache_due(os.path.join(log_dir, run))
    return added


def paid_entries(rows: DataFrame, id_col: str) -> DataFrame:
    """The cache rows of target ``rows``: those of ids that paid (not copies, not cache hits)
    whose every row is ``ok``, one id per text and fingerprint, in the cache's columns.

    An id paid when any of its rows has no ``dedup_of``: its rows go whole, chunks that copied
    another text's chunk included (a cache hit must find every chunk). An id whose every row
    is a copy (a copied text, or one whose every chunk other texts paid for) adds nothing.
    """
    per_id = Window.partitionBy(id_col)  # the three windows share one shuffle
    paid = rows.filter(F.col(CACHED_FROM).isNull()).withColumn(
        "_paid", F.max(F.col(DEDUP_OF).isNull().cast("int")).over(per_id)
    )
    whole_ok = paid.filter(F.col("_paid") == 1).withColumn(
        "_all_ok", F.min((F.col("status") == Status.OK.value).cast("int")).over(per_id)
    )
    whole_ok = whole_ok.withColumn("chunks", F.count("*").over(per_id)).filter(F.col("_all_ok") == 1)
    # Two ids with one text (run.dedup off) would add it twice: the smallest id's rows go.
    payer = F.min(id_col).over(Window.partitionBy("embedding_fingerprint", "text_hash"))
    kept = whole_ok.withColumn("_payer", payer).filter(F.col(id_col) == F.col("_payer"))
    return kept.select(
        F.col("embedding_fingerprint").alias("fingerprint"), "text_hash", "chunk_index", "chunk_start",
        "chunk_end", F.col("chunks").cast("int").alias("chunks"), "embedding", "model",
        F.col("prompt_tokens").alias("tokens"), "run_id", F.current_timestamp().alias("created_at"),
    )  # fmt: skip


def _append(
    spark: SparkSession, rows: DataFrame, config: EmbedConfig, app_id: str, version: int, prefix: str
) -> int:
    """Append ``rows`` to the cache in one commit, idempotent by ``(app_id, version)``; the
    delta-rs files are named ``prefix…`` (``part-<run id>-…``: the run's vacuum knows them)."""
    path = str(config.cache.path)
    if sink_kind(spark, config) == "native":
        _create_native(spark, path)
        rows = rows.cache()
        try:
            count = rows.count()
            if count:
                delta_native.write_native(
                    rows, path, mode="append", id_col="text_hash", app_id=app_id, version=version
                )
        finally:
            rows.unpersist()
        return count
    sinks.create_cache(path)
    meta = rows.mapInArrow(lambda batches: _write_cache_part(path, prefix, batches), META_SCHEMA).collect()
    files, _ = read_reports(meta)
    if files:
        sinks.append_to_cache(path, files, app_id=app_id, version=version)
    return sum(f.num_records for f in files)


def _write_cache_part(path: str, prefix: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Executor side of a delta-rs append: write parquet under the cache, yield file metadata."""
    ctx = TaskContext.get()
    part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
    files = sinks.write_part(
        path, batches, schema=sinks.CACHE_SCHEMA, file_prefix=f"{prefix}-p{part:05d}-a{attempt}"
    )
    yield task_report(files, Metrics())


def _create_native(spark: SparkSession, path: str) -> None:
    """The cache through Spark's Delta: created once, described as a cache."""
    name = f"delta.`{path}`" if is_path(path) else path
    columns = ", ".join(f"`{field.name}` {_spark_type(field.type)}" for field in sinks.CACHE_SCHEMA)
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS {name} ({columns}) USING delta COMMENT '{sinks.CACHE_DESCRIPTION}'"
    )


def _spark_type(arrow: pa.DataType) -> str:
    if pa.types.is_list(arrow):
        return "array<float>"
    return {"string": "string", "int32": "int", "int64": "bigint"}.get(str(arrow), "timestamp")


def finish(spark: SparkSession, config: EmbedConfig, run_id: str) -> None:
    """Delete cache files of this run that no commit references (failed task attempts)."""
    path = config.cache.path
    if path and is_path(path) and sink_kind(spark, config) == "delta-rs" and sinks.check_cache(path):
        sinks.vacuum_after_run(path, run_id)
