"""The Spark side of a model migration: decide, build in staging, check, switch in one commit.

A run whose fingerprint differs from the target's (allowed by ``--reembed-all``) writes its
waves to the staging table beside the target (:func:`sparkembed.sinks.migration.staging_location`),
never to the target. Once every source row has its new row in staging, the target switches
to the staging table's rows in one Delta commit, and the staging table is dropped::

    migration = plan_migration(spark, config, context)      # None: an ordinary run
    plan = plan_work(spark, df, migration.staging, context)  # resume: staging rows are done
    ...  # waves into migration.staging
    finish_migration(spark, df, config, migration, context)  # check, switch, drop

A run stopped before the switch leaves the target untouched; its rerun resumes the staging
table. Failed rows hold the switch unless ``run.max_failed_fraction`` allows them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkembed import sinks
from sparkembed.config import EmbedConfig
from sparkembed.core.context import RunContext
from sparkembed.core.neighbours import Agreement, neighbour_agreement
from sparkembed.core.types import Status
from sparkembed.errors import ConfigError
from sparkembed.spark import delta_native, writers
from sparkembed.spark.planning import other_fingerprints, plan_work
from sparkembed.spark.targets import check_target_location, is_path, read_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """A run that builds new vectors beside the target.

    Attributes:
        staging: the run's config aimed at the staging table (upsert, ids gone from the
            source pruned).
        from_fingerprints: the fingerprints the target holds now.
        target_version: the target's Delta version when planned (delta-rs), so the switch
            fails instead of dropping another writer's commit.
    """

    staging: EmbedConfig
    from_fingerprints: tuple[str, ...]
    target_version: int | None = None

    @property
    def location(self) -> str:
        return str(self.staging.target.path)


def plan_migration(spark: SparkSession, config: EmbedConfig, context: RunContext) -> Migration | None:
    """Whether this run is a migration; None when it writes the target itself. Reads only.

    Raises:
        ConfigError: the target holds another fingerprint and ``--reembed-all`` was not given;
            the target is not upserted; the staging table holds yet another fingerprint.
    """
    target = read_target(spark, config)
    staging = staging_config(config)
    if target is None or config.target.mode == "overwrite":
        return None
    other = other_fingerprints(target, config, context)
    if not other:
        return None
    if not config.run.reembed_all:
        raise ConfigError(
            f"target {config.target.path} holds vectors made with another model, dimensions, "
            f"input_type or long-text strategy (fingerprint {other[0]}, this run "
            f"{config.fingerprint(context)}). Mixing them would make the table wrong: rerun with "
            "--reembed-all to build the new vectors beside it and switch in one commit (also to "
            "finish one that stopped), or give a new --target"
        )
    if config.target.mode != "upsert":
        raise ConfigError("--reembed-all replaces rows by id: it needs target.mode upsert")
    check_target_location(staging)
    staged = read_target(spark, staging)
    if staged is not None and (pending := other_fingerprints(staged, config, context)):
        raise ConfigError(
            f"{staging.target.path} holds a pending migration to another fingerprint ({pending[0]}): "
            f"finish it with its own config, or drop it with `sparkembed migrate abort {config.target.path}`"
        )
    version = sinks.table_version(str(config.target.path)) if is_path(str(config.target.path)) else None
    return Migration(staging=staging, from_fingerprints=tuple(other), target_version=version)


def staging_config(config: EmbedConfig) -> EmbedConfig:
    """``config`` aimed at the target's staging table."""
    target = config.target.model_copy(
        update={"path": sinks.staging_location(str(config.target.path)), "mode": "upsert"}
    )
    run = config.run.model_copy(update={"prune": True})  # the switch must not bring back gone ids
    return config.model_copy(update={"target": target, "run": run})


def record_start(migration: Migration, config: EmbedConfig, context: RunContext, source_rows: int) -> None:
    """Write the marker ``sparkembed migrate status`` reads (path staging tables only)."""
    if not is_path(migration.location):
        return
    sinks.write_marker(migration.location, {
        "target": str(config.target.path),
        "id_col": config.source.id_col,
        "from_fingerprints": list(migration.from_fingerprints),
        "to_fingerprint": config.fingerprint(context),
        "source_rows": source_rows,
        "price_per_million_tokens": config.endpoint.price_per_million_tokens,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })  # fmt: skip


def finish_migration(
    spark: SparkSession,
    source: DataFrame,
    config: EmbedConfig,
    migration: Migration,
    context: RunContext,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Check the staging table is complete, compare samples if asked, switch, drop the staging.

    Returns:
        What happened, for the run summary: ``state`` is ``switched``, ``held`` (``run.switch``
        off), ``incomplete`` (rows not embedded yet) or ``failed_rows`` (too many failed rows).
    """
    report: dict[str, Any] = {"staging": migration.location}
    plan = plan_work(spark, source, migration.staging.with_overrides({"run.retry_failed": False}), context)
    missing = plan.todo.count()
    rows = source.count()
    if missing:
        progress(
            f"migration not switched: {missing} source rows have no new vectors in {migration.location} yet"
        )
        return report | {"state": "incomplete", "rows_missing": missing}
    if plan.failed_left > config.run.max_failed_fraction * rows:
        progress(
            f"migration not switched: {plan.failed_left} ids failed in {migration.location}; rerun with "
            "--retry-failed, or allow them with --set run.max_failed_fraction=..."
        )
        return report | {"state": "failed_rows", "failed_ids": plan.failed_left}
    if config.run.check_sample:
        agreement = check_sample(spark, config, migration, config.run.check_sample)
        report["check"] = agreement.to_json() if agreement else None
        progress(_describe(agreement))
    if not config.run.switch:
        progress(f"migration held: {migration.location} is complete; rerun without --no-switch to switch")
        return report | {"state": "held"}
    version = switch(spark, config, migration, context)
    progress(f"switched {config.target.path} to the new vectors in one commit" + (
        f" (version {version}; version {version - 1} keeps the old ones)" if version is not None else ""
    ))  # fmt: skip
    drop(spark, migration.staging)
    return report | {"state": "switched", "target_version": version}


def switch(spark: SparkSession, config: EmbedConfig, migration: Migration, context: RunContext) -> int | None:
    """Replace the target's rows by the staging table's in one Delta commit.

    Returns:
        The target's new version (delta-rs sink), or None (native Delta).
    """
    target = str(config.target.path)
    if writers.sink_kind(spark, config) == "delta-rs":
        return sinks.switch_to_staging(target, migration.location, expected_version=migration.target_version)
    # Native Delta: one overwrite commit of the target from the staging table.
    staged = read_target(spark, migration.staging)
    if staged is None:
        raise ConfigError(f"nothing to switch: {migration.location} does not exist")
    delta_native.replace_native(staged, target, app_id=f"sparkembed-switch-{context.run_id}", version=0)
    return None


def drop(spark: SparkSession, staging: EmbedConfig) -> None:
    """Drop the staging table: its own files only (a path), or ``DROP TABLE`` (a catalog table)."""
    location = str(staging.target.path)
    if is_path(location):
        sinks.drop_staging(location)
    else:
        spark.sql(f"DROP TABLE IF EXISTS {location}")


def check_sample(spark: SparkSession, config: EmbedConfig, migration: Migration, n: int) -> Agreement | None:
    """Nearest-neighbour agreement of ``n`` sample ids between the target's vectors and staging's.

    The sample is the ``n`` ids, of those with an ``ok`` whole-text (or first-chunk) row in
    both, that hash lowest: the same sample on every run. None when fewer than two ids qualify.
    """
    id_col = config.source.id_col

    def vectors(table: DataFrame | None, name: str) -> DataFrame:
        if table is None:
            raise ConfigError("nothing to compare: the target or the staging table is missing")
        ok = (F.col("status") == Status.OK.value) & (F.col("chunk_index") == 0)
        return table.filter(ok).select(id_col, F.col("embedding").alias(name))

    old = vectors(read_target(spark, config), "_old")
    new = vectors(read_target(spark, migration.staging), "_new")
    rows = old.join(new, id_col).orderBy(F.xxhash64(id_col), id_col).limit(n).collect()
    if len(rows) < 2:
        return None
    old_vectors = np.array([r["_old"] for r in rows], dtype=np.float32)
    new_vectors = np.array([r["_new"] for r in rows], dtype=np.float32)
    return neighbour_agreement(old_vectors, new_vectors)


def _describe(agreement: Agreement | None) -> str:
    if agreement is None:
        return (
            "check-sample: fewer than two ids have vectors in both the target and staging; nothing compared"
        )
    return (
        f"check-sample: {agreement.sample} ids, top-{agreement.k} nearest neighbours by cosine: "
        f"old and new vectors agree on {100 * agreement.mean:.1f} % on average "
        f"(lowest {100 * agreement.min:.1f} %)"
    )


def drop_switched_staging(spark: SparkSession, config: EmbedConfig, context: RunContext) -> None:
    """Drop a staging table whose vectors the target already holds: a run stopped between its
    switch and the drop left it. One holding another fingerprint (a pending migration) stays."""
    staging = staging_config(config)
    staged = read_target(spark, staging)
    if staged is None or read_target(spark, config) is None:
        return
    if other_fingerprints(staged, config, context):
        log.warning(
            "%s holds a pending migration to another fingerprint; this run writes %s as it is",
            staging.target.path, config.target.path,
        )  # fmt: skip
        return
    log.info("dropping %s: the target already holds its vectors", staging.target.path)
    drop(spark, staging)
