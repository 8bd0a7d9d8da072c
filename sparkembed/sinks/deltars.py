"""Driver side of the delta-rs sink: commit executor-written files in one Delta transaction.

Every commit carries a Delta ``txn`` action ``(app_id, version)``. Before committing,
the table's recorded version for ``app_id`` is read: if it already reaches ``version``,
this commit happened before (a retry after a lost answer) and is skipped, so rows are
never duplicated.

Concurrent runs: pass ``expected_version``, the table version this run last saw
(``-1`` while the table does not exist; then each commit's return value). A commit
fails with :class:`ConcurrentWriteError`, applying nothing, when any other writer
committed in between, whether seen before the commit or raced at it (delta-rs
commit retries are off). Without ``expected_version``, delta-rs's own conflict
checks apply: blind appends from two runs both succeed.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

from sparkembed.sinks.errors import ConcurrentWriteError, DeltaSinkError, TargetSchemaError
from sparkembed.sinks.files import FileMeta, resolve_root

log = logging.getLogger(__name__)
ABSENT = -1
"""``expected_version`` meaning "the table does not exist yet"."""


def table_version(table_uri: str) -> int:
    """The table's latest version, or :data:`ABSENT` when there is no table."""
    table = load(table_uri)
    return ABSENT if table is None else table.version()


def read_table(table_uri: str) -> pa.Table:
    """The latest snapshot as one Arrow table (tests and small tables)."""
    fs, root = resolve_root(table_uri)
    # A native filesystem, not deltalake's default Python one: pyarrow I/O threads
    # still holding a Python file at interpreter exit abort the process.
    return DeltaTable(table_uri).to_pyarrow_table(filesystem=pafs.SubTreeFileSystem(root, fs))


def commit_files(
    table_uri: str,
    files: list[FileMeta],
    *,
    schema: pa.Schema,
    mode: Literal["append", "overwrite"],
    app_id: str,
    version: int,
    properties: dict[str, str] | None = None,
    expected_version: int | None = None,
) -> int:
    """Commit written parquet files as one Delta transaction, creating the table if absent.

    Args:
        table_uri: the table root the files were written under.
        files: metas from :func:`write_part` of successful task attempts only.
        schema: the rows' Arrow schema; an append must match the table's columns and
            types, an overwrite replaces them.
        mode: ``append`` adds the files; ``overwrite`` also removes every current file.
        app_id: idempotency key, e.g. ``sparkembed-<run_id>``.
        version: idempotency counter for ``app_id``, e.g. the wave number.
        properties: table properties, applied only when this commit creates the table.
        expected_version: see the module docstring; ``None`` skips the check.

    Returns:
        The table version holding these files (the latest one if already committed).

    Raises:
        ConcurrentWriteError: another writer committed first; nothing was applied.
        TargetSchemaError: an append whose columns differ from the table's.
    """
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode must be 'append' or 'overwrite', not {mode!r}")
    table = load(table_uri)
    if table is None:
        return create_with_files(
            table_uri,
            files,
            schema=schema,
            app_id=app_id,
            version=version,
            properties=properties,
            expected_version=expected_version,
        )
    if already_committed(table, app_id, version):
        return table.version()
    check_target(table, schema, expected_version, same_schema=mode == "append")
    actions: list[AddAction | RemoveAction] = [add_action(f) for f in files]
    return commit_actions(table, actions, mode, schema, app_id, version, expected_version)


def add_columns(table_uri: str, schema: pa.Schema, *, expected_version: int | None = None) -> int:
    """Add the columns of ``schema`` an existing table lacks, nullable, after its own (rows
    written before read null there), in one commit; return the table's version after it.

    A table from an older release (without ``deployment``) thus takes the rows of this one.
    An absent table is left absent (:data:`ABSENT`).

    Raises:
        ConcurrentWriteError: the table is not at ``expected_version``.
    """
    table = load(table_uri)
    if table is None:
        return ABSENT
    if expected_version is not None and table.version() != expected_version:
        raise ConcurrentWriteError(
            f"{table_uri} is at version {table.version()}, but this run expected "
            f"{expected_version}: another writer committed in between"
        )
    have = set(table.schema().to_arrow().names)
    missing = [field.with_nullable(True) for field in schema if field.name not in have]
    if not missing:
        return table.version()
    log.info("adding column(s) %s to %s", ", ".join(f.name for f in missing), table_uri)
    table.alter.add_columns(list(DeltaSchema.from_arrow(pa.schema(missing)).fields))
    return DeltaTable(table_uri).version()


def create_with_files(
    table_uri: str,
    files: list[FileMeta],
    *,
    schema: pa.Schema,
    app_id: str,
    version: int,
    properties: dict[str, str] | None,
    expected_version: int | None,
) -> int:
    """Create the table with ``files`` as version 0; see :func:`commit_files`."""
    if expected_version not in (None, ABSENT):
        raise ConcurrentWriteError(
            f"expected {table_uri} at version {expected_version}, but there is no table there"
        )
    try:
        create_table_with_add_actions(
            table_uri,
            DeltaSchema.from_arrow(schema),
            [add_action(f) for f in files],
            mode="error",
            configuration=properties,
            commit_properties=_commit_properties(app_id, version, strict=True),
        )
    except DeltaError as exc:
        # Seen as there (``already exists``), or, when both found none, version 0 taken first:
        # a failed commit (other causes fail it too) with a table there now.
        lost = isinstance(exc, CommitFailedError) and load(table_uri) is not None
        if not lost and "already exists" not in str(exc):
            raise
        raise ConcurrentWriteError(
            f"another writer created {table_uri} while this run was creating it; "
            f"commit {app_id} v{version} was not applied ({exc})"
        ) from exc
    return 0


def already_committed(table: DeltaTable, app_id: str, version: int) -> bool:
    """Whether the table's ``txn`` for ``app_id`` already reaches ``version``."""
    done = table.transaction_version(app_id)
    if done is not None and done >= version:
        log.info("%s v%d is already committed (table has v%d): skipped", app_id, version, done)
        return True
    return False


def check_target(
    table: DeltaTable, schema: pa.Schema, expected_version: int | None, *, same_schema: bool
) -> None:
    """Refuse targets we cannot write correctly, and writers that lost a race."""
    if expected_version is not None and table.version() != expected_version:
        raise ConcurrentWriteError(
            f"{table.table_uri} is at version {table.version()}, but this run expected "
            f"{expected_version}: another writer committed in between"
        )
    metadata = table.metadata()
    if metadata.partition_columns:
        raise DeltaSinkError(f"{table.table_uri} is partitioned; the delta-rs sink is not")
    if metadata.configuration.get("delta.columnMapping.mode", "none") != "none":
        # Our files carry logical column names; a column-mapped table reads physical ones.
        raise DeltaSinkError(f"{table.table_uri} uses column mapping; use the native sink")
    if same_schema:
        ours, theirs = _columns(DeltaSchema.from_arrow(schema)), _columns(table.schema())
        if ours != theirs:
            raise TargetSchemaError(
                f"rows do not match {table.table_uri}: target has {theirs}, rows have {ours}; "
                "overwrite, or write to a new target"
            )


def commit_actions(
    table: DeltaTable,
    actions: list[AddAction | RemoveAction],
    mode: str,
    schema: pa.Schema,
    app_id: str,
    version: int,
    expected_version: int | None,
) -> int:
    """Commit ``actions`` on ``table``'s snapshot; return the new version."""
    strict = expected_version is not None
    try:
        table.create_write_transaction(
            actions, mode, schema, commit_properties=_commit_properties(app_id, version, strict)
        )
    except CommitFailedError as exc:
        raise ConcurrentWriteError(
            f"commit {app_id} v{version} to {table.table_uri} lost to a concurrent "
            f"writer and was not applied: {exc}"
        ) from exc
    if strict:
        return table.version() + 1  # retries are off, so it landed right after the snapshot
    return DeltaTable(table.table_uri).version()


def add_action(meta: FileMeta) -> AddAction:
    """The Delta add action of one written file."""
    return AddAction(
        path=meta.path,
        size=meta.size_bytes,
        partition_values={},
        modification_time=meta.modification_time_ms,
        data_change=True,
        stats=meta.stats or json.dumps({"numRecords": meta.num_records}),
    )


def load(table_uri: str) -> DeltaTable | None:
    """The table's latest snapshot, or None when there is no table."""
    if not DeltaTable.is_deltatable(table_uri):
        return None
    return DeltaTable(table_uri)


def _columns(schema: DeltaSchema) -> list[tuple[str, str]]:
    """(name, Delta type JSON) per column; nullability ignored: Spark relaxes it anyway."""
    fields = json.loads(schema.to_json())["fields"]
    return [(f["name"], json.dumps(_types_only(f["type"]), sort_keys=True)) for f in fields]


def _types_only(node: object) -> object:
    """A Delta type JSON without nullability flags or field metadata."""
    if isinstance(node, dict):
        drop = {"nullable", "containsNull", "valueContainsNull", "metadata"}
        return {k: _types_only(v) for k, v in node.items() if k not in drop}
    if isinstance(node, list):
        return [_types_only(v) for v in node]
    return node


def _commit_properties(app_id: str, version: int, strict: bool) -> CommitProperties:
    return CommitProperties(
        app_transactions=[Transaction(app_id, version)],
        # Off when strict: any concurrent commit must fail us, not be retried over.
        max_commit_retries=0 if strict else None,
    )
