"""Delta sinks: delta-rs (executors write parquet, the driver commits) and native Delta.

Driver flow per wave, for the delta-rs sink::

    metas = file_metas_from_rows(df.mapInArrow(write_fn, FILE_META_DDL).collect())
    version = commit_files(uri, metas, schema=schema, mode="append", app_id=app_id,
                           version=wave, expected_version=version)   # or upsert_files
    ...
    vacuum_orphans(uri, prefix=app_id)   # at the end of the run

where ``write_fn`` calls :func:`write_part` with a ``file_prefix`` starting with
``app_id`` and naming the wave, partition and task attempt. This package imports no
pyspark; the native sink imports it lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy, so executors importing write_part load no deltalake, and the native sink
# works where deltalake is not installed.
_HOMES = {
    "ABSENT": "deltars",
    "commit_files": "deltars",
    "read_table": "deltars",
    "table_version": "deltars",
    "vacuum_orphans": "vacuum",
    "upsert_files": "upsert",
    "delete_ids": "upsert",
    "delete_native": "native",
    "ConcurrentWriteError": "errors",
    "DeltaSinkError": "errors",
    "TargetSchemaError": "errors",
    "FILE_META_DDL": "files",
    "FILE_META_SCHEMA": "files",
    "FileMeta": "files",
    "file_metas_from_rows": "files",
    "file_metas_to_batch": "files",
    "write_part": "files",
    "native_available": "native",
    "write_native": "native",
}

__all__ = [
    "ABSENT",
    "FILE_META_DDL",
    "FILE_META_SCHEMA",
    "ConcurrentWriteError",
    "DeltaSinkError",
    "FileMeta",
    "TargetSchemaError",
    "commit_files",
    "delete_ids",
    "delete_native",
    "file_metas_from_rows",
    "file_metas_to_batch",
    "native_available",
    "read_table",
    "table_version",
    "upsert_files",
    "vacuum_orphans",
    "write_native",
    "write_part",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"sparkembed.sinks.{_HOMES[name]}"), name)
