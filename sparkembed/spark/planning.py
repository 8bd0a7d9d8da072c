"""Never pay twice: which source rows still need embedding, decided in Spark.

A source row is done when the target holds its (id, text_hash) under the current
``embedding_fingerprint`` (model, dimensions, input type, long-text strategy),
and, with ``--retry-failed``, none of that id's rows failed. The work left is a
left anti-join, lazy and pushed down to Spark: nothing is collected.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class WorkPlan:
    """What a run must do.

    Attributes:
        todo: source rows to embed (id, text, passthrough), plus :data:`REPLACES`.
        whole_source: ``todo`` is every source row (no target yet, or an overwrite).
        overwrite: replace the whole target (``target.mode: overwrite``).
        failed_left: ids whose failed rows stay as they are (no ``--retry-failed``).
        prune: target ids that are gone from the source, when ``--prune`` is on.
    """

    todo: DataFrame
    whole_source: bool = False
    overwrite: bool = False
    failed_left: int = 0
    prune: DataFrame | None = None


def plan_work(spark: SparkSession, source: DataFrame, config: EmbedConfig, context: RunContext) -> WorkPlan:
    """Anti-join the source against the target rows made with this run's fingerprint.

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
    mine = target.filter(F.col("embedding_fingerprint").isin(list(config.equivalent_fingerprints(context))))
    per_text = mine.groupBy(id_col, "text_hash").agg(
        F.max((F.col("status") == Status.FAILED.value).cast("int")).alias("_failed")
    )
    done = per_text.filter(F.col("_failed") == 0) if config.run.retry_failed else per_text
    done = done.select(F.col(id_col).alias("_done_id"), F.col("text_hash").alias("_done_hash"))
    hashed = source.withColumn("_hash", F.sha2(F.col(text_col), 256))
    todo = hashed.join(
        done,
        (hashed[id_col] == done["_done_id"]) & hashed["_hash"].eqNullSafe(done["_done_hash"]),
        "left_anti",
    ).drop("_hash")
    # Which ids already have rows: only those need the upsert's rewrite of old files.
    known = target.select(F.col(id_col).alias("_known_id")).distinct()
    todo = (
        todo.join(known, todo[id_col] == known["_known_id"], "left")
        .withColumn(REPLACES, F.col("_known_id").isNotNull())
        .drop("_known_id")
    )
    failed_left = 0
    if not config.run.retry_failed:
        failed_left = per_text.filter(F.col("_failed") == 1).select(id_col).distinct().count()
    prune = None
    if config.run.prune:
        prune = target.select(id_col).distinct().join(source.select(id_col), id_col, "left_anti")
    return WorkPlan(todo=todo, failed_left=failed_left, prune=prune)


def other_fingerprints(target: DataFrame, config: EmbedConfig, context: RunContext) -> list[str]:
    """Fingerprints in ``target`` other than this run's (and its equivalents), at most five."""
    same = config.equivalent_fingerprints(context)
    found = [r[0] for r in target.select("embedding_fingerprint").distinct().limit(6).collect()]
    return [fp for fp in found if fp not in same][:5]


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
