"""Blue/green model migrations through delta-rs: a staging table beside the target, one switch.

A run whose fingerprint differs from the target's builds the new vectors in a staging
table (:func:`staging_location`) with the usual waves. The target is not written until
the staging table is complete; then :func:`switch_to_staging` replaces the target's rows
by the staging table's in ONE Delta commit, and :func:`drop_staging` removes the staging
table. A reader of the target sees all-old or all-new vectors; the target's history keeps
the old state for time travel.

Example::

    staging = staging_location("/lake/docs_vectors")   # /lake/docs_vectors__sparkembed_staging
    ...  # waves upsert into `staging`
    version = switch_to_staging("/lake/docs_vectors", staging, expected_version=12)
    drop_staging(staging)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from sparkembed.sinks.deltars import add_action, already_committed, check_target, commit_actions, load
from sparkembed.sinks.errors import DeltaSinkError
from sparkembed.sinks.files import MIGRATION_MARKER, OWN_FILE_RE, FileMeta, resolve_root
from sparkembed.sinks.stats import StatsCollector

log = logging.getLogger(__name__)

STAGING_SUFFIX = "__sparkembed_staging"
"""Appended to the target's last name: ``/lake/t`` → ``/lake/t__sparkembed_staging``,
``main.rag.t`` → ``main.rag.t__sparkembed_staging``."""
_LOG_FILE_RE = re.compile(
    r"^(\d{20}\.(json|crc|checkpoint(\.\d+\.\d+)?\.parquet)|_last_checkpoint|\..+\.tmp)$"
)
"""Files Delta writers put in ``_delta_log``: commits, checksums, checkpoints, temporary files."""
_STATUS_COLUMNS = ("status", "prompt_tokens", "run_id", "embedded_at", "chunk_index")


def staging_location(target: str) -> str:
    """The staging table of ``target``: a sibling folder (path) or a sibling table (catalog name)."""
    return target.rstrip("/\\") + STAGING_SUFFIX


def exists(location: str) -> bool:
    """Whether anything (a file or a folder) is at ``location``."""
    fs, root = resolve_root(location)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def write_marker(staging_uri: str, info: dict[str, Any]) -> None:
    """Record what the migration is (target, fingerprints, source rows, price) for ``migrate status``.

    The marker sits in the staging folder under a name Delta readers ignore (a leading ``_``).
    """
    fs, root = resolve_root(staging_uri)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{MIGRATION_MARKER}") as out:
        out.write(json.dumps(info, indent=2).encode())


def read_marker(staging_uri: str) -> dict[str, Any] | None:
    """The marker :func:`write_marker` wrote, or None."""
    fs, root = resolve_root(staging_uri)
    path = f"{root}/{MIGRATION_MARKER}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        data: dict[str, Any] = json.loads(stream.read().decode("utf-8"))
    return data


def switch_to_staging(target_uri: str, staging_uri: str, *, expected_version: int | None = None) -> int:
    """Replace every row of the target by the staging table's rows, in ONE Delta commit.

    The staging table's data files are copied into the target folder (a Delta add action is
    relative to its table's root) under their own names, then one ``overwrite`` commit removes
    every current target file and adds the copies. The commit carries the transaction
    ``(sparkembed-switch-<staging table id>, <staging version>)``, so a rerun after a crash
    between the commit and the staging table's drop does not switch twice.

    Args:
        expected_version: the target version the migration planned against; another
            writer's commit since then fails the switch (nothing applied; rerun it).

    Returns:
        The target version holding the new vectors.

    Raises:
        ConcurrentWriteError: another writer committed to the target first.
        DeltaSinkError: no staging table, or a staging table that is not plain parquet files.
    """
    staging, target = load(staging_uri), load(target_uri)
    if staging is None or target is None:
        raise DeltaSinkError(f"nothing to switch: {staging_uri} or {target_uri} is not a Delta table")
    app_id, version = f"sparkembed-switch-{staging.metadata().id}", staging.version()
    if already_committed(target, app_id, version):
        return target.version()
    schema = pa.schema(staging.schema().to_arrow())
    check_target(target, schema, expected_version, same_schema=False)
    if "deletionVectors" in (staging.protocol().writer_features or []):
        raise DeltaSinkError(f"{staging_uri} has deletion vectors: its files cannot be copied as they are")
    actions: list[AddAction | RemoveAction] = [
        add_action(meta) for meta in copy_files(staging, staging_uri, target_uri, schema)
    ]
    # "overwrite" removes every file of the target's snapshot in this same commit.
    return commit_actions(target, actions, "overwrite", schema, app_id, version, expected_version)


def copy_files(staging: DeltaTable, staging_uri: str, target_uri: str, schema: pa.Schema) -> list[FileMeta]:
    """Copy the staging snapshot's files into the target folder; their metas for the commit
    (also the pending table's, :mod:`sparkembed.sinks.pending`)."""
    fs, source_root = resolve_root(staging_uri)
    _, target_root = resolve_root(target_uri)
    adds = pa.table(staging.get_add_actions(flatten=True))
    flat = pa.schema([f for f in schema if not pa.types.is_nested(f.type)])
    metas = []
    now_ms = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    for logged, size, rows in zip(
        adds["path"].to_pylist(), adds["size_bytes"].to_pylist(), adds["num_records"].to_pylist(), strict=True
    ):
        name = unquote(logged)
        if "/" in name:
            raise DeltaSinkError(
                f"{staging_uri} holds {name}: sparkembed's staging tables are not partitioned"
            )
        fs.copy_file(f"{source_root}/{name}", f"{target_root}/{name}")
        metas.append(
            FileMeta(name, int(size), int(rows or 0), now_ms, _stats(fs, f"{target_root}/{name}", flat))
        )
    return metas


def _stats(fs: pafs.FileSystem, path: str, flat: pa.Schema) -> str:
    """The file's Delta stats, read back from its flat columns (the vectors have none)."""
    collector = StatsCollector(flat)
    with fs.open_input_file(path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(columns=flat.names):
            collector.update(batch)
    return collector.to_json()


def drop_staging(staging_uri: str) -> list[str]:
    """Delete the staging table: its Delta log, sparkembed's data files and the marker.

    The log goes first, newest commit first, so a drop that stops midway leaves an older
    valid version or no table at all, never a log naming missing files. A file sparkembed
    did not write is never deleted; the folder then stays.

    Returns:
        The names of the entries left in the folder (not sparkembed's), sorted.
    """
    fs, root = resolve_root(staging_uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    log_dir = f"{root}/_delta_log"
    logged = fs.get_file_info(pafs.FileSelector(log_dir, allow_not_found=True))
    # Reverse name order: _last_checkpoint, then the newest commit first, temporary files last.
    for info in sorted(logged, key=lambda i: i.base_name, reverse=True):
        if info.type == pafs.FileType.File and _LOG_FILE_RE.match(info.base_name):
            fs.delete_file(info.path)
    if not fs.get_file_info(pafs.FileSelector(log_dir, allow_not_found=True)):
        _delete_dir_if_exists(fs, log_dir)
    left = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.File and (
            OWN_FILE_RE.match(info.base_name) or info.base_name == MIGRATION_MARKER
        ):
            fs.delete_file(info.path)
        else:
            left.append(info.base_name)
    if not left:
        _delete_dir_if_exists(fs, root)
    else:
        log.warning(
            "left %d entries in %s that sparkembed did not write: %s", len(left), root, sorted(left)[:5]
        )
    return sorted(left)


def _delete_dir_if_exists(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


@dataclasses.dataclass(frozen=True)
class MigrationStatus:
    """A pending migration, as ``sparkembed migrate status`` shows it.

    Attributes:
        staging: the staging table's location.
        ids_done: distinct ids with rows in the staging table.
        rows: staging rows (chunks included); ``failed_rows`` of them failed.
        prompt_tokens: tokens of the staging rows (what the service billed for them).
        cost_usd: ``prompt_tokens`` at the marker's price, None when no price is known.
        source_rows: source rows when the migration started, None when unknown.
        seconds_spent: embedding time, summed per run (first to last row of each run).
        eta_seconds: time left at the speed so far, None when it cannot be estimated.
        to_fingerprint: the fingerprint being built, from the marker or the rows.
    """

    staging: str
    ids_done: int
    rows: int
    failed_rows: int
    prompt_tokens: int
    cost_usd: float | None
    source_rows: int | None
    seconds_spent: float
    eta_seconds: float | None
    to_fingerprint: str | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def migration_status(target_uri: str, id_col: str = "id") -> MigrationStatus | None:
    """The staging table of ``target_uri`` summed up, or None when no migration is pending."""
    staging_uri = staging_location(target_uri)
    table = load(staging_uri)
    marker = read_marker(staging_uri) if table is not None else None
    if table is None:
        return None
    id_col = (marker or {}).get("id_col", id_col)
    fs, root = resolve_root(staging_uri)
    columns = [id_col, *_STATUS_COLUMNS, "embedding_fingerprint"]
    rows = table.to_pyarrow_table(columns=columns, filesystem=pafs.SubTreeFileSystem(root, fs))
    return summarize_staging(staging_uri, rows, marker or {}, id_col)


def summarize_staging(staging: str, rows: pa.Table, marker: dict[str, Any], id_col: str) -> MigrationStatus:
    """:class:`MigrationStatus` of the staging rows and the migration's marker."""
    ids_done = len(pc.unique(rows.column(id_col))) if rows.num_rows else 0
    tokens = int(pc.sum(rows.column("prompt_tokens")).as_py() or 0) if rows.num_rows else 0
    failed = int(pc.sum(pc.equal(rows.column("status"), "failed")).as_py() or 0) if rows.num_rows else 0
    seconds = 0.0
    if rows.num_rows:
        per_run = rows.group_by("run_id").aggregate([("embedded_at", "min"), ("embedded_at", "max")])
        for low, high in zip(
            per_run["embedded_at_min"].to_pylist(), per_run["embedded_at_max"].to_pylist(), strict=True
        ):
            if low is not None and high is not None:
                seconds += (high - low).total_seconds()
    price = marker.get("price_per_million_tokens")
    source_rows = marker.get("source_rows")
    eta = None
    if source_rows is not None and ids_done and seconds > 0:
        eta = max(0, int(source_rows) - ids_done) * seconds / ids_done
    fingerprints = pc.unique(rows.column("embedding_fingerprint")).to_pylist() if rows.num_rows else []
    return MigrationStatus(
        staging=staging,
        ids_done=ids_done,
        rows=rows.num_rows,
        failed_rows=failed,
        prompt_tokens=tokens,
        cost_usd=None if price is None else round(tokens * float(price) / 1e6, 6),
        source_rows=None if source_rows is None else int(source_rows),
        seconds_spent=round(seconds, 3),
        eta_seconds=None if eta is None else round(eta, 1),
        to_fingerprint=marker.get("to_fingerprint") or (fingerprints[0] if fingerprints else None),
    )
