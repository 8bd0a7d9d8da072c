"""The target: whether it is a path or a catalog table, reading it, and checking its location.

"Is this a path or a table?" is decided by :func:`is_path` only.
"""

from __future__ import annotations

import logging
import os

from pyspark.sql import DataFrame, SparkSession

from sparkembed.config import EmbedConfig
from sparkembed.errors import ConfigError
from sparkembed.sinks.files import foreign_entries

log = logging.getLogger(__name__)


def is_path(location: str) -> bool:
    """A path holds a slash or backslash (``./t``, ``/lake/t``, ``abfss://…``, ``C:\\t``);
    anything else (``t``, ``main.rag.t``) is a catalog table name. Decided here only."""
    return "/" in location or "\\" in location


def read_target(spark: SparkSession, config: EmbedConfig) -> DataFrame | None:
    """The current target table, or None when it does not exist yet."""
    from sparkembed.spark.delta_native import native_available  # it imports is_path from here
    from sparkembed.spark.sources import read_delta

    target = str(config.target.path)
    if is_path(target):
        from sparkembed.spark.session import is_connect

        if is_connect(spark) and native_available(spark):
            # The server's storage, which this client may not reach: ask the server's Delta.
            from sparkembed.spark.delta_native import table_exists

            return read_delta(spark, target) if table_exists(spark, target) else None
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(target):
            return None
        return read_delta(spark, target)
    if native_available(spark) and spark.catalog.tableExists(target):
        return spark.table(target)
    return None


def read_with_pending(spark: SparkSession, config: EmbedConfig) -> DataFrame | None:
    """The target as it will be once its pending table (:mod:`sparkembed.sinks.pending`) is
    applied: the pending rows replace every target row of their ids. None when neither exists."""
    from sparkembed.sinks import pending_location

    target = read_target(spark, config)
    pending_config = config.with_overrides({"target.path": pending_location(str(config.target.path))})
    pending = read_target(spark, pending_config)
    if pending is None or target is None:
        return target if pending is None else pending
    id_col = config.source.id_col
    kept = target.join(pending.select(id_col).distinct(), id_col, "left_anti")
    return kept.unionByName(pending, allowMissingColumns=True)


def check_target_location(config: EmbedConfig) -> None:
    """Refuse, before anything is paid for, a target that would mean writing among others' files.

    Raises:
        ConfigError: the target is the source, a file, or a folder that is neither empty, nor
            a Delta table, nor holding only sparkembed's own files of a first wave that crashed.
    """
    target = str(config.target.path)
    source = config.source.path
    if source and _same_location(source, target):
        raise ConfigError(f"the target {target} is the source table: give another --target")
    if not is_path(target):
        return  # a catalog table: the catalog says what it is
    try:
        found = foreign_entries(target)
    except Exception as exc:  # a store this driver cannot list (no credentials here): the sink checks
        log.warning("could not list target %s before the run (%s)", target, exc)
        return
    if not found:
        return
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise ConfigError(
        f"target {target} exists and is not a Delta table ({shown}): sparkembed never writes "
        "among other files. Give a new or empty folder, or an existing Delta table"
    )


def _same_location(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        return p.rstrip("/") if "://" in p else os.path.realpath(p)

    return norm(a) == norm(b)
