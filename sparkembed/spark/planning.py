"""Never pay twice: which source rows still need embedding, decided in Spark.

A source row is done when the target holds its (id, text_hash) under the current
``embedding_fingerprint`` (model, dimensions, input type, long-text strategy),
and, with ``--retry-failed``, none of that id's rows failed.

The target is read once: one aggregation per id (:func:`target_ids`) holds what every
question of the plan asks (is this text done? does the id have rows? did it fail? which
texts does it hold wholly ``ok``?), and is checkpointed. The rows to do are one join of the
hashed source with it; the failed ids, the ids to prune and dedup's texts held by the target
come from the same checkpoint, not from the target again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkembed.config import EmbedConfig
from sparkembed.core.context import RunContext
from sparkembed.core.types import Status
from sparkembed.errors import ConfigError
from sparkembed.spark.targets import read_target

REPLACES = "_sparkembed_replaces"
"""Column of ``WorkPlan.todo``: the id already has rows in the target (sinks drop it)."""
HELD_HASH = "_held_hash"
"""Column of ``WorkPlan.held``: a text hash the target holds wholly ``ok``."""
HELD_BY = "_held_by"
"""Column of ``WorkPlan.held``: the smallest id holding it, among ids this run leaves alone."""
_NO_HASH = ""
"""Stands for a null hash (a null text) in the per-id hash sets: no sha256 is empty."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkPlan:
    """What a run must do.

    Attributes:
        todo: source rows to embed (id, text, passthrough), plus :data:`REPLACES`.
        whole_source: ``todo`` is every source row (no target yet, or an overwrite).
        overwrite: replace the whole target (``target.mode: overwrite``).
        failed_left: ids whose failed rows stay as they are (no ``--retry-failed``).
        prune: target ids that are gone from the source, when ``--prune`` is on.
        target_ids: :func:`target_ids` of the target, computed once; None without a target
            (or with an overwrite).
    """

    todo: DataFrame
    whole_source: bool = False
    overwrite: bool = False
    failed_left: int = 0
    prune: DataFrame | None = None
    target_ids: DataFrame | None = None


def plan_work(spark: SparkSession, source: DataFrame, config: EmbedConfig, context: RunContext) -> WorkPlan:
    """Join the source with the target's ids and hashes under this run's fingerprints.

    ``config.target`` is where the run writes: for a migration, the staging table
    (:mod:`sparkembed.spark.migration` decides, and checks fingerprints, before this).
    A migration is resumable like any other run: rows already in its staging table
    carry the new fingerprint and are skipped by its rerun.
    """
    target = read_target(spark, config)
    if target is None or config.target.mode == "overwrite":
        todo = source.withColumn(REPLACES, F.lit(False))
        return WorkPlan(todo=todo, whole_source=True, overwrite=config.target.mode == "overwrite")
    _check_columns(target, source, config)
    id_col, text_col = config.source.id_col, config.source.text_col
    ids = materialize(target_ids(target, config, context))  # the one read of the target
    hashed = source.withColumn("_hash", F.coalesce(F.sha2(F.col(text_col), 256), F.lit(_NO_HASH)))
    joined = hashed.join(ids, id_col, "left")
    done = F.array_contains("_mine", F.col("_hash"))
    if config.run.retry_failed:
        done = done & ~F.array_contains("_failed", F.col("_hash"))
    todo = joined.filter(~F.coalesce(done, F.lit(False))).select(
        *source.columns,
        F.col("_mine").isNotNull().alias(REPLACES),  # the id has rows: the upsert rewrites their files
    )
    failed_left = 0
    if not config.run.retry_failed:
        failed_left = ids.filter(F.size("_failed") > 0).count()
    prune = None
    if config.run.prune:
        prune = ids.select(id_col).join(source.select(id_col), id_col, "left_anti")
    return WorkPlan(todo=todo, failed_left=failed_left, prune=prune, target_ids=ids)


def held_texts(plan: WorkPlan, todo: DataFrame, config: EmbedConfig) -> DataFrame | None:
    """Per text hash the target holds wholly ``ok`` under this run's fingerprints, the smallest
    id holding it among ids this run leaves alone (:data:`HELD_HASH`, :data:`HELD_BY`): what
    dedup copies instead of sending. From ``plan.target_ids``, not the target; None without one.

    Args:
        todo: the rows to do (``plan.todo``, or its checkpoint).
    """
    if plan.target_ids is None:
        return None
    id_col = config.source.id_col
    wholly_ok = F.explode(F.array_except("_mine", "_not_ok")).alias(HELD_HASH)
    return (
        plan.target_ids.join(todo.select(id_col), id_col, "left_anti")
        .select(id_col, wholly_ok)
        .filter(F.col(HELD_HASH) != _NO_HASH)
        .groupBy(HELD_HASH)
        .agg(F.min(id_col).alias(HELD_BY))
    )


def target_ids(target: DataFrame, config: EmbedConfig, context: RunContext) -> DataFrame:
    """One row per target id: the hashes of its texts under this run's fingerprints
    (``_mine``), those with a failed row (``_failed``), and those with a row not ``ok``
    (``_not_ok``). A null hash is :data:`_NO_HASH`; an id without rows of this fingerprint
    has an empty ``_mine``."""
    mine = F.col("embedding_fingerprint").isin(list(config.equivalent_fingerprints(context)))
    text_hash = F.coalesce(F.col("text_hash"), F.lit(_NO_HASH))
    status = F.col("status")
    return target.groupBy(config.source.id_col).agg(
        F.collect_set(F.when(mine, text_hash)).alias("_mine"),
        F.collect_set(F.when(mine & (status == Status.FAILED.value), text_hash)).alias("_failed"),
        F.collect_set(F.when(mine & (status != Status.OK.value), text_hash)).alias("_not_ok"),
    )


def materialize(df: DataFrame) -> DataFrame:
    """Compute ``df`` once and keep it on the executors' memory and disk: later queries read
    it instead of its sources (and a non-deterministic source cannot give two of them
    different rows)."""
    try:
        return df.localCheckpoint(eager=True)
    except Exception as exc:  # e.g. Spark Connect 3.5 has no localCheckpoint
        log.warning("could not checkpoint a plan's rows (%s); each use recomputes them", exc)
        return df


def other_fingerprints(target: DataFrame, config: EmbedConfig, context: RunContext) -> list[str]:
    """Fingerprints in ``target`` other than this run's (and its equivalents), at most five."""
    same = list(config.equivalent_fingerprints(context))
    # Filtered before the distinct: parquet skips the row groups whose statistics hold only
    # this run's fingerprints, so a target of one fingerprint is answered from file footers.
    fingerprint = F.col("embedding_fingerprint")
    other = target.filter(~fingerprint.isin(same) | fingerprint.isNull())
    return [r[0] for r in other.select("embedding_fingerprint").distinct().limit(5).collect()]


def _check_columns(target: DataFrame, source: DataFrame, config: EmbedConfig) -> None:
    """Refuse, before anything is paid for, a target whose columns this run's rows won't fit."""
    from sparkembed.spark.partition import LATER_FIELDS, output_schema

    want = output_schema(source.schema, config.source.id_col, config.source.passthrough)
    wanted = {f.name: f.dataType.simpleString() for f in want}
    have = {f.name: f.dataType.simpleString() for f in target.schema}
    for name, _ in LATER_FIELDS:  # a table from before they existed: the sink adds them
        if name not in have:
            wanted.pop(name)
    if wanted != have:
        diff = sorted({f"{k} {v}" for k, v in have.items() ^ wanted.items()})
        raise ConfigError(
            f"target {config.target.path} has other columns than this run writes ({', '.join(diff)}): "
            "check source.id_col's type and source.passthrough, or give a new --target"
        )
