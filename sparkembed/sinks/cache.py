"""The shared embedding cache through delta-rs: create it, append to it, vacuum it by age.

The cache (``cache.path``) is a Delta table of ``ok`` vectors keyed by (``fingerprint``,
``text_hash``): one row per chunk of a text (``chunk_index``, of ``chunks``), the vector, the
tokens its request billed, the model that answered, the run that paid and when it did
(``created_at``). Its Delta description is :data:`CACHE_DESCRIPTION`: with the columns, it is
how a path is known to be a cache before anything deletes from it.

Runs only ever append, blind (no expected version): two runs appending to one cache both
land, delta-rs resolving the race; a commit that still loses is retried here. Each append
carries the ``txn`` (run id, wave), so a retried commit never adds its rows twice. The same
text added by two runs is harmless: lookups pick one (:mod:`sparkembed.spark.cache`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow as pa
from deltalake import DeltaTable
from deltalake import Schema as DeltaSchema
from deltalake.exceptions import CommitFailedError, DeltaError

from sparkembed.sinks.deltars import commit_files, load
from sparkembed.sinks.errors import ConcurrentWriteError, DeltaSinkError
from sparkembed.sinks.files import FileMeta

log = logging.getLogger(__name__)

CACHE_DESCRIPTION = "sparkembed embedding cache v1"
"""The Delta table description (``COMMENT``) that marks a sparkembed cache."""
CACHE_SCHEMA = pa.schema(
    [
        ("fingerprint", pa.string()),
        ("text_hash", pa.string()),
        ("chunk_index", pa.int32()),
        ("chunk_start", pa.int32()),
        ("chunk_end", pa.int32()),
        ("chunks", pa.int32()),
        ("embedding", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("tokens", pa.int64()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""The cache's columns, in order."""
COMMIT_ATTEMPTS = 8
"""Appends that lose a commit race are tried again this many times in all."""


class NotACacheError(DeltaSinkError):
    """A path given as the cache holds something else: it is never written or vacuumed."""


def check_cache(table_uri: str) -> bool:
    """Whether a cache exists at ``table_uri``.

    Raises:
        NotACacheError: a Delta table is there, but not a sparkembed cache.
    """
    table = load(table_uri)
    if table is None:
        return False
    columns = set(table.schema().to_arrow().names)
    if table.metadata().description != CACHE_DESCRIPTION or columns != set(CACHE_SCHEMA.names):
        raise NotACacheError(
            f"{table_uri} is a Delta table but not a sparkembed cache (its description is not "
            f"{CACHE_DESCRIPTION!r}, or its columns differ): give cache.path a new folder"
        )
    return True


def create_cache(table_uri: str) -> None:
    """Create an empty cache at ``table_uri`` unless one is there (another run may be creating it)."""
    if check_cache(table_uri):
        return
    try:
        DeltaTable.create(
            table_uri, DeltaSchema.from_arrow(CACHE_SCHEMA), mode="ignore", description=CACHE_DESCRIPTION
        )
    except DeltaError as exc:  # lost the race to create it: fine if the winner made a cache
        log.info("another run created the cache %s (%s)", table_uri, exc)
    check_cache(table_uri)


def append_to_cache(table_uri: str, files: list[FileMeta], *, app_id: str, version: int) -> int:
    """Commit written cache files as one blind append, retrying lost races; return the version.

    Raises:
        ConcurrentWriteError: still losing after :data:`COMMIT_ATTEMPTS` attempts.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return commit_files(
                table_uri, files, schema=CACHE_SCHEMA, mode="append", app_id=app_id, version=version
            )
        except (ConcurrentWriteError, CommitFailedError) as exc:
            if attempt == COMMIT_ATTEMPTS:
                raise ConcurrentWriteError(f"could not append to the cache {table_uri}: {exc}") from exc
            log.info("append to the cache %s lost a race (%s); trying again", table_uri, exc)
            time.sleep(min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class VacuumResult:
    """What :func:`vacuum_cache` did: entries (rows) deleted, and files removed from storage."""

    rows_deleted: int
    files_removed: list[str]

    def to_json(self) -> dict[str, object]:
        return {"rows_deleted": self.rows_deleted, "files_removed": len(self.files_removed)}


def vacuum_cache(
    table_uri: str, older_than: timedelta, *, now: datetime | None = None, retention_hours: int = 168
) -> VacuumResult:
    """Delete the cache entries created before ``now - older_than``, then the files that Delta's
    log has marked removed for longer than ``retention_hours`` (Delta's 7 days by default).

    The file vacuum is delta-rs's *lite* mode: it deletes only files the cache's own log names
    as removed, never a file the log does not know, and keeps what time travel within the
    retention needs (and what a run reading the cache right now still reads).

    Raises:
        NotACacheError: ``table_uri`` holds something other than a sparkembed cache (or nothing).
    """
    if not check_cache(table_uri):
        raise NotACacheError(f"there is no sparkembed cache at {table_uri}")
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    predicate = f"created_at < '{cutoff.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}'"
    deleted = 0
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            metrics = DeltaTable(table_uri).delete(predicate)
            deleted = int(metrics.get("num_deleted_rows") or 0)
            break
        except CommitFailedError:  # a run appended meanwhile: delete again on the new snapshot
            if attempt == COMMIT_ATTEMPTS:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
    removed = DeltaTable(table_uri).vacuum(
        retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False, full=False
    )
    return VacuumResult(rows_deleted=deleted, files_removed=sorted(removed))
