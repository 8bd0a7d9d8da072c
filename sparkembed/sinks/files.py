"""Executor side of the delta-rs sink: write parquet parts, describe them for the commit.

Pure pyarrow (no Spark, no deltalake), so it runs inside ``df.mapInArrow`` on any
executor. Each call writes one or more files straight under the table folder and
returns one :class:`FileMeta` per file; the driver commits the metas of successful
task attempts in one Delta transaction (:func:`sparkembed.sinks.commit_files`).

Example, inside a ``mapInArrow`` function (see :func:`sparkembed.waves.task_report`)::

    metas = write_part(uri, batches, schema=schema, file_prefix=f"{app}-w3-p{pid}-a{attempt}")
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sparkembed.sinks.stats import StatsCollector

DEFAULT_MAX_ROWS_PER_FILE = 25_000
"""About 150 MB of 1536-d float32 vectors, which do not compress."""
DEFAULT_ROW_GROUP_ROWS = 8_192
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._=-]+$")
OWN_FILE_RE = re.compile(r"^part-\d{8}T\d{6}Z-[0-9a-f]{8}-[A-Za-z0-9-]+-\d{5}-[0-9a-f]{12}\.parquet$")
"""Names of the files sparkembed's runs write: ``part-<run id>-<wave, task...>-<n>-<random>``.
Anything else in a target folder was not written by sparkembed."""
MIGRATION_MARKER = "_sparkembed_migration.json"
"""What a migration's staging folder records about it (:mod:`sparkembed.sinks.migration`)."""


@dataclass(frozen=True)
class FileMeta:
    """One parquet file written for a commit.

    Args:
        path: path relative to the table root (a bare file name here).
        size_bytes: file size in bytes.
        num_records: rows in the file.
        modification_time_ms: when the file was closed, ms since the epoch.
        stats: Delta ``add.stats`` JSON (numRecords, minValues, maxValues, nullCount).
    """

    path: str
    size_bytes: int
    num_records: int
    modification_time_ms: int
    stats: str | None = None


def resolve_root(table_uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of a table URI (a local path or ``scheme://``)."""
    if "://" not in table_uri:
        return pafs.LocalFileSystem(), os.path.abspath(table_uri)
    fs, root = pafs.FileSystem.from_uri(table_uri)
    return fs, root.rstrip("/")


def foreign_entries(table_uri: str) -> list[str]:
    """Why writing a Delta table at ``table_uri`` would touch what is not ours.

    Returns:
        ``[]`` when nothing is there, when it is a Delta table (it holds ``_delta_log``), or
        when the folder holds only files sparkembed's own runs wrote (a first wave that
        crashed before its commit, a migration's marker). Otherwise the names found: a file where the folder
        should be, or the folder's other entries, sorted.
    """
    fs, root = resolve_root(table_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        return [info.base_name]
    entries = fs.get_file_info(pafs.FileSelector(root))
    if any(e.base_name == "_delta_log" and e.type == pafs.FileType.Directory for e in entries):
        return []
    return sorted(
        e.base_name for e in entries if not OWN_FILE_RE.match(e.base_name) and e.base_name != MIGRATION_MARKER
    )


def conform(batch: pa.RecordBatch, schema: pa.Schema, *, fill_missing: bool = False) -> pa.RecordBatch:
    """Reorder and cast ``batch`` to ``schema``.

    Args:
        fill_missing: add absent columns as nulls (old files of an evolved table);
            otherwise an absent column raises ``ValueError``.
    """
    if batch.schema.equals(schema):
        return batch
    arrays = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            if not fill_missing:
                raise ValueError(f"rows lack column {field.name!r} of the target schema")
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(index)
        arrays.append(column if column.type.equals(field.type) else column.cast(field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_part(
    table_uri: str,
    batches: Iterable[pa.RecordBatch] | pa.Table,
    *,
    schema: pa.Schema,
    file_prefix: str,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
) -> list[FileMeta]:
    """Stream rows into parquet files under the table folder; commit nothing.

    Memory stays at about one row group plus one input batch, whatever the input size.
    No rows, no file.

    Args:
        table_uri: the Delta table's root (path or URI); created if absent.
        batches: the rows, with at least the columns of ``schema``.
        schema: the target schema; rows are cast to it.
        file_prefix: start of every file name, ``[A-Za-z0-9._=-]+``. Make it name the
            run, wave, partition and task attempt; a random suffix keeps names unique
            even if it does not.
        max_rows_per_file: rows per file before starting the next one.
        row_group_rows: small input batches are coalesced into row groups of this size.

    Returns:
        One :class:`FileMeta` per file written, in write order.
    """
    if not _PREFIX_RE.match(file_prefix):
        raise ValueError(f"file_prefix {file_prefix!r} must match {_PREFIX_RE.pattern}")
    if max_rows_per_file < 1 or row_group_rows < 1:
        raise ValueError("max_rows_per_file and row_group_rows must be >= 1")
    fs, root = resolve_root(table_uri)
    fs.create_dir(root, recursive=True)
    source: Iterator[pa.RecordBatch] = iter(
        batches.to_batches() if isinstance(batches, pa.Table) else batches
    )
    metas: list[FileMeta] = []
    part: _PartWriter | None = None
    for raw in source:
        batch = conform(raw, schema)
        offset = 0
        while offset < batch.num_rows:
            if part is None:
                name = f"{file_prefix}-{len(metas):05d}-{uuid.uuid4().hex[:12]}.parquet"
                part = _PartWriter(fs, root, name, schema, row_group_rows)
            take = min(batch.num_rows - offset, max_rows_per_file - part.num_rows)
            part.write(batch.slice(offset, take))
            offset += take
            if part.num_rows >= max_rows_per_file:
                metas.append(part.close())
                part = None
    if part is not None:
        metas.append(part.close())
    return metas


class _PartWriter:
    """One open parquet file, its pending row group and its running stats."""

    __slots__ = (
        "_fs",
        "_path",
        "_name",
        "_stream",
        "_writer",
        "_pending",
        "_pending_rows",
        "_row_group_rows",
        "_stats",
        "num_rows",
    )

    def __init__(
        self, fs: pafs.FileSystem, root: str, name: str, schema: pa.Schema, row_group_rows: int
    ) -> None:
        self._fs = fs
        self._name = name
        self._path = f"{root}/{name}"
        self._stream = fs.open_output_stream(self._path)
        # Dictionaries suit ids and repeated strings; on float vectors they only cost time.
        flat = [f.name for f in schema if not pa.types.is_nested(f.type)]
        self._writer = pq.ParquetWriter(self._stream, schema, compression="snappy", use_dictionary=flat)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._row_group_rows = row_group_rows
        self._stats = StatsCollector(schema)
        self.num_rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._stats.update(batch)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.num_rows += batch.num_rows
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            # One write_table call becomes one row group (well under pyarrow's 1Mi-row cap).
            self._writer.write_table(pa.Table.from_batches(self._pending))
        self._pending = []
        self._pending_rows = 0

    def close(self) -> FileMeta:
        self._flush()
        self._writer.close()
        self._stream.close()
        size = self._fs.get_file_info(self._path).size
        return FileMeta(
            path=self._name,
            size_bytes=int(size or 0),
            num_records=self.num_rows,
            modification_time_ms=int(time.time() * 1000),
            stats=self._stats.to_json(),
        )
