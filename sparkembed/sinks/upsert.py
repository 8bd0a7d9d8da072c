"""Upsert by id through delta-rs, as ONE atomic Delta commit (copy-on-write).

The new files hold every row of each id they contain (all its chunks). The upsert:

1. reads the distinct ids of the new files (one column);
2. finds the table's files holding any of those ids (file stats prune by id range,
   then a projected, filtered scan of the id column);
3. rewrites each such file without those ids' rows (streamed by batches);
4. commits, in one transaction: add(new files) + add(rewritten files) +
   remove(old versions of the rewritten files) + txn(app_id, version).

So every old row of an updated id is gone, including old chunk rows when the chunk
count fell, and a reader sees the table wholly before or wholly after the upsert.
``DeltaTable.merge`` cannot do this in one commit: it matches per (id, chunk_index),
and deleting an id's stale chunks needs a second commit.

Cost: each upsert reads the id column of the files whose id range overlaps the new
ids (with waves cut by hash of id, that is most files) and rewrites only the files
that hold an updated id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from sparkembed.sinks.deltars import (
    add_action,
    already_committed,
    check_target,
    commit_actions,
    commit_files,
)
from sparkembed.sinks.errors import DeltaSinkError
from sparkembed.sinks.files import FileMeta, conform, resolve_root, write_part

_SCAN_BATCH_ROWS = 8_192


def upsert_files(
    table_uri: str,
    files: list[FileMeta],
    *,
    schema: pa.Schema,
    id_col: str,
    app_id: str,
    version: int,
    rewrite_prefix: str | None = None,
    properties: dict[str, str] | None = None,
    expected_version: int | None = None,
    replace_ids: pa.Array | None = None,
) -> int:
    """Replace every row of each id in ``files`` by the rows in ``files``, in one commit.

    Args:
        table_uri, files, schema, app_id, version, properties, expected_version: as in
            :func:`sparkembed.sinks.commit_files`; an absent table is created.
        id_col: the id column; ids in ``files`` must not be null.
        rewrite_prefix: file prefix of rewritten files; default ``<app_id>-v<version>-rw``
            (with unsafe characters replaced), so ``vacuum_orphans(prefix=app_id)``
            also removes rewrites of a commit that failed.
        replace_ids: the ids in ``files`` that may have rows in the table, when the caller
            knows (an anti-join did); by default every id in ``files`` is looked for.

    Returns:
        The table version holding the upsert.

    Raises:
        ConcurrentWriteError: another writer committed first; nothing was applied.
        TargetSchemaError: the rows' columns differ from the table's.
        DeltaSinkError: the table uses deletion vectors, partitions or column mapping.
    """
    if not DeltaTable.is_deltatable(table_uri):
        return commit_files(
            table_uri,
            files,
            schema=schema,
            mode="append",
            app_id=app_id,
            version=version,
            properties=properties,
            expected_version=expected_version,
        )
    table = DeltaTable(table_uri)
    if already_committed(table, app_id, version):
        return table.version()
    check_target(table, schema, expected_version, same_schema=True)
    if "deletionVectors" in (table.protocol().writer_features or []):
        # Rewriting from the raw parquet would bring back rows a deletion vector hides.
        raise DeltaSinkError(f"{table_uri} has deletion vectors; upsert with the native sink")

    fs, root = resolve_root(table_uri)
    new_ids = _distinct_ids(fs, root, files, id_col) if replace_ids is None else replace_ids
    prefix = rewrite_prefix or _safe(f"{app_id}-v{version}-rw")
    actions: list[AddAction | RemoveAction] = [add_action(f) for f in files]
    actions += _drop_ids(table_uri, table, id_col, new_ids, schema, prefix)
    return commit_actions(table, actions, "append", schema, app_id, version, expected_version)


def delete_ids(
    table_uri: str,
    ids: pa.Array,
    *,
    schema: pa.Schema,
    id_col: str,
    app_id: str,
    version: int,
    rewrite_prefix: str | None = None,
    expected_version: int | None = None,
) -> int:
    """Remove every row of each of ``ids`` in one commit (``--prune``); idempotent like upsert.

    Returns:
        The table version after the delete (unchanged when nothing matched).
    """
    table = DeltaTable(table_uri)
    if already_committed(table, app_id, version):
        return table.version()
    check_target(table, schema, expected_version, same_schema=True)
    prefix = rewrite_prefix or _safe(f"{app_id}-v{version}-rw")
    actions = _drop_ids(table_uri, table, id_col, ids, schema, prefix)
    if not actions:
        return table.version()
    return commit_actions(table, actions, "append", schema, app_id, version, expected_version)


def _drop_ids(
    table_uri: str, table: DeltaTable, id_col: str, ids: pa.Array, schema: pa.Schema, prefix: str
) -> list[AddAction | RemoveAction]:
    """Actions that rewrite each file holding any of ``ids`` without those rows."""
    fs, root = resolve_root(table_uri)
    actions: list[AddAction | RemoveAction] = []
    now_ms = int(time.time() * 1000)
    for path, size in _files_holding(table, fs, root, id_col, ids):
        kept = _rows_without(fs, f"{root}/{unquote(path)}", id_col, ids, schema)
        actions += [add_action(m) for m in write_part(table_uri, kept, schema=schema, file_prefix=prefix)]
        actions.append(RemoveAction(path, True, now_ms, size))
    return actions


def _distinct_ids(fs: pafs.FileSystem, root: str, files: list[FileMeta], id_col: str) -> pa.Array:
    if not files:
        return pa.array([])
    paths = [f"{root}/{f.path}" for f in files]
    ids = ds.dataset(paths, format="parquet", filesystem=fs).to_table(columns=[id_col])
    return pc.unique(ids.column(id_col).combine_chunks())


def _files_holding(
    table: DeltaTable, fs: pafs.FileSystem, root: str, id_col: str, ids: pa.Array
) -> list[tuple[str, int]]:
    """(path as logged, size) of the table's files holding any of ``ids``."""
    if len(ids) == 0:
        return []
    adds = pa.table(table.get_add_actions(flatten=True))
    low_high = pc.min_max(ids)
    candidates = adds
    if f"min.{id_col}" in adds.column_names:
        # Keep files without stats (null bounds) and files whose id range meets ours.
        low, high = adds[f"min.{id_col}"], adds[f"max.{id_col}"]
        overlaps = pc.and_(pc.less_equal(low, low_high["max"]), pc.greater_equal(high, low_high["min"]))
        candidates = adds.filter(pc.fill_null(overlaps, True))
    if candidates.num_rows == 0:
        return []
    logged = candidates["path"].to_pylist()
    by_disk_path = {f"{root}/{unquote(p)}": p for p in logged}
    sizes = dict(zip(logged, candidates["size_bytes"].to_pylist(), strict=True))
    dataset = ds.dataset(list(by_disk_path), format="parquet", filesystem=fs)
    scan = dataset.scanner(columns=[id_col], filter=pc.field(id_col).isin(ids))
    hits = {by_disk_path[t.fragment.path] for t in scan.scan_batches() if t.record_batch.num_rows}
    return [(p, sizes[p]) for p in logged if p in hits]


def _rows_without(
    fs: pafs.FileSystem, path: str, id_col: str, ids: pa.Array, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    """Stream ``path``'s rows whose id is not in ``ids``, conformed to ``schema``."""
    with fs.open_input_file(path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=_SCAN_BATCH_ROWS):
            keep = pc.invert(pc.is_in(batch.column(id_col), value_set=ids, skip_nulls=True))
            yield conform(batch.filter(keep), schema, fill_missing=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)
