"""Delta sinks: delta-rs (executors write parquet, the driver commits) and native Delta.

Driver flow per wave, for the delta-rs sink::

    files, metrics = read_reports(df.mapInArrow(write_fn, META_SCHEMA).collect())  # sparkembed.spark.writers
    version = commit_files(uri, files, schema=schema, mode="append", app_id=app_id,
                           version=wave, expected_version=version)   # or upsert_files
    ...
    vacuum_after_run(uri, run_id)   # at the end of the run: only sparkembed's own orphans

where ``write_fn`` calls :func:`write_part` with a ``file_prefix`` starting with
``app_id`` and naming the wave, partition and task attempt. This package imports no
pyspark: the native Delta writer is :mod:`sparkembed.spark.delta_native`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy, so executors importing write_part load no deltalake.
_HOMES = {
    "ABSENT": "deltars",
    "add_columns": "deltars",
    "commit_files": "deltars",
    "read_table": "deltars",
    "table_version": "deltars",
    "vacuum_orphans": "vacuum",
    "vacuum_after_run": "vacuum",
    "upsert_files": "upsert",
    "delete_ids": "upsert",
    "pending_location": "pending",
    "apply_pending": "pending",
    "staging_location": "migration",
    "exists": "migration",
    "switch_to_staging": "migration",
    "drop_staging": "migration",
    "migration_status": "migration",
    "write_marker": "migration",
    "ConcurrentWriteError": "errors",
    "DeltaSinkError": "errors",
    "TargetSchemaError": "errors",
    "FileMeta": "files",
    "write_part": "files",
    "CACHE_DESCRIPTION": "cache",
    "CACHE_SCHEMA": "cache",
    "NotACacheError": "cache",
    "append_to_cache": "cache",
    "check_cache": "cache",
    "create_cache": "cache",
    "vacuum_cache": "cache",
}

__all__ = [
    "ABSENT",
    "CACHE_DESCRIPTION",
    "CACHE_SCHEMA",
    "NotACacheError",
    "append_to_cache",
    "check_cache",
    "create_cache",
    "vacuum_cache",
    "ConcurrentWriteError",
    "DeltaSinkError",
    "FileMeta",
    "TargetSchemaError",
    "add_columns",
    "apply_pending",
    "commit_files",
    "drop_staging",
    "exists",
    "migration_status",
    "pending_location",
    "staging_location",
    "switch_to_staging",
    "write_marker",
    "delete_ids",
    "read_table",
    "table_version",
    "upsert_files",
    "vacuum_after_run",
    "vacuum_orphans",
    "write_part",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"sparkembed.sinks.{_HOMES[name]}"), name)
